"""Causal-LM losses with -100 masking, and the registered forgetting and retaining losses
(each a loss to minimise).

Conventions (as in Hugging Face): ``logits[:, t]`` predicts ``labels[:, t + 1]``; the shift
happens inside these functions. Labels are ``IGNORE_INDEX`` at positions that do not count
(question tokens, padding).

A registered loss is ``fn(logits, batch)`` or, with options, ``fn(logits, batch, options)``:
``batch`` is the collated micro-batch (``input_ids``, ``attention_mask``, ``labels``, and any
extra field a method adds, such as reference log-probabilities). See ``registry.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ngdiff_ds.errors import ConfigError
from ngdiff_ds.registry import Registry

# Label value ignored by torch's cross-entropy (and by HF causal-LM losses).
IGNORE_INDEX = -100
# Batch fields of the losses that compare with the model before unlearning (starting_model.py
# provides them): per example, log p_ref(y|x) of its targets (a sum over tokens, as
# ``per_example_target_logprob``); per batch, the starting model's logits [batch, seq, vocab].
REFERENCE_LOGPROB = "reference_logprob"
REFERENCE_LOGITS = "reference_logits"

FORGET_LOSSES = Registry("forgetting loss", "--forget-loss")
RETAIN_LOSSES = Registry("retaining loss", "--retain-loss")


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            "expected logits [batch, seq, vocab] and labels [batch, seq], got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )


def _next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """``targets[:, t] = labels[:, t + 1]``; the last position has no target (-100).

    Shifting the labels instead of the logits keeps the logits a view (no copy of the
    [batch, seq, vocab] tensor just to drop its last position).
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def _target_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat positions whose next token is an unmasked label, and those positions' targets."""
    targets = _next_token_targets(labels).reshape(-1)
    target_positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return target_positions, targets.index_select(0, target_positions)


def _rows_at(logits: torch.Tensor, target_positions: torch.Tensor) -> torch.Tensor:
    """The [targets, vocab] rows of ``logits`` at those positions, float32 for low-precision
    logits (float64 stays float64): only these rows are upcast, never the whole tensor."""
    rows = logits.reshape(-1, logits.shape[-1]).index_select(0, target_positions)
    return rows if rows.dtype in (torch.float32, torch.float64) else rows.float()


