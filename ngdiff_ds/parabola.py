"""The parabola of the probe losses along a step (pure, float64): the least-squares fit, and
where it rises by a given amount."""

from __future__ import annotations

import math

import torch


def fit_parabola(
    multiples: list[float], losses: list[float]
) -> tuple[float, float, float, float | None]:
    """Least-squares fit ``loss ~ curvature*s^2 + slope*s + intercept`` in float64.

    Exact (up to rounding) for 3 distinct points. Returns ``(curvature, slope, intercept, r2)``;
    ``r2`` is None for exactly 3 points, where the fit interpolates and says nothing about
    quality. With more points, r2 is 1 - SS_res/SS_tot (1.0 when all losses are equal).
    """
    s = torch.tensor([float(m) for m in multiples], dtype=torch.float64)
    y = torch.tensor([float(v) for v in losses], dtype=torch.float64)
    if s.ndim != 1 or s.numel() != y.numel():
        raise ValueError(
            f"need as many losses as multiples, got {len(losses)} and {len(multiples)}"
        )
    if torch.unique(s).numel() < 3:
        raise ValueError(f"need at least 3 distinct multiples, got {list(multiples)}")
    # Subtracting the mean loss first keeps the small differences that carry the curvature
    # from being rounded against a large loss value; it only shifts the intercept.
    y_mean = y.mean()
    y_centred = y - y_mean
    vandermonde = torch.stack([s * s, s, torch.ones_like(s)], dim=1)
    solution = torch.linalg.lstsq(vandermonde, y_centred.unsqueeze(1), driver="gelsd").solution
    curvature, slope, intercept_centred = (float(v) for v in solution.squeeze(1))
    intercept = intercept_centred + float(y_mean)
    r2 = None
    if s.numel() > 3:
        residual = y_centred - vandermonde @ solution.squeeze(1)
        ss_res = float((residual * residual).sum())
        ss_tot = float((y_centred * y_centred).sum())
        r2 = 1.0 if ss_tot == 0.0 else 1.0 - ss_res / ss_tot
    return curvature, slope, intercept, r2


def rise_root(curvature: float, slope: float, rise: float) -> float:
    """The smallest ``s > 0`` with ``curvature * s**2 + slope * s = rise`` (``rise > 0``);
    ``inf`` when the parabola never rises that much ahead."""
    discriminant = slope * slope + 4.0 * curvature * rise
    if discriminant < 0.0:  # a concave parabola whose peak stays below the rise
        return math.inf
    if slope > 0.0 or (curvature > 0.0 and slope == 0.0):
        # The root nearest 0, written without the cancellation of (-b + sqrt(D)) / 2a when
        # the curvature is tiny (a near-linear profile).
        return 2.0 * rise / (slope + math.sqrt(discriminant))
    if curvature > 0.0:  # downhill first, then up through L(0) + rise beyond 2 s*
        return (-slope + math.sqrt(discriminant)) / (2.0 * curvature)
    return math.inf  # downhill and not convex: never rises ahead
