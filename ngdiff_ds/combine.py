"""Global Gram matrix of two sharded task gradients, and the two-task combine rules.

Under ZeRO-3 every rank holds a disjoint flat slice of each task gradient (zero padding
included), so any global inner product is a sum of local inner products. One all-reduce of
three local sums gives the whole 2x2 Gram matrix of the forget gradient ``g_f`` and the retain
gradient ``g_r``:

    ||g_f||^2,  ||g_r||^2,  g_f . g_r

Every two-task rule here (NGDiff and the baselines) updates along ``d = a*g_r + b*g_f``, where
``(a, b)`` depends only on that Gram matrix. So the distributed part is the same for all rules,
and a rule is a small pure function ``rule(gram) -> (retain_coef, forget_coef)``, or
``rule(gram, options)`` with an options dataclass, registered in ``COMBINE_RULES``.

``g_f`` is the gradient of the forgetting loss *to minimise* (e.g. ``-NLL`` for gradient
ascent); the optimizer steps along ``-d``.

This module imports torch (and the registry) only: the caller passes the all-reduce in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ngdiff_ds.errors import ConfigError
from ngdiff_ds.registry import Registry

AllReduce = Callable[[torch.Tensor], object]

DEFAULT_CHUNK_SIZE = 4096


# --------------------------------------------------------------------------------------------
# Local and global Gram matrix
# --------------------------------------------------------------------------------------------


def _check_shards(forget_grad: torch.Tensor, retain_grad: torch.Tensor) -> None:
    if forget_grad.dim() != 1 or retain_grad.dim() != 1:
        raise ValueError(
            "gradient shards must be 1-D flat tensors, got shapes "
            f"{tuple(forget_grad.shape)} and {tuple(retain_grad.shape)}"
        )
    if forget_grad.numel() != retain_grad.numel():
        raise ValueError(
            "forget and retain gradient shards must have the same number of elements, got "
            f"{forget_grad.numel()} and {retain_grad.numel()}"
        )


def _compute_dtype(forget_grad: torch.Tensor, retain_grad: torch.Tensor) -> torch.dtype:
    # Float32 for float32 and low-precision shards (summing in bf16's 8 mantissa bits would be
    # useless, and a float32 copy of a bf16 shard is cheap); float64 only if both already are.
    if forget_grad.dtype == retain_grad.dtype == torch.float64:
        return torch.float64
    return torch.float32


def _sums_of_rows(
    forget_rows: torch.Tensor, retain_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 totals of per-row partial sums over [rows, chunk] matrices (rows may be 0).

    Each row is summed in the compute dtype (short sums, small error); the row results are
    added in float64, so the error does not grow with the shard size.
    """
    compute_dtype = forget_rows.dtype
    forget_row_norms = torch.linalg.vector_norm(forget_rows, dim=1, dtype=compute_dtype)
    retain_row_norms = torch.linalg.vector_norm(retain_rows, dim=1, dtype=compute_dtype)
    # Batched dot product, one per row, without a full-size elementwise product temporary.
    row_dots = torch.bmm(forget_rows.unsqueeze(1), retain_rows.unsqueeze(2)).view(-1)
    return (
        forget_row_norms.double().square().sum(),
        retain_row_norms.double().square().sum(),
        row_dots.double().sum(),
    )


