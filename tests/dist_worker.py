"""Runs NGDiff scenarios on ZeRO-3 for the distributed tests; launched by ``deepspeed``.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/dist_worker.py --model M --data D \
        --scenarios scenarios.json --out OUT

For every scenario it builds a fresh engine, runs ``run_unlearning`` (the production loop) to
the last step count of its ``save_after`` and writes, on rank 0, for every step count N there
``OUT/<name>_step<N>.pt`` (the full state dict after step N) and ``OUT/<name>_step<N>.json``
(the step stats up to N).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ngdiff_ds.adaptive_lr import AdaptiveLRConfig  # noqa: E402
from ngdiff_ds.combine import COMBINE_RULES  # noqa: E402
from ngdiff_ds.config import BatchLayout, engine_config  # noqa: E402
from ngdiff_ds.data.task import load_task  # noqa: E402
from ngdiff_ds.distributed import init_distributed  # noqa: E402
from ngdiff_ds.engine import build_engine, build_inference_engine, load_tokenizer  # noqa: E402
from ngdiff_ds.losses import FORGET_LOSSES, RETAIN_LOSSES, gradient_ascent_loss  # noqa: E402
from ngdiff_ds.lr_probe import AdaptiveRate  # noqa: E402
from ngdiff_ds.memory import MemorySettings  # noqa: E402
from ngdiff_ds.run_log import RunLog  # noqa: E402
from ngdiff_ds.starting_model import (attach_reference_model, needs_reference_model,  # noqa: E402
                                      score_reference_logprobs, tasks_needing_logprobs)
from ngdiff_ds.trainer import Method, ngdiff_step, run_unlearning  # noqa: E402
from ngdiff_ds.unlearn import UnlearnSettings  # noqa: E402
from ngdiff_ds.zero3 import consolidated_state_dict  # noqa: E402

NGDIFF = Method(forget_loss=FORGET_LOSSES.bind("ga"), retain_loss=RETAIN_LOSSES.bind("nll"),
                combine_rule=COMBINE_RULES.bind("ngdiff"))


class RecordingRate(AdaptiveRate):
    """The production adaptive rate, keeping each fit's probe losses for the test."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.probe_losses = {}
        self.backtracks = {}  # step -> (the multiple the step was shortened to, tries' losses)

    def probe_and_fit(self, built, step, step_delta):
        fit = super().probe_and_fit(built, step, step_delta)
        self.probe_losses[step] = fit.losses
        self.backtracks[step] = (fit.step_multiple, fit.backtrack_losses)
        return fit


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--scenarios", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank, world_size = init_distributed(timeout_minutes=5)
    out = Path(args.out)
    tokenizer = load_tokenizer(args.model)
    log = RunLog(out / "log", tensorboard=False)
    for scenario in json.loads(Path(args.scenarios).read_text()):
        layout = BatchLayout(scenario["micro"], scenario["accum"], world_size)
        ds_config = engine_config({
            "train_micro_batch_size_per_gpu": scenario["micro"],
            "zero_optimization": {"stage": 3, **scenario.get("zero", {})},
            "optimizer": scenario["optimizer"],
            "bf16": {"enabled": scenario.get("bf16", False)},
            "data_types": {"grad_accum_dtype": "fp32"},
        }, layout)
        forget = load_task("forget", args.data, "forget10", tokenizer, 64, layout, seed=3)
        retain = load_task("retain", args.data, "retain90", tokenizer, 64, layout, seed=4)
        if scenario.get("kind") == "finetune":
            finetune(args.model, ds_config, args.data, tokenizer, layout, scenario, out, rank, log)
            continue
        if scenario.get("kind") == "probe_restore":
            probe_restore(args.model, ds_config, forget, retain, out / scenario["name"], rank)
            continue
        if scenario.get("kind") == "eval":
            eval_scores(args.model, ds_config, args.data, tokenizer, out / scenario["name"], rank,
                        scenario["num_examples"])
            continue
        if scenario.get("kind") == "nan_skip":
            nan_skip(args.model, ds_config, forget, retain, out / scenario["name"], rank)
            continue
        adaptive = AdaptiveLRConfig(**scenario["adaptive"]) if "adaptive" in scenario else \
            AdaptiveLRConfig(enabled=False)
        method = Method(NGDIFF.forget_loss, NGDIFF.retain_loss,
                        COMBINE_RULES.bind(scenario.get("combine", "ngdiff")))
        reference_model = None
        if "method" in scenario:  # a --method preset, set up as the run sets it up
            method = UnlearnSettings(method_name=scenario["method"]).method()
            if needs_reference_model(method):
                reference_model = build_inference_engine(args.model, ds_config)
                method = attach_reference_model(method, reference_model.engine)
        memory = MemorySettings(gradient_checkpointing=scenario.get("gradient_checkpointing", False),
                                lora_rank=scenario.get("lora", {}).get("r", 0),
                                lora_alpha=scenario.get("lora", {}).get("alpha"),
                                lora_targets=",".join(scenario.get("lora", {}).get("targets", ["q_proj"])))
        # one run to the last save point; the earlier ones are snapshots taken after their
        # step (the loop's checkpoint hook: every rank, as the gather needs)
        final_steps = max(scenario["save_after"])
        built = build_engine(args.model, ds_config, memory)
        layer_calls = count_mlp_calls(next(module for name, module in built.model.named_modules()
                                           if name.endswith("layers.0.mlp")))
        # NPO: log p_ref of the forget set, on the fresh engine before its first step
        score_reference_logprobs(built.engine, tasks_needing_logprobs(method, forget, retain),
                                 8, log)
        rate = RecordingRate(adaptive, built.engine.optimizer.param_groups[0]["lr"], forget,
                             retain, method, log)
        snapshots = {}

        def snapshot(state, evaluated, stopping, built=built, snapshots=snapshots,
                     save_after=scenario["save_after"], final_steps=final_steps):
            if state.steps_done in save_after and state.steps_done != final_steps:
                weights = consolidated_state_dict(built.engine)  # collective; rank 0 gets it
                if rank == 0:
                    snapshots[state.steps_done] = {k: v.clone() for k, v in weights.items()}

        history = run_unlearning(built, forget, retain, method, rate, final_steps, log,
                                 checkpoint=snapshot)
        name = f"{scenario['name']}_step{final_steps}"
        if scenario.get("replay_without_probes"):
            # The same steps again on a fresh engine at the rates the probed run used.
            replay = build_engine(args.model, ds_config)
            buffer = torch.empty_like(replay.partitions.flat_grad)
            for stats in history:
                # a backtracked step at the rate it was retaken at
                multiple = (rate.backtracks.get(stats.step) or (1.0, None))[0]
                ngdiff_step(replay, forget.micro_batches(stats.step, rank, replay.engine.device),
                            retain.micro_batches(stats.step, rank, replay.engine.device),
                            NGDIFF, stats.lr * multiple, buffer, stats.step)
            for label, engine in (("probed", built.engine), ("replay", replay.engine)):
                torch.save(optimizer_state(engine), out / f"{name}_{label}_rank{rank}.pt")
            del replay
        weights = consolidated_state_dict(built.engine)
        if rank == 0:
            snapshots[final_steps] = {k: v.clone() for k, v in weights.items()}
            for steps, state in snapshots.items():
                torch.save(state, out / f"{scenario['name']}_step{steps}.pt")
                (out / f"{scenario['name']}_step{steps}.json").write_text(json.dumps(
                    [dict(s.as_dict(), probe_losses=rate.probe_losses.get(s.step),
                          backtrack=rate.backtracks.get(s.step)) for s in history[:steps]]))
            (out / f"{name}_layer0_calls.json").write_text(json.dumps(layer_calls[0]))
            (out / f"{name}_optimizer.json").write_text(
                json.dumps(type(built.engine.optimizer.optimizer).__name__))
        del built
    log.close()


