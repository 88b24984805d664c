"""The adaptive learning rate (GeN) as a step of the loop: the rate of each step, and after a
fit step the probes along the step just taken, the parabola fit, and its log line.

The loop asks two questions and calls one method::

    probe_now = rate.probes_after(step)          # is this a fit step?
    ngdiff_step(..., rate.lr(step), spare, keep_step_delta=probe_now)
    if probe_now and not skipped:
        rate.probe_and_fit(built, step, spare)   # spare holds delta = theta_new - theta_old

The probe loss is measured at ``theta_old + s * delta`` for each multiple ``s``, on the NEXT
step's batch: on the step's own batch the profile always looks downhill (the direction
contains that batch's normalised retain gradient), which drove the rate up without bound.
The weights are restored bit for bit and the optimizer is never called, so its moments and
step counts are untouched. When the step raised the probe loss by more than the backtracking
threshold, shorter multiples are probed the same way until one is within the rise budget,
and the weights are moved to it (``shorten_step``: the step retaken at that multiple of its
rate). The decisions themselves are pure (adaptive_lr.py).
"""

from __future__ import annotations

import time

import torch

from ngdiff_ds import adaptive_lr
from ngdiff_ds.data.task import TaskData
from ngdiff_ds.distributed import rank_and_world_size
from ngdiff_ds.losses import RETAIN_LOSSES
from ngdiff_ds.run_log import RunLog

RETAIN_NLL = RETAIN_LOSSES.bind("nll")


def _mean_loss(built, micro_batches, loss_fn) -> float:
    """This rank's mean of ``loss_fn`` over the micro-batches at the current weights (no grad)."""
    total = 0.0
    with torch.no_grad():
        for batch in micro_batches:
            logits = built.engine(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"], use_cache=False).logits
            total += float(loss_fn(logits, batch)) / len(micro_batches)
    return total


def probe_losses(built, step_delta: torch.Tensor, multiples, probes) -> list[float]:
    """Probe loss at theta_old + s * delta for each multiple s, weights restored afterwards.

    ``probes`` is a list of (micro-batches, loss function) whose losses are summed. The current
    weights are theta_old + delta, so multiple s is reached by adding (s - 1) * delta.
    """
    partitions = built.partitions
    local = torch.zeros(len(multiples), dtype=torch.float64)
    built.engine.eval()  # dropout would give each multiple a different mask: fit to noise
    partitions.begin_probes()
    for i, multiple in enumerate(multiples):
        partitions.perturb_weights(step_delta, multiple - 1.0)
        local[i] = sum(_mean_loss(built, batches, fn) for batches, fn in probes)
    partitions.end_probes()
    built.engine.train()
    # Sum over data-parallel ranks of per-rank means; / world gives the global-batch mean.
    local = local.to(built.engine.device)  # the group's backend (NCCL) needs device tensors
    partitions.all_reduce_sum(local)
    return (local / built.engine.world_size).tolist()


class AdaptiveRate:
    """The learning rate of each step: the JSON's (or ``--lr``) rate, fitted every ``period``
    steps when ``config.enabled``, times the schedule."""

    def __init__(self, config: adaptive_lr.AdaptiveLRConfig, start_lr: float, forget: TaskData,
                 retain: TaskData, method, log: RunLog,
                 state: adaptive_lr.AdaptiveLRState | None = None):
        self.config = config
        self.state = state or adaptive_lr.AdaptiveLRState(lr=start_lr)
        self.forget, self.retain, self.method, self.log = forget, retain, method, log

    def lr(self, step: int) -> float:
        """The rate of step ``step`` (0-based: ``step`` steps are done)."""
        return adaptive_lr.effective_lr(self.state, self.config, step)

    def probes_after(self, step: int) -> bool:
        """Whether step ``step`` (0-based) is followed by probes and a fit."""
        return adaptive_lr.is_fit_step(self.config, step + 1, self.state)

    def _probe_batches(self, step: int, device) -> list:
        rank, _ = rank_and_world_size()
        probes = []
        if self.config.probe_loss in ("forget", "both"):
            probes.append((self.forget.micro_batches(step, rank, device), self.method.forget_loss))
        if self.config.probe_loss in ("retain", "both"):
            # the retain NLL whichever retaining loss trains: the budget protects the retain
            # answers' likelihood, and a KL to the starting model is 0 at the start (a rise
            # relative to 0 means nothing)
            probes.append((self.retain.micro_batches(step, rank, device), RETAIN_NLL))
        return probes

    def probe_and_fit(self, built, step: int, step_delta: torch.Tensor) -> adaptive_lr.FitResult:
        """Probe along ``step_delta`` on step ``step + 1``'s batch, fit (or backtrack: shorten
        the step just taken), update and log."""
        config = self.config
        start = time.perf_counter()
        probes = self._probe_batches(step + 1, built.device)
        losses = probe_losses(built, step_delta, config.multiples, probes)
        loss_before, loss_after = losses[config.multiples.index(0.0)], None
        if 1.0 in config.multiples:
            loss_after = losses[config.multiples.index(1.0)]
        if loss_after is not None and adaptive_lr.needs_backtrack(config, loss_before, loss_after):
            tried, tried_losses = self._backtrack(built, step_delta, probes, losses)
            self.state, fit = adaptive_lr.backtrack(self.state, config, losses, tried,
                                                    tried_losses)
            built.partitions.shorten_step(step_delta, fit.step_multiple)
        else:
            self.state, fit = adaptive_lr.update(self.state, config, losses)
        probe_time = time.perf_counter() - start
        # every field, the probe losses and the backtracking tries included (multiples: config)
        self.log.record("lr_fit", step, {**{k: v for k, v in fit.to_dict().items()
                                            if k != "multiples"}, "probe_time": probe_time})
        self.log.print(_fit_line(config, step, fit))
        return fit

    def _backtrack(self, built, step_delta, probes, losses: list[float]):
        """Probe ever shorter steps until one is within the rise budget (every rank takes the
        same decisions: the losses are all-reduced)."""
        loss_before = losses[self.config.multiples.index(0.0)]
        tried, tried_losses = [], []
        for multiple in adaptive_lr.backtrack_multiples(self.config, losses):
            tried.append(multiple)
            tried_losses.append(probe_losses(built, step_delta, [multiple], probes)[0])
            if not adaptive_lr.exceeds_budget(self.config, loss_before, tried_losses[-1]):
                break
        return tried, tried_losses


def _fit_line(config: adaptive_lr.AdaptiveLRConfig, step: int, fit: adaptive_lr.FitResult) -> str:
    line = (f"step {step:5d} | lr fit: {config.probe_loss} loss "
            + ", ".join(f"L({m:+g})={v:.4f}" for m, v in zip(fit.multiples, fit.losses))
            + f" -> {fit.reason}")
    if fit.accepted:
        line += f", s*={fit.optimal_multiple:.3g}"
    if fit.rule == "rise budget":
        line += f"; rate for the rise budget {config.max_rise:g}"
    if fit.rule == "backtrack":
        line += (f"; step shortened to {fit.step_multiple:.3g} x after "
                 f"{len(fit.backtrack_losses)} tries (last L={fit.backtrack_losses[-1]:.4f})")
    return line + f"; base lr {fit.lr_before:.3g} -> {fit.lr_after:.3g}" + \
        (" (refit after the next step)" if fit.refit_next else "")
