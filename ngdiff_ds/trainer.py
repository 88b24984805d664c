"""The training loops: NGDiff unlearning and plain fine-tuning.

Reads top to bottom; ZeRO-3 details stay behind ``ZeroPartitions`` (zero3.py), the math in
combine.py / losses.py, and the adaptive rate's probes in lr_probe.py. One NGDiff step
(docs/design.md, "The step"):

1. forget micro-batches: forward + backward each, the gradient accumulates in this rank's
   flat partition; copy it out into a preallocated buffer (the one extra partition we keep);
2. reset, retain micro-batches: the retain gradient is left in the partition;
3. one all-reduce of the local Gram sums (and the losses) gives both global norms;
4. the direction d = a*g_r + b*g_f is formed in place in the partition;
5. set the learning rate and step.

On a fit step of the adaptive rate (GeN) the loop then probes the loss along the step just
taken (lr_probe.py), which the spare buffer holds, and restores the weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from ngdiff_ds.combine import Gram, combine_in_place, local_gram, step_coefficients
from ngdiff_ds.data.task import TaskData
from ngdiff_ds.distributed import rank_and_world_size
from ngdiff_ds.engine import TrainingEngine, set_learning_rate
from ngdiff_ds import preemption
from ngdiff_ds.errors import Preempted, TrainingDiverged
from ngdiff_ds.losses import RETAIN_LOSSES
from ngdiff_ds.lr_probe import AdaptiveRate
from ngdiff_ds.run_log import RunLog

Loss = Callable[[torch.Tensor, dict], torch.Tensor]  # (logits, batch) -> scalar to minimise


def _task_backward(built: TrainingEngine, micro_batches, loss_fn: Loss,
                   weights: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the gradient of ``loss_fn`` averaged over the micro-batches (and ranks).

    Returns this rank's mean loss and number of input tokens as float64 tensors on the device
    (no host sync per micro-batch). Each micro-batch loss is divided by K (or multiplied by its
    ``weights`` entry) so that the backwards sum to the mean; DeepSpeed's reduce-scatter
    averages over the data-parallel ranks.
    """
    engine = built.engine
    built.partitions.reset_grads()
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    tokens = torch.zeros((), dtype=torch.float64, device=engine.device)
    if weights is None:
        weights = [1.0 / len(micro_batches)] * len(micro_batches)
    for batch, weight in zip(micro_batches, weights):
        # use_cache=False: HF would otherwise build a KV cache that training never reads
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).logits
        loss = loss_fn(logits, batch) * weight
        engine.backward(loss)
        loss_sum += loss.detach()
        tokens += batch["attention_mask"].sum()
    return loss_sum, tokens


@dataclass
class StepStats:
    step: int
    skipped: bool
    forget_loss: float
    retain_loss: float
    forget_grad_norm: float
    retain_grad_norm: float
    cosine: float
    lr: float
    step_time: float
    tokens_per_s: float
    stop_votes: int = 0  # ranks that asked to stop (preemption), from the step's all-reduce

    def as_dict(self) -> dict:
        """The logged row (the stop votes are control flow, not a metric)."""
        return {k: v for k, v in self.__dict__.items() if k != "stop_votes"}


@dataclass(frozen=True)
class Method:
    """What one unlearning step computes, bound once per run from the registries."""

    forget_loss: Loss
    retain_loss: Loss
    combine_rule: Callable[[Gram], tuple[float, float]]
    # batch fields each loss needs beyond the tokens (registry ``needs``; starting_model.py)
    forget_needs: tuple[str, ...] = ()
    retain_needs: tuple[str, ...] = ()