def count_mlp_calls(mlp) -> list[int]:
    """Count the runs of the first layer's MLP: activation checkpointing runs it again in the
    backward pass, which is how a test knows it was on. (Its ``forward`` is wrapped: module
    forward hooks do not fire when torch's checkpoint recomputes.)"""
    calls = [0]
    forward = mlp.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    mlp.forward = counted
    return calls


def optimizer_state(engine) -> dict:
    """This rank's torch optimizer state on the fp32 partitions, plus the master weights."""
    inner = engine.optimizer.optimizer
    state = {f"group{i}": {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inner.state[p].items()}
             for i, p in enumerate(inner.param_groups[0]["params"])}
    state["master"] = [m.detach().clone() for m in engine.optimizer.fp32_partitioned_groups_flat]
    return state


def eval_scores(model, ds_config, data, tokenizer, out: Path, rank, num_examples):
    """Per-example answer log-probs and greedy generations on the first examples of forget10."""
    from ngdiff_ds.data.records import load_qa_split, load_text_split
    from ngdiff_ds.engine import build_inference_engine
    from ngdiff_ds.eval.runner import (answer_logprobs, greedy_answers, greedy_continuations,
                                       text_token_logprobs)

    records = load_qa_split(data, "forget10")[:num_examples]
    built = build_inference_engine(model, ds_config)  # as the retain-only model is built
    scores = answer_logprobs(built.engine, tokenizer, [(r["question"], r["answer"]) for r in records],
                             64, 2)
    generations = greedy_answers(built.engine, tokenizer, [r["question"] for r in records], 8, 2)
    # MUSE side: per-token log-probs of passages and greedy continuations of their first sentence
    passages = [r["text"] for r in load_text_split(data, "full_text")][:num_examples]
    token_logprobs = text_token_logprobs(built.engine, tokenizer, passages, 512, 2)
    continuations = greedy_continuations(built.engine, tokenizer,
                                         [p.split(". ")[0] + "." for p in passages], 8, 2)
    # every metric of the evaluation, on a few examples of each set (7 forget pairs: not
    # divisible by 2 ranks)
    from ngdiff_ds.data.records import load_verbmem_split
    from ngdiff_ds.eval.results import to_results
    from ngdiff_ds.eval.suite import EvalOptions, Reference, evaluate_model

    sets = {"forget": records, "retain": load_qa_split(data, "retain_perturbed")[:3],
            "ra": load_qa_split(data, "real_authors")[:3],
            "wf": load_qa_split(data, "world_facts")[:3],
            "holdout": load_qa_split(data, "holdout")[:3],
            "verbmem": load_verbmem_split(data, "forget10_verbmem")[:3],
            "forget_text": load_text_split(data, "forget10_text")[:3],
            "holdout_text": load_text_split(data, "holdout_text")[:3]}
    reference = Reference(forget_truth_ratios=[0.5] * len(records), mia_auc=0.4, tofu_mia_auc=0.3)
    results = to_results(evaluate_model(built.engine, tokenizer, sets, reference,
                                        EvalOptions(max_length=256, batch_size=2,
                                                    max_new_tokens=8, verbmem_max_new_tokens=8),
                                        note=lambda line: None))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "scores.json").write_text(json.dumps({
            "scores": scores, "generations": generations, "token_logprobs": token_logprobs,
            "continuations": continuations, "results": results}))


