"""The training loops: NGDiff unlearning, plain fine-tuning, and answer-loss evaluation.

Reads top to bottom; ZeRO-3 details stay behind ``ZeroPartitions`` (zero3.py) and the math in
combine.py / losses.py. One NGDiff step (design.md, steps 1-5):

1. forget micro-batches: forward + backward each, the gradient accumulates in this rank's
   flat partition; copy it out into a preallocated buffer (the one extra partition we keep);
2. reset, retain micro-batches: the retain gradient is left in the partition;
3. one all-reduce of the local Gram sums (and the losses) gives both global norms;
4. the direction d = a*g_r + b*g_f is formed in place in the partition;
5. set the learning rate and step;
6. on a fit step of the adaptive rate (GeN), probe the loss along the step just taken and
   restore the weights; ``adaptive_lr.update`` turns the probe losses into the next rate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ngdiff_ds import adaptive_lr
from ngdiff_ds.combine import COMBINE_RULES, Gram, combine_in_place, local_gram
from ngdiff_ds.config import UnlearnSettings
from ngdiff_ds.data.qa import StepBatches, collate, length_cut
from ngdiff_ds.engine import TrainingEngine, set_learning_rate
from ngdiff_ds.losses import FORGET_LOSSES, answer_nll, per_example_nll
from ngdiff_ds.run_log import RunLog


@dataclass
class TaskData:
    """One task's encoded examples and the deterministic per-step batching over ranks."""

    name: str
    examples: list[dict]
    batches: StepBatches
    pad_token_id: int

    def micro_batches(self, step: int, rank: int, device) -> list[dict[str, torch.Tensor]]:
        """This rank's K micro-batches of ``step``."""
        out = []
        for k in range(self.batches.micro_batches_per_step):
            indices = self.batches.micro_batch_indices(step, rank, k)
            batch = collate([self.examples[i] for i in indices], self.pad_token_id)
            out.append({name: t.to(device) for name, t in batch.items()})
        return out

    def length_grouped_batches(self, step: int, rank: int, device) -> tuple[list[dict], list[float]]:
        """This rank's K micro-batches of ``step``, each cut into short and long rows where that
        saves padding, and each piece's weight (its share of the micro-batch, over K): the
        weighted losses sum to the same per-example mean as the K micro-batches.

        For training sets that mix short QA pairs with long passages. The cut length comes from
        the step's global batch, which every rank knows, so every rank runs the same number of
        forwards (ZeRO-3 gathers parameters collectively in each): a rank with no row on one
        side runs one of its rows there with weight 0.
        """
        cut = length_cut([len(self.examples[i]["input_ids"])
                          for i in self.batches.global_batch_indices(step)])
        out, weights = [], []
        micro_batches = self.batches.micro_batches_per_step
        for k in range(micro_batches):
            indices = self.batches.micro_batch_indices(step, rank, k)
            if cut is None:
                pieces = [indices]
            else:
                pieces = [[i for i in indices if len(self.examples[i]["input_ids"]) <= cut],
                          [i for i in indices if len(self.examples[i]["input_ids"]) > cut]]
            for piece in pieces:
                batch = collate([self.examples[i] for i in (piece or indices[:1])], self.pad_token_id)
                out.append({name: t.to(device) for name, t in batch.items()})
                weights.append(len(piece) / (len(indices) * micro_batches))
        return out, weights