def ngdiff_step(built: TrainingEngine, forget_micro_batches, retain_micro_batches,
                method: Method, lr: float, spare: torch.Tensor, step: int,
                keep_step_delta: bool = False, stop_vote: bool = False) -> StepStats:
    """One NGDiff step; ``spare`` is a preallocated buffer of this rank's partition size.

    ``spare`` first holds the forget gradient. With ``keep_step_delta`` it holds, afterwards,
    the step just taken (theta_new - theta_old, this rank's slice) for the adaptive rate's
    probes: free once the direction is formed, it costs no extra full-size buffer.
    ``stop_vote``: this rank asks to stop after this step (preemption); the votes travel in
    the step's all-reduce, so every rank learns the same count.
    """
    start = time.perf_counter()
    partitions = built.partitions

    forget_loss, forget_tokens = _task_backward(built, forget_micro_batches, method.forget_loss)
    forget_grad = spare.copy_(partitions.flat_grad)
    retain_loss, retain_tokens = _task_backward(built, retain_micro_batches, method.retain_loss)
    retain_grad = partitions.flat_grad

    # One all-reduce for everything global: the three Gram sums (disjoint slices -> sums over
    # ranks are the global sums), the losses and token counts (summed, then averaged), and
    # the ranks' stop votes (summed: any vote stops every rank after this step).
    vote = torch.full((1,), float(stop_vote), dtype=torch.float64, device=forget_loss.device)
    local = torch.cat([local_gram(forget_grad, retain_grad).to(forget_loss.device),
                       torch.stack([forget_loss, retain_loss, forget_tokens + retain_tokens]),
                       vote])
    partitions.all_reduce_sum(local)
    totals = local.tolist()
    world = built.engine.world_size
    gram = Gram(forget_sq=totals[0], retain_sq=totals[1], dot=totals[2])

    coefficients = step_coefficients(method.combine_rule, gram)
    skipped = coefficients is None
    if not skipped:
        retain_coef, forget_coef = coefficients
        combine_in_place(retain_grad, forget_grad, retain_coef, forget_coef)
        partitions.commit_direction()
        if keep_step_delta:
            partitions.copy_master_to(spare)  # theta_old
        set_learning_rate(built.engine, lr)
        built.engine.step()
        if keep_step_delta:
            partitions.subtract_from_master(spare)  # delta = theta_new - theta_old
    else:
        # Never hand a NaN/zero direction to the optimizer; DeepSpeed would skip silently.
        partitions.reset_grads()

    elapsed = time.perf_counter() - start
    return StepStats(step=step, skipped=skipped, forget_loss=totals[3] / world,
                     retain_loss=totals[4] / world, forget_grad_norm=gram.forget_norm,
                     retain_grad_norm=gram.retain_norm, cosine=gram.cosine, lr=lr,
                     step_time=elapsed, tokens_per_s=totals[5] / elapsed,
                     stop_votes=int(totals[6]))


@dataclass
class LoopState:
    """The loop's counters: what a checkpoint must carry besides weights and the rate."""

    steps_done: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0