def finetune(model, ds_config, data, tokenizer, layout, scenario, out: Path, rank, log) -> None:
    """run_finetune on QA pairs mixed with passages (length-grouped batches: every rank must
    run the same forwards, or ZeRO-3 hangs); rank 0 saves the weights."""
    from ngdiff_ds.trainer import run_finetune

    task = load_task("finetune", data, FINETUNE_SPLITS, tokenizer, FINETUNE_MAX_LENGTH, layout,
                     seed=5)
    built = build_engine(model, ds_config)
    run_finetune(built, task, scenario["steps"], scenario["optimizer"]["params"]["lr"], log,
                 warmup_steps=FINETUNE_WARMUP)
    state = consolidated_state_dict(built.engine)
    if rank == 0:
        torch.save({k: v.clone() for k, v in state.items()}, out / f"{scenario['name']}.pt")


# Shared with the test's reference: what the fine-tune scenario trains on.
FINETUNE_SPLITS = "forget10+full_text"
FINETUNE_MAX_LENGTH = 96
FINETUNE_WARMUP = 2


def nan_skip(model, ds_config, forget, retain, out: Path, rank: int) -> None:
    """A forget loss that is NaN on rank 1 only: the step must be skipped on every rank."""
    built = build_engine(model, ds_config)
    before = [w.clone() for w in built.partitions.master_weights]
    buffer = torch.empty_like(built.partitions.flat_grad)
    device = built.engine.device

    def poisoned_loss(logits, batch):
        loss = gradient_ascent_loss(logits, batch)
        return loss * float("nan") if rank == 1 else loss

    poisoned = Method(poisoned_loss, NGDIFF.retain_loss, NGDIFF.combine_rule)
    stats = ngdiff_step(built, forget.micro_batches(0, rank, device), retain.micro_batches(0, rank, device),
                        poisoned, 1e-3, buffer, 0)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, built.partitions.master_weights))
    finite = all(bool(torch.isfinite(w).all()) for w in built.partitions.master_weights)
    # and the engine still trains normally afterwards
    after = ngdiff_step(built, forget.micro_batches(1, rank, device), retain.micro_batches(1, rank, device),
                        NGDIFF, 1e-3, buffer, 1)
    moved = not all(torch.equal(a, b) for a, b in zip(before, built.partitions.master_weights))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "skipped": stats.skipped, "unchanged": unchanged, "finite": finite,
        "next_skipped": after.skipped, "next_moved": moved}))