def _sums_per_example(token_values: torch.Tensor, target_positions: torch.Tensor,
                      labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example (shape [batch]): the sum of its target tokens' values and their count."""
    batch_size, seq_len = labels.shape
    example_of_token = torch.div(target_positions, seq_len, rounding_mode="floor")
    sums = token_values.new_zeros(batch_size).index_add_(0, example_of_token, token_values)
    counts = token_values.new_zeros(batch_size).index_add_(0, example_of_token,
                                                           torch.ones_like(token_values))
    return sums, counts


def _target_nll_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the sum of the NLL of its unmasked target tokens and how many there are,
    two tensors of shape [batch] (float32 for bf16/fp16/float32 logits, float64 for float64).
    """
    _check_shapes(logits, labels)
    target_positions, targets = _target_rows(logits, labels)
    token_nll = F.cross_entropy(_rows_at(logits, target_positions), targets, reduction="none")
    return _sums_per_example(token_nll, target_positions, labels)


def per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over each example's unmasked target tokens, shape [batch].

    The math is float32 even for bf16/fp16 logits (float64 logits stay float64). An example
    with no unmasked target token gives 0 (and a zero gradient), never nan.
    """
    nll_sums, token_counts = _target_nll_sums(logits, labels)
    # clamp: an example without target tokens has sum 0 and count 0 -> 0 / 1 = 0.
    return nll_sums / token_counts.clamp(min=1)


def per_example_target_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p(y|x)`` of each example: the sum of its target tokens' log-probabilities, shape
    [batch] (0 for an example without target tokens). As open-unlearning's
    ``compute_batch_nll`` (negated): a sum over tokens, not a mean."""
    return -_target_nll_sums(logits, labels)[0]


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Scalar NLL: the mean over examples of each example's mean token NLL.

    Why per-example mean, then mean over examples (rather than one mean over all tokens):
    each example then weighs the same no matter how many answer tokens it has or which other
    examples share its micro-batch. The loss of a global batch is the plain average of the
    losses of equal-sized micro-batches, so averaging gradients over micro-batches (loss / K)
    and over data-parallel ranks gives exactly the gradient of the whole batch: the gradient
    does not depend on how the batch is split. A token mean would weight each micro-batch by
    its own token count and break that.

    An example with no answer token contributes 0 and still counts in the mean.
    """
    _check_shapes(logits, labels)
    if labels.shape[0] == 0:
        raise ValueError("answer_nll needs at least one example")
    return per_example_nll(logits, labels).mean()


def _positive_finite(owner: str, name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{owner}'s {name} must be a finite number > 0, got {value!r}")


@FORGET_LOSSES.register("ga")
def gradient_ascent_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Gradient ascent (Jang et al. 2023, arXiv 2210.01504): minimise ``-answer_nll`` of the
    forget batch."""
    return -answer_nll(logits, batch["labels"])


@dataclass(frozen=True)
class NPOOptions:
    """``--forget-loss-option beta=...``: NPO's inverse temperature (0.1 in its paper's TOFU
    runs and in open-unlearning's NPO config)."""

    beta: float = 0.1

    def __post_init__(self) -> None:
        _positive_finite("npo", "beta", self.beta)


@FORGET_LOSSES.register("npo", NPOOptions, needs=(REFERENCE_LOGPROB,))
def npo_loss(logits: torch.Tensor, batch: dict, options: NPOOptions = NPOOptions()) -> torch.Tensor:
    """Negative preference optimisation (Zhang et al. 2024, arXiv 2404.05868), per example

        -(2 / beta) * log sigmoid(-beta * (log p(y|x) - log p_ref(y|x)))

    and the mean over examples. ``log p(y|x)`` is the sum of the target tokens' log-probs (as
    open-unlearning's ``compute_dpo_loss``); ``p_ref`` is the model before unlearning, whose
    values the run computed once before step 0 (``batch["reference_logprob"]``). The gradient
    is ``2 sigmoid(beta r) * grad log p(y|x)`` per example (r the log-ratio): at the start
    (p = p_ref, every example (2/beta) log 2) exactly that of gradient ascent on the summed
    NLL; as ``log p`` falls below ``log p_ref`` the weight decays to 0 and the loss to its
    lower bound 0.
    """
    log_p = per_example_target_logprob(logits, batch["labels"])
    log_ratio = log_p - batch[REFERENCE_LOGPROB].to(log_p.dtype)
    return (-2.0 / options.beta * F.logsigmoid(-options.beta * log_ratio)).mean()


@dataclass(frozen=True)
class SimNPOOptions:
    """``--forget-loss-option beta=... delta=...``: SimNPO's inverse temperature and reward
    margin, open-unlearning's names (the paper's margin gamma is beta * delta). Defaults:
    open-unlearning's SimNPO config (beta 4.5, delta 0), from the SimNPO authors' TOFU
    config."""

    beta: float = 4.5
    delta: float = 0.0

    def __post_init__(self) -> None:
        _positive_finite("simnpo", "beta", self.beta)
        if not (isinstance(self.delta, (int, float)) and math.isfinite(self.delta)):
            raise ConfigError(f"simnpo's delta must be a finite number, got {self.delta!r}")


@FORGET_LOSSES.register("simnpo", SimNPOOptions)
def simnpo_loss(logits: torch.Tensor, batch: dict,
                options: SimNPOOptions = SimNPOOptions()) -> torch.Tensor:
    """SimNPO (Fan et al. 2024, arXiv 2410.07163): reference-free, length-normalised, per
    example

        -(2 / beta) * log sigmoid(beta * (NLL(y|x) / |y| - delta))

    (``-log p(y|x) / |y|`` is ``per_example_nll``), then the mean over examples. ``|y|`` is the
    number of target tokens; open-unlearning divides by the labels that are not -100 before
    the shift, which is the same for QA pairs (the first label is a masked question token) and
    one more for a text whose first token is a label.
    """
    nll = per_example_nll(logits, batch["labels"])
    return (-2.0 / options.beta * F.logsigmoid(options.beta * (nll - options.delta))).mean()


@RETAIN_LOSSES.register("nll")
def retain_nll_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Keep the retain answers likely: ``answer_nll`` of the retain batch."""
    return answer_nll(logits, batch["labels"])


def per_example_kl(logits: torch.Tensor, reference_logits: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref || p)`` of the next-token distributions, averaged over each example's target
    positions (the positions whose next token is an unmasked label), shape [batch]; 0 for an
    example without targets. float32 math for low-precision logits, as ``per_example_nll``.
    """
    _check_shapes(logits, labels)
    if reference_logits.shape != logits.shape:
        raise ValueError(f"reference logits {tuple(reference_logits.shape)} do not match the "
                         f"logits {tuple(logits.shape)}")
    target_positions, _ = _target_rows(logits, labels)
    log_p = F.log_softmax(_rows_at(logits, target_positions), dim=-1)
    log_p_ref = F.log_softmax(_rows_at(reference_logits, target_positions).to(log_p.dtype), dim=-1)
    token_kl = F.kl_div(log_p, log_p_ref, reduction="none", log_target=True).sum(-1)
    kl_sums, counts = _sums_per_example(token_kl, target_positions, labels)
    return kl_sums / counts.clamp(min=1)


@RETAIN_LOSSES.register("kl", needs=(REFERENCE_LOGITS,))
def retain_kl_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Stay close to the starting model on the retain batch: ``KL(p_ref || p)`` of the
    next-token distributions (as open-unlearning's ``compute_kl_divergence``: the starting
    model's distribution first), mean over each example's target positions, then over
    examples. ``batch["reference_logits"]`` are the starting model's logits on the batch (a
    frozen copy, starting_model.py). Unlike open-unlearning, which averages over every
    position of the padded batch (question, answer and padding), only the answer positions
    count, each example equally: the loss of a batch then does not depend on its padding or on
    how it is split over ranks (see ``answer_nll``). 0 at step 0, and >= 0 always.
    """
    return per_example_kl(logits, batch[REFERENCE_LOGITS], batch["labels"]).mean()
