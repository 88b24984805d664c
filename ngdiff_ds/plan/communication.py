"""Bytes each collective moves per rank and step (see ngdiff_ds/plan/__init__.py)."""

from __future__ import annotations


from ngdiff_ds.plan.memory import is_trainable, persistence_filter, slice_numel
from ngdiff_ds.plan.settings import (PROBE_MULTIPLES, PROBE_TASKS, STEP_ALL_REDUCE_NUMBERS, Model,
                                     PlanSettings)

# ----- communication ----------------------------------------------------------------------

def passes_per_step(mode: str, settings: PlanSettings) -> dict[str, float]:
    """Parameter gathers (forward, backward, probe forwards) and gradient reduce-scatters per
    step, and the rate of fit steps (the probes' amortisation)."""
    k = settings.grad_accum_steps
    forwards = {"ngdiff": 2 * k, "ngdiff_adaptive": 2 * k, "shared_forward": k, "gdiff": k}[mode]
    backwards = k if mode == "gdiff" else 2 * k
    fit_rate = 1 / settings.lr_period if mode == "ngdiff_adaptive" else 0.0
    return {"forward_gathers": forwards, "backward_gathers": backwards,
            "probe_gathers": fit_rate * PROBE_MULTIPLES * PROBE_TASKS * k,
            "reduce_scatters": backwards, "fit_steps_per_step": fit_rate}


def _all_reduce_bytes(numbers: float, world_size: int) -> float:
    return 2 * (world_size - 1) / world_size * 8 * numbers


def communication_bytes(model: Model, settings: PlanSettings,
                        mode: str, world_size: int) -> dict[str, float]:
    """Bytes one rank sends per step, by collective (see ngdiff_ds/plan/__init__.py)."""
    _, tensors = model
    p, n = settings.dtype_bytes, world_size
    is_persistent = persistence_filter(settings.zero)
    gather = (n - 1) * p * slice_numel(tensors, n, lambda t: not is_persistent(t))
    persistent = (n - 1) * p * slice_numel(tensors, n, is_persistent)
    reduce = (n - 1) * p * slice_numel(tensors, n, is_trainable)
    passes = passes_per_step(mode, settings)
    fits = passes["fit_steps_per_step"]
    step_numbers = 0 if mode == "gdiff" else STEP_ALL_REDUCE_NUMBERS
    volume = {
        "all_gather_forward": passes["forward_gathers"] * gather,
        "all_gather_backward": passes["backward_gathers"] * gather,
        "all_gather_probes": passes["probe_gathers"] * gather,
        # after each step (_post_step), and after each probe weight edit (zero3.py)
        "all_gather_persistent": (1 + fits * (PROBE_MULTIPLES + 1)) * persistent,
        "reduce_scatter": passes["reduce_scatters"] * reduce,
        "all_reduce": _all_reduce_bytes(step_numbers + fits * PROBE_MULTIPLES, n),
        # --reference-model: the frozen copy gathers its weights for each retain forward
        "all_gather_reference": settings.grad_accum_steps * (n - 1) * p * slice_numel(
            [t for t in tensors if not (settings.lora and t.trainable)], n,
            lambda t: not is_persistent(t)) if settings.reference_model else 0.0,
    }
    volume["total"] = sum(volume.values())
    return volume