def probe_restore(model, ds_config, forget, retain, out: Path, rank: int) -> None:
    """One step, then perturb + forward + restore: record weights and losses around it."""
    built = build_engine(model, ds_config)
    partitions = built.partitions
    buffer = torch.empty_like(partitions.flat_grad)
    device = built.engine.device
    ngdiff_step(built, forget.micro_batches(0, rank, device), retain.micro_batches(0, rank, device),
                NGDIFF, 1e-3, buffer, 0)
    batch = retain.micro_batches(1, rank, device)[0]

    def loss() -> float:
        with torch.no_grad():
            logits = built.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                           batch["input_ids"].flatten()))

    before_weights = [w.clone() for w in partitions.forward_weights]
    before_master = [w.clone() for w in partitions.master_weights]
    loss_before = loss()
    offset = torch.randn(partitions.numel, generator=torch.Generator().manual_seed(rank)) * 1e-2
    partitions.begin_probes()
    partitions.perturb_weights(offset, -2.0)
    loss_perturbed = loss()
    partitions.end_probes()
    loss_after = loss()
    identical = all(torch.equal(a, b) for a, b in zip(before_weights, partitions.forward_weights)) and \
        all(torch.equal(a, b) for a, b in zip(before_master, partitions.master_weights))
    # backtracking: shorten "the step" `offset` to a quarter, as if the current weights were
    # theta_old + offset. The master must become current + (0.25 - 1) offset, the forward
    # weights its cast, and a forward must see them: the same loss as a probe at that point.
    partitions.begin_probes()
    partitions.perturb_weights(offset, -0.75)
    loss_probe_at_quarter = loss()
    partitions.end_probes()
    partitions.shorten_step(offset, 0.25)
    loss_shortened = loss()
    chunks = offset.narrow(0, 0, partitions.numel).split(partitions.group_numels)
    master_error = max(float((m - (old + (-0.75) * c.to(old.dtype))).abs().max()) for m, old, c
                       in zip(partitions.master_weights, before_master, chunks))
    forward_is_cast = all(torch.equal(f, m.to(f.dtype)) for f, m in
                          zip(partitions.forward_weights, partitions.master_weights))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "identical": identical, "loss_before": loss_before, "loss_perturbed": loss_perturbed,
        "loss_after": loss_after, "loss_probe_at_quarter": loss_probe_at_quarter,
        "loss_shortened": loss_shortened, "master_error": master_error,
        "forward_is_cast": forward_is_cast}))


if __name__ == "__main__":
    main()