def _task_backward(built: TrainingEngine, micro_batches, loss_fn,
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
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = loss_fn(logits, batch["labels"]) * weight
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
    probe_losses: list[float] | None = None  # in the order of the probe multiples

    def as_dict(self) -> dict:
        values = dict(self.__dict__)
        values.pop("probe_losses")  # logged with the fit it belongs to
        return values


def _probe_task_loss(built: TrainingEngine, micro_batches, loss_fn) -> float:
    """This rank's mean of ``loss_fn`` over the micro-batches at the current weights (no grad)."""
    total = 0.0
    with torch.no_grad():
        for batch in micro_batches:
            logits = built.engine(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"]).logits
            total += float(loss_fn(logits, batch["labels"])) / len(micro_batches)
    return total


def _probe_losses(built: TrainingEngine, step_delta: torch.Tensor, multiples,
                  probes) -> list[float]:
    """Probe loss at theta_old + s * delta for each multiple s, weights restored afterwards.

    ``probes`` is a list of (micro-batches, loss function) whose losses are summed. The current
    weights are theta_old + delta, so multiple s is reached by adding (s - 1) * delta. The
    optimizer is never called here, so its moments and step counts are untouched.
    """
    partitions = built.partitions
    local = torch.zeros(len(multiples), dtype=torch.float64)
    built.engine.eval()  # dropout would give each multiple a different mask: fit to noise
    partitions.begin_probes()
    for i, multiple in enumerate(multiples):
        partitions.perturb_weights(step_delta, multiple - 1.0)
        local[i] = sum(_probe_task_loss(built, batches, fn) for batches, fn in probes)
    partitions.end_probes()
    built.engine.train()
    # Sum over data-parallel ranks of per-rank means; / world gives the global-batch mean.
    local = local.to(built.engine.device)  # the group's backend (NCCL) needs device tensors
    partitions.all_reduce_sum(local)
    return (local / built.engine.world_size).tolist()


def ngdiff_step(built: TrainingEngine, forget_micro_batches, retain_micro_batches,
                forget_loss_fn, combine_rule, lr: float, forget_grad: torch.Tensor,
                step: int, probe_multiples=None, probes=None) -> StepStats:
    """One NGDiff step; ``forget_grad`` is a preallocated buffer of this rank's partition size.

    With ``probe_multiples`` the step is followed by the learning-rate probes on ``probes``
    (list of (micro-batches, loss function)); ``forget_grad``, free once the direction is
    formed, holds the step taken, so the probes need no extra full-size buffer.
    """
    start = time.perf_counter()
    partitions = built.partitions

    forget_loss, forget_tokens = _task_backward(built, forget_micro_batches, forget_loss_fn)
    forget_grad.copy_(partitions.flat_grad)
    retain_loss, retain_tokens = _task_backward(built, retain_micro_batches, answer_nll)
    retain_grad = partitions.flat_grad

    # One all-reduce for everything global: the three Gram sums (disjoint slices -> sums over
    # ranks are the global sums) plus the losses and token counts (summed, then averaged).
    local = torch.cat([local_gram(forget_grad, retain_grad).to(forget_loss.device),
                       torch.stack([forget_loss, retain_loss, forget_tokens + retain_tokens])])
    partitions.all_reduce_sum(local)
    totals = local.tolist()
    world = built.engine.world_size
    gram = Gram(forget_sq=totals[0], retain_sq=totals[1], dot=totals[2])

    forget_loss_mean, retain_loss_mean = totals[3] / world, totals[4] / world
    skipped = not gram.is_usable
    probe_values = None
    if not skipped:
        retain_coef, forget_coef = combine_rule(gram)
        combine_in_place(retain_grad, forget_grad, retain_coef, forget_coef)
        partitions.commit_direction()
        if probe_multiples is not None:
            partitions.copy_master_to(forget_grad)  # theta_old
        set_learning_rate(built.engine, lr)
        built.engine.step()
        if probe_multiples is not None:
            partitions.subtract_from_master(forget_grad)  # delta = theta_new - theta_old
            probe_values = _probe_losses(built, forget_grad, probe_multiples, probes)
    else:
        # Never hand a NaN/zero direction to the optimizer; DeepSpeed would skip silently.
        partitions.reset_grads()

    elapsed = time.perf_counter() - start
    return StepStats(step=step, skipped=skipped, forget_loss=forget_loss_mean,
                     retain_loss=retain_loss_mean, forget_grad_norm=gram.forget_norm,
                     retain_grad_norm=gram.retain_norm, cosine=gram.cosine, lr=lr,
                     step_time=elapsed, tokens_per_s=totals[5] / elapsed,
                     probe_losses=probe_values)


def _probe_batches(probe_loss: str, forget: TaskData, retain: TaskData, forget_loss_fn,
                   step: int, rank: int, device) -> list:
    """The probe data: the micro-batches of the NEXT step, i.e. examples the step was not
    computed on. Probing on the step's own batch always looks downhill (the direction
    contains that batch's normalised retain gradient) and drives the rate up without bound."""
    probes = []
    if probe_loss in ("forget", "both"):
        probes.append((forget.micro_batches(step, rank, device), forget_loss_fn))
    if probe_loss in ("retain", "both"):
        probes.append((retain.micro_batches(step, rank, device), answer_nll))
    return probes


class TooManySkippedSteps(RuntimeError):
    pass


def run_unlearning(built: TrainingEngine, forget: TaskData, retain: TaskData,
                   settings: UnlearnSettings, log: RunLog, rank: int,
                   evaluate=None, eval_every: int = 0) -> list[StepStats]:
    """The NGDiff loop: ``settings.max_steps`` steps, logged every ``log_every``.

    The final adaptive-rate state is left in ``settings.lr_state`` (checkpoints carry it).
    ``evaluate(steps_done)`` is called on every rank after every ``eval_every`` steps.
    """
    engine = built.engine
    combine_rule = COMBINE_RULES[settings.combine]
    forget_loss_fn = FORGET_LOSSES[settings.forget_loss]
    start_lr = settings.lr if settings.lr is not None else engine.optimizer.param_groups[0]["lr"]
    rate = settings.adaptive
    lr_state = settings.lr_state or adaptive_lr.AdaptiveLRState(lr=start_lr)
    forget_grad = torch.empty_like(built.partitions.flat_grad)  # the one extra partition
    history = []
    consecutive_skips = 0
    progress = tqdm(range(settings.max_steps), desc="ngdiff", disable=rank != 0, dynamic_ncols=True)
    for step in progress:
        lr = adaptive_lr.effective_lr(lr_state, rate, step)
        fit_now = adaptive_lr.is_fit_step(rate, step + 1)
        stats = ngdiff_step(built, forget.micro_batches(step, rank, engine.device),
                            retain.micro_batches(step, rank, engine.device),
                            forget_loss_fn, combine_rule, lr, forget_grad, step,
                            probe_multiples=rate.multiples if fit_now else None,
                            probes=_probe_batches(rate.probe_loss, forget, retain, forget_loss_fn,
                                                  step + 1, rank, engine.device) if fit_now else None)
        history.append(stats)
        log.record("train", step, stats.as_dict())
        if stats.probe_losses is not None:
            lr_state, fit = adaptive_lr.update(lr_state, rate, stats.probe_losses)
            log.record("lr_fit", step, {k: v for k, v in fit.to_dict().items()
                                        if not isinstance(v, list)})
            log.print(f"step {step:5d} | lr fit: {rate.probe_loss} loss "
                      + ", ".join(f"L({m:+g})={v:.4f}" for m, v in zip(fit.multiples, fit.losses))
                      + f" -> {fit.reason}"
                      + (f", s*={fit.optimal_multiple:.3g}" if fit.accepted else "")
                      + f"; base lr {fit.lr_before:.3g} -> {fit.lr_after:.3g}")
        if stats.skipped:
            consecutive_skips += 1
            log.print(f"step {step}: SKIPPED (forget_grad_norm={stats.forget_grad_norm:.4g}, "
                      f"retain_grad_norm={stats.retain_grad_norm:.4g}); weights unchanged")
            if consecutive_skips >= settings.max_consecutive_skips:
                raise TooManySkippedSteps(
                    f"{consecutive_skips} consecutive steps had a zero or non-finite gradient "
                    f"norm (last: forget {stats.forget_grad_norm}, retain {stats.retain_grad_norm});"
                    " stopping instead of running on")
            continue
        consecutive_skips = 0
        progress.set_postfix(forget=f"{stats.forget_loss:.3f}", retain=f"{stats.retain_loss:.3f}")
        if step % settings.log_every == 0 or step == settings.max_steps - 1:
            log.print(f"step {step:5d} | forget_loss {stats.forget_loss:8.4f} | retain_loss "
                      f"{stats.retain_loss:7.4f} | |g_f| {stats.forget_grad_norm:9.4g} | |g_r| "
                      f"{stats.retain_grad_norm:9.4g} | cos {stats.cosine:+.3f} | lr {stats.lr:.3g}"
                      f" | {stats.step_time * 1000:6.0f} ms | {stats.tokens_per_s:8.0f} tok/s")
        if evaluate is not None and eval_every > 0 and (step + 1) % eval_every == 0 \
                and step + 1 < settings.max_steps:
            evaluate(step + 1)
    settings.lr_state = lr_state
    return history


def run_finetune(built: TrainingEngine, data: TaskData, steps: int, peak_lr: float,
                 log: RunLog, rank: int, warmup_steps: int = 10) -> float:
    """Plain next-token (answer) loss training; returns the last step's mean loss.

    Linear warm-up then cosine decay to 10 % of ``peak_lr``: memorising a fixed set quickly
    wants a high rate early and a low one at the end.
    """
    engine = built.engine
    loss = math.nan
    progress = tqdm(range(steps), desc=f"finetune {data.name}", disable=rank != 0, dynamic_ncols=True)
    for step in progress:
        if step < warmup_steps:
            lr = peak_lr * (step + 1) / warmup_steps
        else:
            progress_fraction = (step - warmup_steps) / max(1, steps - warmup_steps)
            lr = peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_fraction)))
        micro_batches, weights = data.length_grouped_batches(step, rank, engine.device)
        total, _ = _task_backward(built, micro_batches, answer_nll, weights)
        set_learning_rate(engine, lr)
        engine.step()
        built.partitions.all_reduce_sum(total)  # sum of rank means -> mean over the global batch
        loss = total.item() / engine.world_size
        log.record("finetune", step, {"loss": loss, "lr": lr})
        progress.set_postfix(loss=f"{loss:.3f}")
    return loss