def run_unlearning(built: TrainingEngine, forget: TaskData, retain: TaskData, method: Method,
                   rate: AdaptiveRate, max_steps: int, log: RunLog, log_every: int = 1,
                   max_consecutive_skips: int = 10, evaluate=None, eval_every: int = 0,
                   state: LoopState | None = None, checkpoint=None) -> list[StepStats]:
    """The NGDiff loop: from ``state.steps_done`` to ``max_steps`` steps, printed every
    ``log_every``.

    ``rate`` sets each step's learning rate and, on its fit steps, probes along the step just
    taken. After a step: ``evaluate(steps_done)`` every ``eval_every`` steps, then
    ``checkpoint(state, evaluated, stopping)``; when any rank got a preemption signal
    (preemption.py) every rank stops after the same step and raises ``Preempted``.
    """
    state = state or LoopState()
    rank, _ = rank_and_world_size()
    device = built.device
    spare = torch.empty_like(built.partitions.flat_grad)  # the one extra partition
    history = []
    progress = tqdm(range(state.steps_done, max_steps), desc="ngdiff", disable=rank != 0,
                    dynamic_ncols=True, initial=state.steps_done, total=max_steps)
    for step in progress:
        probe_now = rate.probes_after(step)
        stats = ngdiff_step(built, forget.micro_batches(step, rank, device),
                            retain.micro_batches(step, rank, device), method, rate.lr(step),
                            spare, step, keep_step_delta=probe_now,
                            stop_vote=preemption.requested())
        history.append(stats)
        log.record("train", step, stats.as_dict())
        if probe_now and not stats.skipped:
            rate.probe_and_fit(built, step, spare)
        _count_skips(state, stats, log, max_consecutive_skips)
        state.steps_done = step + 1
        if not stats.skipped:
            progress.set_postfix(forget=f"{stats.forget_loss:.3f}", retain=f"{stats.retain_loss:.3f}")
            if step % log_every == 0 or step == max_steps - 1:
                log.print(_step_line(stats))
        evaluated = evaluate is not None and eval_every > 0 and state.steps_done % eval_every == 0 \
            and state.steps_done < max_steps
        if evaluated:
            evaluate(state.steps_done)
        if checkpoint is not None:
            checkpoint(state, evaluated, stats.stop_votes > 0)
        if stats.stop_votes > 0:
            raise Preempted(f"{stats.stop_votes} rank(s) got a preemption signal; stopped after "
                            f"step {step} with a checkpoint; resume with --resume auto")
    return history


def _count_skips(state: LoopState, stats: StepStats, log: RunLog, limit: int) -> None:
    if not stats.skipped:
        state.consecutive_skips = 0
        return
    state.skipped_steps += 1
    state.consecutive_skips += 1
    log.print(f"step {stats.step}: SKIPPED (forget_grad_norm={stats.forget_grad_norm:.4g}, "
              f"retain_grad_norm={stats.retain_grad_norm:.4g}); weights unchanged")
    if state.consecutive_skips >= limit:
        raise TrainingDiverged(
            f"{state.consecutive_skips} consecutive steps had a zero or non-finite gradient "
            f"norm (last: forget {stats.forget_grad_norm}, retain {stats.retain_grad_norm}); "
            "stopping instead of running on")


def _step_line(stats: StepStats) -> str:
    return (f"step {stats.step:5d} | forget_loss {stats.forget_loss:8.4f} | retain_loss "
            f"{stats.retain_loss:7.4f} | |g_f| {stats.forget_grad_norm:9.4g} | |g_r| "
            f"{stats.retain_grad_norm:9.4g} | cos {stats.cosine:+.3f} | lr {stats.lr:.3g}"
            f" | {stats.step_time * 1000:6.0f} ms | {stats.tokens_per_s:8.0f} tok/s")


def finetune_rate(step: int, steps: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warm-up then cosine decay to 10 % of ``peak_lr``: memorising a fixed set quickly
    wants a high rate early and a low one at the end."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress_fraction = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_fraction)))


def run_finetune(built: TrainingEngine, data: TaskData, steps: int, peak_lr: float, log: RunLog,
                 loss_fn: Loss | None = None, warmup_steps: int = 10) -> float:
    """Plain training (default: the answer NLL) at ``finetune_rate``; returns the last step's
    mean loss."""
    loss_fn = loss_fn or RETAIN_LOSSES.bind("nll")
    rank, _ = rank_and_world_size()
    engine = built.engine
    loss = math.nan
    progress = tqdm(range(steps), desc=f"finetune {data.name}", disable=rank != 0, dynamic_ncols=True)
    for step in progress:
        lr = finetune_rate(step, steps, peak_lr, warmup_steps)
        micro_batches, weights = data.length_grouped_batches(step, rank, engine.device)
        total, _ = _task_backward(built, micro_batches, loss_fn, weights)
        set_learning_rate(engine, lr)
        engine.step()
        built.partitions.all_reduce_sum(total)  # sum of rank means -> mean over the global batch
        loss = total.item() / engine.world_size
        log.record("finetune", step, {"loss": loss, "lr": lr})
        progress.set_postfix(loss=f"{loss:.3f}")
    return loss
