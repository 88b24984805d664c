"""The plan over modes and node counts, and its tables."""

from __future__ import annotations

from dataclasses import asdict, fields

from ngdiff_ds.plan.communication import communication_bytes, passes_per_step
from ngdiff_ds.plan.memory import memory_breakdown
from ngdiff_ds.plan.model import count_parameters, largest_module
from ngdiff_ds.plan.settings import PROBE_MULTIPLES, PROBE_TASKS, Model, PlanSettings, load_model

GIB = 2 ** 30


# ----- the plan ---------------------------------------------------------------------------

def plan_configuration(model: Model, settings: PlanSettings, mode: str, num_nodes: int) -> dict:
    """Memory, fit and communication of ``mode`` on ``num_nodes`` nodes."""
    world = settings.gpus_per_node * num_nodes
    memory = memory_breakdown(model, settings, mode, world)
    usable_gpu = settings.gpu_memory * (1 - settings.reserve) * GIB
    cpu_per_node = settings.gpus_per_node * memory.cpu_per_rank
    fits_cpu = settings.cpu_memory == 0 or cpu_per_node <= settings.cpu_memory * GIB
    return {"mode": mode, "nodes": num_nodes, "gpus": world,
            "fits": bool(memory.gpu_peak <= usable_gpu and fits_cpu),
            "memory_bytes": {**memory.as_dict(), "cpu_per_node": cpu_per_node},
            "communication_bytes": communication_bytes(model, settings, mode, world),
            "passes_per_step": passes_per_step(mode, settings)}


def smallest_fitting_nodes(configurations: list[dict], mode: str) -> int | None:
    fitting = [c["nodes"] for c in configurations if c["mode"] == mode and c["fits"]]
    return min(fitting, default=None)


def make_plan(settings: PlanSettings) -> dict:
    """The whole plan as one JSON-ready dict (what ``launch/plan.py --json`` prints)."""
    model = load_model(settings)
    dims, tensors = model
    configurations = [plan_configuration(model, settings, mode, nodes)
                      for mode in settings.modes for nodes in sorted(set(settings.nodes))]
    return {
        "model": {**asdict(dims), "parameters": count_parameters(tensors),
                  "trainable_parameters": count_parameters(tensors, trainable_only=True),
                  "largest_module_parameters": largest_module(tensors)},
        "settings": {f.name: getattr(settings, f.name) for f in fields(settings)
                     if f.name != "zero"},
        "assumptions": {"zero_optimization": asdict(settings.zero),
                        "usable_gpu_bytes": settings.gpu_memory * (1 - settings.reserve) * GIB,
                        "probe": {"period": settings.lr_period, "multiples": PROBE_MULTIPLES,
                                  "probe_tasks": PROBE_TASKS},
                        "optimizer": "Adam(W): two fp32 moments"},
        "configurations": configurations,
        "smallest_fitting_nodes": {mode: smallest_fitting_nodes(configurations, mode)
                                   for mode in settings.modes},
    }


# ----- the table --------------------------------------------------------------------------

_MEMORY_COLUMNS = ("weights", "master", "moments", "gradients", "ngdiff_extra", "reduce_bucket",
                   "reference_weights", "gathered",
                   "activations", "step_buffer")


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = [header, ["---"] * len(header), *rows]
        return ["| " + " | ".join(line) + " |" for line in lines]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(cell).rjust(width) for cell, width in zip(row, widths))
            for row in [header, *rows]]


def _memory_rows(configurations: list[dict]) -> list[list[str]]:
    rows = []
    for c in configurations:
        memory = c["memory_bytes"]
        rows.append([c["mode"], str(c["nodes"]), str(c["gpus"]),
                     *(_gib(memory["gpu"][part]) for part in _MEMORY_COLUMNS),
                     _gib(memory["gpu_peak"]), _gib(memory["cpu_per_node"]),
                     "yes" if c["fits"] else "NO"])
    return rows


def _communication_rows(configurations: list[dict]) -> list[list[str]]:
    rows = []
    for c in configurations:
        volume, passes = c["communication_bytes"], c["passes_per_step"]
        gathers = passes["forward_gathers"] + passes["backward_gathers"] + passes["probe_gathers"]
        rows.append([c["mode"], str(c["nodes"]), f"{gathers:g}", str(passes["reduce_scatters"]),
                     _gib(volume["all_gather_forward"] + volume["all_gather_backward"]
                          + volume["all_gather_probes"] + volume["all_gather_persistent"]),
                     _gib(volume["reduce_scatter"]), f"{volume['all_reduce']:.0f}",
                     _gib(volume["total"])])
    return rows


def _heading(plan: dict) -> str:
    model, settings = plan["model"], plan["settings"]
    usable = plan["assumptions"]["usable_gpu_bytes"]
    return (f"{model['name']}: {model['parameters'] / 1e9:.2f} B parameters, "
            f"{model['trainable_parameters'] / 1e9:.3g} B trainable; {settings['precision']}, "
            f"micro-batch {settings['micro_batch_size']} x {settings['seq_len']} tokens, "
            f"K = {settings['grad_accum_steps']}, activation checkpointing "
            f"{'on' if settings['gradient_checkpointing'] else 'off'}, optimizer "
            f"{'offloaded' if settings['offload'] else 'on GPU'}; GPUs per node: "
            f"{settings['gpus_per_node']}, {_gib(usable)} of {settings['gpu_memory']:g} GiB "
            "usable per GPU")


def _smallest_line(plan: dict) -> str:
    nodes = list(plan["settings"]["nodes"])
    found = [f"{mode}: {smallest if smallest is not None else f'none of {nodes}'}"
             for mode, smallest in plan["smallest_fitting_nodes"].items()]
    return "smallest node count that fits: " + "; ".join(found)


def format_plan(plan: dict, markdown: bool = False) -> str:
    """The plan as readable tables (GiB), or as markdown tables."""
    configurations = plan["configurations"]
    lines = [_heading(plan), "",
             "memory per GPU, GiB (peak = persistent parts + max(gathered + activations, "
             "step_buffer); cpu/node: host memory per node)"]
    lines += _table(["mode", "nodes", "GPUs", *_MEMORY_COLUMNS, "peak", "cpu/node", "fits"],
                    _memory_rows(configurations), markdown)
    lines += ["", "communication per rank per step (gathers and reduce-scatters: counts, "
                  "GiB; all-reduce: bytes)"]
    lines += _table(["mode", "nodes", "gathers", "reduce-scatters", "all-gather",
                     "reduce-scatter", "all-reduce", "total"],
                    _communication_rows(configurations), markdown)
    return "\n".join([*lines, "", _smallest_line(plan)])