def local_gram(
    forget_grad: torch.Tensor,
    retain_grad: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Local Gram entries of this rank's shards: float64 ``[sum f^2, sum r^2, sum f*r]``.

    The shards are 1-D, of equal length (possibly 0: a rank may hold nothing), float32, bf16
    or fp16 (float64 is summed in float64). The result lives on the shards' device so that it
    can go straight into a collective.

    Accuracy without a float64 copy of the shard (which is slow on CPU): the main part is
    viewed as ``[rows, chunk_size]``, each row is reduced in float32, and the per-row partial
    sums are added in float64. The tail that does not fill a row is reduced on its own.
    Each row's result carries float32 rounding (~1e-7 relative; squaring a float32 row norm
    doubles it); across many rows these errors average out instead of growing.
    """
    _check_shards(forget_grad, retain_grad)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")

    compute_dtype = _compute_dtype(forget_grad, retain_grad)
    # No copy for float32 contiguous shards (the common case); contiguous so rows are a view.
    forget = forget_grad.to(compute_dtype).contiguous()
    retain = retain_grad.to(compute_dtype).contiguous()
    num_rows = forget.numel() // chunk_size
    main_numel = num_rows * chunk_size

    main_sums = _sums_of_rows(
        forget[:main_numel].view(num_rows, chunk_size),
        retain[:main_numel].view(num_rows, chunk_size),
    )
    # The tail is one short row (possibly empty); the same routine handles it.
    tail_sums = _sums_of_rows(forget[main_numel:].view(1, -1), retain[main_numel:].view(1, -1))
    return torch.stack([main + tail for main, tail in zip(main_sums, tail_sums)])


@dataclass(frozen=True)
class Gram:
    """Global 2x2 Gram matrix of the forget gradient ``g_f`` and the retain gradient ``g_r``."""

    forget_sq: float
    retain_sq: float
    dot: float

    @property
    def forget_norm(self) -> float:
        return _sqrt_or_nan(self.forget_sq)

    @property
    def retain_norm(self) -> float:
        return _sqrt_or_nan(self.retain_sq)

    @property
    def cosine(self) -> float:
        """Cosine of the angle between ``g_f`` and ``g_r``; nan if either norm is 0 or nan."""
        forget_norm, retain_norm = self.forget_norm, self.retain_norm
        if not (forget_norm > 0 and retain_norm > 0):
            return math.nan
        # Divide twice: the product of two large norms could overflow.
        cosine = self.dot / forget_norm / retain_norm
        if math.isnan(cosine):
            return cosine
        # Rounding can push |cosine| a hair past 1; keep it a valid cosine for logging.
        return max(-1.0, min(1.0, cosine))

    @property
    def is_finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.forget_sq, self.retain_sq, self.dot))

    def direction_sq(self, retain_coef: float, forget_coef: float) -> float:
        """``||a g_r + b g_f||^2`` from the Gram entries."""
        return (retain_coef ** 2 * self.retain_sq + forget_coef ** 2 * self.forget_sq
                + 2.0 * retain_coef * forget_coef * self.dot)

    @property
    def is_usable(self) -> bool:
        """Both norms finite and positive and the dot product finite: safe to take a step."""
        return (
            _is_finite_positive(self.forget_norm)
            and _is_finite_positive(self.retain_norm)
            and math.isfinite(self.dot)
        )


def _sqrt_or_nan(value: float) -> float:
    # A sum of squares is never negative; nan (or a corrupt negative) gives nan, not an error.
    return math.sqrt(value) if value >= 0 else math.nan


def _is_finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def global_gram(
    forget_grad: torch.Tensor,
    retain_grad: torch.Tensor,
    all_reduce: Optional[AllReduce] = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Gram:
    """Gram matrix over all ranks from this rank's shards, with exactly one collective.

    ``all_reduce`` sums a tensor in place across the data-parallel ranks, e.g.
    ``lambda t: dist.all_reduce(t, group=group)``; ``None`` means a single process.
    """
    gram_entries = local_gram(forget_grad, retain_grad, chunk_size=chunk_size)
    if all_reduce is not None:
        all_reduce(gram_entries)
    forget_sq, retain_sq, dot = gram_entries.tolist()
    return Gram(forget_sq=forget_sq, retain_sq=retain_sq, dot=dot)


# --------------------------------------------------------------------------------------------
# Combine rules: Gram -> (retain_coef, forget_coef), direction d = a*g_r + b*g_f
# --------------------------------------------------------------------------------------------


COMBINE_RULES = Registry("combine rule", "--combine")


def step_coefficients(rule, gram: Gram) -> tuple[float, float] | None:
    """``rule(gram)``, or None when there is no step to take: a non-finite Gram matrix (a NaN
    or inf gradient), a rule that cannot apply to it (NGDiff cannot normalise a zero
    gradient; fixed weights can), non-finite coefficients, or a zero direction."""
    if not gram.is_finite:
        return None
    try:
        retain_coef, forget_coef = rule(gram)
    except ValueError:
        if gram.is_usable:
            raise  # the rule failed on good gradients: a bug, not a degenerate step
        return None
    if not (math.isfinite(retain_coef) and math.isfinite(forget_coef)):
        return None
    if not gram.direction_sq(retain_coef, forget_coef) > 0:
        return None
    return retain_coef, forget_coef


def _require_finite(gram: Gram, rule_name: str) -> None:
    if not all(math.isfinite(v) for v in (gram.forget_sq, gram.retain_sq, gram.dot)):
        raise ValueError(f"{rule_name}: Gram matrix is not finite: {gram}")


@COMBINE_RULES.register("ngdiff")
def ngdiff(gram: Gram) -> tuple[float, float]:
    """NGDiff: each task gradient normalised by its own global norm, ``(1/||g_r||, 1/||g_f||)``.

    Raises ValueError when a norm is zero or non-finite; the caller should check
    ``gram.is_usable`` first and skip the step.
    """
    if not gram.is_usable:
        raise ValueError(f"ngdiff: gradients cannot be normalised: {gram}")
    return 1.0 / gram.retain_norm, 1.0 / gram.forget_norm


@COMBINE_RULES.register("ga")
def gradient_ascent(gram: Gram) -> tuple[float, float]:
    """Gradient ascent on the forget set only: ``(0, 1)`` (the retain gradient is unused)."""
    return 0.0, 1.0


@dataclass(frozen=True)
class GDiffOptions:
    """Fixed weights of the two task gradients, named as open-unlearning's GradDiff (loss
    ``gamma * forget_loss + alpha * retain_loss``): ``--combine-option alpha=... gamma=...``."""

    alpha: float = 1.0  # the retain gradient's weight
    gamma: float = 1.0  # the forget gradient's weight

    def __post_init__(self) -> None:
        for name in ("alpha", "gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"gdiff's {name} must be a finite number >= 0, got {value!r}")
        if self.alpha == self.gamma == 0:
            raise ConfigError("gdiff's alpha and gamma are both 0: there would be no step")


@COMBINE_RULES.register("gdiff", GDiffOptions)
def gdiff(gram: Gram, options: GDiffOptions = GDiffOptions()) -> tuple[float, float]:
    """Gradient difference (Liu et al. 2022; linear scalarisation) with fixed weights:
    ``d = alpha * g_r + gamma * g_f``, the gradient of ``gamma * l_f + alpha * l_r``."""
    return float(options.alpha), float(options.gamma)


@COMBINE_RULES.register("pcgrad")
def pcgrad(gram: Gram) -> tuple[float, float]:
    """PCGrad for two tasks: on conflict, project each gradient onto the other's normal plane.

    ``g_r - (dot/||g_f||^2) g_f + g_f - (dot/||g_r||^2) g_r`` when ``dot < 0``, else
    ``g_r + g_f``. A negative dot implies both norms are positive, so the divisions are safe.
    """
    _require_finite(gram, "pcgrad")
    if gram.dot < 0:
        return 1.0 - gram.dot / gram.retain_sq, 1.0 - gram.dot / gram.forget_sq
    return 1.0, 1.0


@COMBINE_RULES.register("mgda")
def mgda(gram: Gram) -> tuple[float, float]:
    """MGDA for two tasks: the min-norm point ``a*g_r + (1-a)*g_f`` of the segment between them.

    ``a = clip((g_f - g_r).g_f / ||g_r - g_f||^2, 0, 1)``, all from the Gram entries. When the
    two gradients coincide every point of the segment is the same; take 0.5/0.5.
    """
    _require_finite(gram, "mgda")
    distance_sq = gram.retain_sq + gram.forget_sq - 2.0 * gram.dot
    # <= rather than ==: for (nearly) equal gradients rounding can make this slightly negative.
    if distance_sq <= 0:
        return 0.5, 0.5
    retain_coef = (gram.forget_sq - gram.dot) / distance_sq
    retain_coef = max(0.0, min(1.0, retain_coef))
    return retain_coef, 1.0 - retain_coef


# --------------------------------------------------------------------------------------------
# Forming the direction in place
# --------------------------------------------------------------------------------------------


def combine_in_place(
    retain_grad: torch.Tensor,
    forget_grad: torch.Tensor,
    retain_coef: float,
    forget_coef: float,
) -> torch.Tensor:
    """Overwrite ``retain_grad`` with ``retain_coef*retain_grad + forget_coef*forget_grad``.

    Works on a local shard (the direction is elementwise, so shards combine independently).
    A zero coefficient never multiplies its buffer: ``0 * nan`` is nan, and an unused buffer
    (e.g. the retain gradient under gradient ascent) may hold anything.
    """
    if retain_grad.shape != forget_grad.shape:
        raise ValueError(
            "retain and forget gradients must have the same shape, got "
            f"{tuple(retain_grad.shape)} and {tuple(forget_grad.shape)}"
        )
    if retain_coef == 0:
        if forget_coef == 0:
            return retain_grad.zero_()
        return retain_grad.copy_(forget_grad).mul_(forget_coef)
    if retain_coef != 1:
        retain_grad.mul_(retain_coef)
    if forget_coef != 0:
        retain_grad.add_(forget_grad, alpha=forget_coef)
    return retain_grad