@torch.no_grad()
def evaluate_answer_nll(built: TrainingEngine, examples: list[dict], micro_batch_size: int,
                        pad_token_id: int, rank: int, world_size: int) -> float:
    """Mean per-example NLL of the training targets (the answer of a QA pair, every token of
    a text) over ``examples``, sharded over ranks.

    Under ZeRO-3 every forward gathers parameters collectively, so all ranks must run the
    same number of forwards: a rank whose shard is exhausted runs a dummy batch whose result
    is discarded.
    """
    engine = built.engine
    was_training = engine.module.training
    engine.eval()
    mine = list(range(rank, len(examples), world_size))
    per_rank = math.ceil(len(examples) / world_size)
    num_batches = math.ceil(per_rank / micro_batch_size)
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)  # nll sum, count
    for b in range(num_batches):
        indices = mine[b * micro_batch_size:(b + 1) * micro_batch_size]
        batch = collate([examples[i] for i in (indices or [0])], pad_token_id)
        batch = {name: t.to(engine.device) for name, t in batch.items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if indices:
            nll = per_example_nll(logits, batch["labels"])
            totals[0] += nll.double().sum()
            totals[1] += len(indices)
    built.partitions.all_reduce_sum(totals)  # each example is counted on exactly one rank
    if was_training:
        engine.train()
    return (totals[0] / totals[1]).item()
