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

import torch
import torch.nn.functional as F

from ngdiff_ds.registry import Registry

# Label value ignored by torch's cross-entropy (and by HF causal-LM losses).
IGNORE_INDEX = -100

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


def per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over each example's unmasked target tokens, shape [batch].

    The math is float32 even for bf16/fp16 logits (float64 logits stay float64). An example
    with no unmasked target token gives 0 (and a zero gradient), never nan.

    Only the rows of the logits that predict an unmasked token are upcast and go through the
    softmax, so nothing of the full [batch, seq, vocab] size is materialised in float32.
    """
    _check_shapes(logits, labels)
    batch_size, seq_len, vocab_size = logits.shape

    targets = _next_token_targets(labels).reshape(-1)
    target_positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)

    answer_logits = logits.reshape(-1, vocab_size).index_select(0, target_positions)
    if answer_logits.dtype not in (torch.float32, torch.float64):
        answer_logits = answer_logits.float()
    token_nll = F.cross_entropy(
        answer_logits,
        targets.index_select(0, target_positions),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    )

    example_of_token = torch.div(target_positions, seq_len, rounding_mode="floor")
    nll_sums = token_nll.new_zeros(batch_size).index_add_(0, example_of_token, token_nll)
    token_counts = token_nll.new_zeros(batch_size).index_add_(
        0, example_of_token, torch.ones_like(token_nll)
    )
    # clamp: an example without target tokens has sum 0 and count 0 -> 0 / 1 = 0.
    return nll_sums / token_counts.clamp(min=1)


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


@FORGET_LOSSES.register("ga")
def gradient_ascent_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Gradient ascent: minimise ``-answer_nll`` of the forget batch."""
    return -answer_nll(logits, batch["labels"])


@RETAIN_LOSSES.register("nll")
def retain_nll_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Keep the retain answers likely: ``answer_nll`` of the retain batch."""
    return answer_nll(logits, batch["labels"])
