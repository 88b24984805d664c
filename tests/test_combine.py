"""Unit tests for ngdiff_ds.combine against independent float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from ngdiff_ds.registry import parse_option_strings
from ngdiff_ds.combine import (
    COMBINE_RULES,
    Gram,
    combine_in_place,
    gdiff,
    global_gram,
    gradient_ascent,
    local_gram,
    mgda,
    ngdiff,
    pcgrad,
)

NORM_RTOL = 1e-6


# --------------------------------------------------------------------------------------------
# Helpers: fake ranks and float64 references
# --------------------------------------------------------------------------------------------


def random_shard_sizes(total: int, num_ranks: int, generator: torch.Generator) -> list[int]:
    """Unequal sizes summing to ``total``; with >= 3 ranks one rank holds nothing."""
    if num_ranks == 1:
        return [total]
    cuts = torch.randint(0, total + 1, (num_ranks - 1,), generator=generator).sort().values
    bounds = [0, *cuts.tolist(), total]
    sizes = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
    if num_ranks >= 3:
        # Give rank 1's elements to rank 0 so that rank 1 is empty.
        sizes[0] += sizes[1]
        sizes[1] = 0
    return sizes


def split(vector: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(vector, sizes))


def fake_rank_grams(forget: torch.Tensor, retain: torch.Tensor, sizes: list[int], **kw):
    """Run global_gram on every fake rank; each rank's all_reduce adds the others' local sums.

    Returns (grams per rank, all_reduce call count per rank).
    """
    forget_shards, retain_shards = split(forget, sizes), split(retain, sizes)
    local_entries = [local_gram(f, r, **kw) for f, r in zip(forget_shards, retain_shards)]
    grams, calls = [], []
    for rank, (f, r) in enumerate(zip(forget_shards, retain_shards)):
        call_count = [0]

        def all_reduce(tensor, rank=rank, call_count=call_count):
            call_count[0] += 1
            for other, entries in enumerate(local_entries):
                if other != rank:
                    tensor.add_(entries)

        grams.append(global_gram(f, r, all_reduce, **kw))
        calls.append(call_count[0])
    return grams, calls


def reference_gram(forget: torch.Tensor, retain: torch.Tensor) -> tuple[float, float, float]:
    """Brute-force float64 (||f||, ||r||, f.r) of the full vectors."""
    f, r = forget.double(), retain.double()
    return (
        math.sqrt(float((f * f).sum())),
        math.sqrt(float((r * r).sum())),
        float((f * r).sum()),
    )


def mixed_magnitude_vector(numel: int, generator: torch.Generator) -> torch.Tensor:
    """Normal values scaled by 10^U(-4, 4): a float32 sum over these loses accuracy fast."""
    scale = 10.0 ** (torch.rand(numel, generator=generator, dtype=torch.float64) * 8 - 4)
    return (torch.randn(numel, generator=generator, dtype=torch.float64) * scale).float()


def assert_gram_matches(gram: Gram, forget: torch.Tensor, retain: torch.Tensor, rtol=NORM_RTOL):
    forget_norm, retain_norm, dot = reference_gram(forget, retain)
    assert gram.forget_norm == pytest.approx(forget_norm, rel=rtol)
    assert gram.retain_norm == pytest.approx(retain_norm, rel=rtol)
    # The dot product can be near 0 for random vectors: its error scale is ||f|| ||r||.
    assert abs(gram.dot - dot) <= rtol * forget_norm * retain_norm
    assert gram.cosine == pytest.approx(dot / (forget_norm * retain_norm), abs=rtol)


# --------------------------------------------------------------------------------------------
# local_gram / global_gram
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [1, 4095, 4096, 4097, 3 * 4096 + 17, 50_001])
@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4])
def test_global_gram_over_fake_ranks_matches_float64(numel, num_ranks):
    generator = torch.Generator().manual_seed(numel * 10 + num_ranks)
    forget = torch.randn(numel, generator=generator)
    retain = torch.randn(numel, generator=generator) * 3 + 0.5 * forget
    sizes = random_shard_sizes(numel, num_ranks, generator)

    grams, calls = fake_rank_grams(forget, retain, sizes)

    assert calls == [1] * num_ranks
    for gram in grams:
        assert_gram_matches(gram, forget, retain)


def test_global_gram_million_mixed_magnitudes():
    generator = torch.Generator().manual_seed(7)
    numel = 1_000_000
    forget = mixed_magnitude_vector(numel, generator)
    retain = mixed_magnitude_vector(numel, generator) - 0.3 * forget
    sizes = random_shard_sizes(numel, 4, generator)

    grams, calls = fake_rank_grams(forget, retain, sizes)

    assert calls == [1, 1, 1, 1]
    for gram in grams:
        assert_gram_matches(gram, forget, retain)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 100_000])
def test_local_gram_chunk_sizes(chunk_size):
    generator = torch.Generator().manual_seed(chunk_size)
    forget = torch.randn(1000, generator=generator)
    retain = torch.randn(1000, generator=generator)
    grams, _ = fake_rank_grams(forget, retain, [400, 0, 600], chunk_size=chunk_size)
    for gram in grams:
        assert_gram_matches(gram, forget, retain)


def test_local_gram_returns_float64_triple():
    forget, retain = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, -5.0, 6.0])
    entries = local_gram(forget, retain, chunk_size=2)
    assert entries.dtype == torch.float64
    assert entries.shape == (3,)
    # Row sums are float32 (a squared float32 row norm is good to ~1e-7, not exact).
    assert entries.tolist() == pytest.approx([14.0, 77.0, 12.0], rel=1e-6)


def test_local_gram_bf16_shards_computed_in_float32():
    generator = torch.Generator().manual_seed(3)
    forget = torch.randn(20_000, generator=generator).bfloat16()
    retain = torch.randn(20_000, generator=generator).bfloat16()
    # Reference on the exact bf16 values: the only error allowed is the float32 summation.
    gram = global_gram(forget, retain)
    assert_gram_matches(gram, forget, retain)


def test_local_gram_mixed_dtypes_and_float64():
    generator = torch.Generator().manual_seed(4)
    forget = torch.randn(9000, generator=generator, dtype=torch.float64)
    retain = torch.randn(9000, generator=generator)
    assert_gram_matches(global_gram(forget, retain), forget, retain)
    assert_gram_matches(global_gram(forget, retain.double()), forget, retain, rtol=1e-12)


def test_local_gram_non_contiguous_shard():
    generator = torch.Generator().manual_seed(5)
    forget = torch.randn(20_002, generator=generator)[::2]
    retain = torch.randn(10_001, generator=generator)
    assert_gram_matches(global_gram(forget, retain), forget, retain)


def test_local_gram_empty_shard_gives_zeros():
    empty = torch.zeros(0)
    entries = local_gram(empty, empty)
    assert entries.dtype == torch.float64
    assert entries.shape == (3,)
    assert entries.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "forget, retain",
    [
        (torch.zeros(4, 2), torch.zeros(4, 2)),
        (torch.zeros(3), torch.zeros(4)),
        (torch.zeros(()), torch.zeros(())),
    ],
)
def test_local_gram_rejects_bad_shapes(forget, retain):
    with pytest.raises(ValueError):
        local_gram(forget, retain)


def test_local_gram_rejects_bad_chunk_size():
    with pytest.raises(ValueError):
        local_gram(torch.ones(3), torch.ones(3), chunk_size=0)


def test_global_gram_single_process():
    forget, retain = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    gram = global_gram(forget, retain)
    assert (gram.forget_sq, gram.retain_sq, gram.dot) == (9.0, 16.0, 0.0)
    assert (gram.forget_norm, gram.retain_norm) == (3.0, 4.0)


# --------------------------------------------------------------------------------------------
# Gram properties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gram",
    [
        Gram(forget_sq=0.0, retain_sq=1.0, dot=0.0),
        Gram(forget_sq=1.0, retain_sq=0.0, dot=0.0),
        Gram(forget_sq=math.nan, retain_sq=1.0, dot=0.0),
        Gram(forget_sq=1.0, retain_sq=math.inf, dot=0.0),
        Gram(forget_sq=1.0, retain_sq=1.0, dot=math.nan),
        Gram(forget_sq=1.0, retain_sq=1.0, dot=-math.inf),
    ],
)
def test_gram_not_usable(gram):
    assert not gram.is_usable


def test_gram_usable():
    assert Gram(forget_sq=2.0, retain_sq=3.0, dot=-1.0).is_usable


def gram_of(forget: list[float], retain: list[float]) -> Gram:
    return global_gram(torch.tensor(forget), torch.tensor(retain))


def test_cosine_parallel_antiparallel_orthogonal():
    # Float32 row sums: the cosine is good to ~1e-7 (exact in the float64 Gram below).
    assert gram_of([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]).cosine == pytest.approx(1.0, abs=1e-6)
    assert gram_of([1.0, 2.0, 3.0], [-0.5, -1.0, -1.5]).cosine == pytest.approx(-1.0, abs=1e-6)
    assert Gram(forget_sq=4.0, retain_sq=9.0, dot=6.0).cosine == 1.0
    assert Gram(forget_sq=4.0, retain_sq=9.0, dot=-6.0).cosine == -1.0
    assert gram_of([1.0, 0.0, 2.0], [0.0, 5.0, 0.0]).cosine == 0.0


def test_cosine_nan_for_zero_norm():
    assert math.isnan(gram_of([0.0, 0.0], [1.0, 2.0]).cosine)
    assert math.isnan(gram_of([1.0, 2.0], [0.0, 0.0]).cosine)


def test_cosine_stays_in_range():
    # Entries slightly inconsistent (as rounding can make them): still a valid cosine.
    assert Gram(forget_sq=1.0, retain_sq=1.0, dot=1.0 + 1e-15).cosine == 1.0


# --------------------------------------------------------------------------------------------
# Combine rules
# --------------------------------------------------------------------------------------------


def random_pair(numel: int, seed: int, forget_from_retain: float = 0.0):
    generator = torch.Generator().manual_seed(seed)
    retain = torch.randn(numel, generator=generator)
    forget = torch.randn(numel, generator=generator) * 0.5 + forget_from_retain * retain
    return retain, forget


def direction_over_shards(retain, forget, sizes, retain_coef, forget_coef) -> torch.Tensor:
    """Form the direction shard by shard in place (as each rank does) and concatenate."""
    directions = [
        combine_in_place(r.clone(), f, retain_coef, forget_coef)
        for r, f in zip(split(retain, sizes), split(forget, sizes))
    ]
    return torch.cat(directions)


def assert_direction_close(direction: torch.Tensor, expected: torch.Tensor, rtol=1e-6):
    scale = float(expected.abs().max())
    torch.testing.assert_close(direction.double(), expected, rtol=rtol, atol=rtol * scale)


def test_combine_rules_registry():
    assert COMBINE_RULES.names() == ["ga", "gdiff", "mgda", "ngdiff", "pcgrad"]
    for name, rule in (("ngdiff", ngdiff), ("ga", gradient_ascent), ("pcgrad", pcgrad),
                       ("mgda", mgda)):
        assert COMBINE_RULES.bind(name) is rule  # no options: the function itself


def test_ngdiff_direction_over_shards_matches_float64():
    retain, forget = random_pair(30_011, seed=11, forget_from_retain=-0.2)
    forget = forget * 1e3  # very different scales: normalisation must remove them
    sizes = [12_000, 0, 18_011]
    gram = fake_rank_grams(forget, retain, sizes)[0][0]

    retain_coef, forget_coef = ngdiff(gram)

    forget_norm, retain_norm, _ = reference_gram(forget, retain)
    assert retain_coef == pytest.approx(1 / retain_norm, rel=NORM_RTOL)
    assert forget_coef == pytest.approx(1 / forget_norm, rel=NORM_RTOL)
    expected = retain.double() / retain_norm + forget.double() / forget_norm
    direction = direction_over_shards(retain, forget, sizes, retain_coef, forget_coef)
    assert_direction_close(direction, expected)


@pytest.mark.parametrize("gram", [Gram(0.0, 1.0, 0.0), Gram(1.0, math.nan, 0.0)])
def test_ngdiff_refuses_unusable_gram(gram):
    with pytest.raises(ValueError):
        ngdiff(gram)


def test_gradient_ascent_ignores_retain_buffer_even_if_nan():
    forget = torch.tensor([1.0, -2.0, 3.0])
    retain_buffer = torch.tensor([math.nan, math.inf, 1.0])
    retain_coef, forget_coef = gradient_ascent(gram_of([1.0], [1.0]))
    assert (retain_coef, forget_coef) == (0.0, 1.0)
    direction = combine_in_place(retain_buffer, forget, retain_coef, forget_coef)
    assert direction is retain_buffer
    assert direction.tolist() == forget.tolist()


def test_gdiff_fixed_weights():
    retain, forget = random_pair(1000, seed=12)
    gram = global_gram(forget, retain)
    assert gdiff(gram) == (1.0, 1.0)
    options = parse_option_strings(COMBINE_RULES, "gdiff", ["alpha=0.7", "gamma=2.5"],
                                   "--combine-option")
    assert COMBINE_RULES.bind("gdiff", options)(gram) == (0.7, 2.5)
    direction = direction_over_shards(retain, forget, [300, 700], 0.7, 2.5)
    assert_direction_close(direction, 0.7 * retain.double() + 2.5 * forget.double())


def test_pcgrad_conflicting_equals_explicit_projection():
    retain, forget = random_pair(20_000, seed=13, forget_from_retain=-0.8)
    sizes = [5_000, 15_000]
    gram = fake_rank_grams(forget, retain, sizes)[0][0]
    assert gram.dot < 0

    retain_coef, forget_coef = pcgrad(gram)

    r, f = retain.double(), forget.double()
    dot = float((r * f).sum())
    projected_retain = r - dot / float((f * f).sum()) * f
    projected_forget = f - dot / float((r * r).sum()) * r
    expected = projected_retain + projected_forget
    direction = direction_over_shards(retain, forget, sizes, retain_coef, forget_coef)
    assert_direction_close(direction, expected)
    # The projections removed the conflict: each part is orthogonal to the other task.
    assert abs(float((projected_retain * f).sum())) < 1e-9 * float(f.norm() * r.norm())


def test_pcgrad_no_conflict_is_plain_sum():
    retain, forget = random_pair(1000, seed=14, forget_from_retain=0.8)
    gram = global_gram(forget, retain)
    assert gram.dot > 0
    assert pcgrad(gram) == (1.0, 1.0)
    assert pcgrad(Gram(forget_sq=0.0, retain_sq=1.0, dot=0.0)) == (1.0, 1.0)


def brute_force_min_norm(retain: torch.Tensor, forget: torch.Tensor, num_alphas: int = 2001):
    """Scan alpha on a grid; return (alphas, ||alpha*r + (1-alpha)*f|| for each alpha)."""
    r, f = retain.double(), forget.double()
    alphas = torch.linspace(0.0, 1.0, num_alphas, dtype=torch.float64)
    points = alphas[:, None] * r[None, :] + (1 - alphas)[:, None] * f[None, :]
    return alphas, points.norm(dim=1)


@pytest.mark.parametrize(
    "forget_from_retain, forget_scale, expected_regime",
    [
        (-0.5, 1.0, "interior"),  # conflicting gradients
        (0.3, 1.0, "interior"),
        (0.1, 0.0, "forget"),  # forget ~ 0.1*retain: the forget end is the min-norm point
        (10.0, 0.0, "retain"),  # forget ~ 10*retain: the retain end is
    ],
)
def test_mgda_is_min_norm_point(forget_from_retain, forget_scale, expected_regime):
    generator = torch.Generator().manual_seed(15)
    retain = torch.randn(500, generator=generator)
    noise = torch.randn(500, generator=generator) * 0.01
    forget = forget_from_retain * retain + forget_scale * torch.randn(500, generator=generator)
    forget = forget + noise
    gram = global_gram(forget, retain)

    retain_coef, forget_coef = mgda(gram)

    assert retain_coef + forget_coef == pytest.approx(1.0, abs=1e-15)
    alphas, norms = brute_force_min_norm(retain, forget)
    best = int(norms.argmin())
    rule_norm = float((retain_coef * retain.double() + forget_coef * forget.double()).norm())
    assert rule_norm <= float(norms[best]) * (1 + 1e-6)
    assert abs(retain_coef - float(alphas[best])) <= 1.0 / (len(alphas) - 1)
    if expected_regime == "forget":
        assert retain_coef == 0.0
    elif expected_regime == "retain":
        assert retain_coef == 1.0
    else:
        assert 0.0 < retain_coef < 1.0


def test_mgda_identical_gradients_split_evenly():
    vector = torch.tensor([1.0, 2.0, -3.0])
    assert mgda(global_gram(vector, vector.clone())) == (0.5, 0.5)


def test_rules_refuse_non_finite_gram():
    bad = Gram(forget_sq=math.nan, retain_sq=1.0, dot=0.0)
    for rule in (pcgrad, mgda):
        with pytest.raises(ValueError):
            rule(bad)


# --------------------------------------------------------------------------------------------
# combine_in_place
# --------------------------------------------------------------------------------------------


def test_combine_in_place_writes_into_retain_buffer():
    retain = torch.tensor([1.0, 2.0])
    forget = torch.tensor([10.0, 20.0])
    result = combine_in_place(retain, forget, 0.5, -0.1)
    assert result is retain
    assert retain.tolist() == pytest.approx([-0.5, -1.0])
    assert forget.tolist() == [10.0, 20.0]


def test_combine_in_place_zero_forget_coef_ignores_forget_buffer():
    retain = torch.tensor([1.0, 2.0])
    combine_in_place(retain, torch.tensor([math.nan, math.inf]), 2.0, 0.0)
    assert retain.tolist() == [2.0, 4.0]


def test_combine_in_place_both_zero():
    retain = torch.tensor([math.nan, 1.0])
    combine_in_place(retain, torch.tensor([math.inf, 1.0]), 0.0, 0.0)
    assert retain.tolist() == [0.0, 0.0]


def test_combine_in_place_bf16_buffers():
    retain = torch.tensor([1.0, -2.0]).bfloat16()
    forget = torch.tensor([4.0, 8.0]).bfloat16()
    combine_in_place(retain, forget, 0.5, 0.25)
    assert retain.dtype == torch.bfloat16
    assert retain.float().tolist() == [1.5, 1.0]


def test_combine_in_place_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        combine_in_place(torch.zeros(3), torch.zeros(4), 1.0, 1.0)


def test_step_coefficients_skip_only_steps_that_cannot_be_taken():
    from ngdiff_ds.combine import step_coefficients

    zero_retain = Gram(forget_sq=4.0, retain_sq=0.0, dot=0.0)  # e.g. KL at the starting model
    assert step_coefficients(ngdiff, zero_retain) is None  # nothing to normalise
    assert step_coefficients(gdiff, zero_retain) == (1.0, 1.0)  # fixed weights: g_f alone
    assert step_coefficients(gradient_ascent, zero_retain) == (0.0, 1.0)
    assert step_coefficients(gradient_ascent, Gram(0.0, 3.0, 0.0)) is None  # zero direction
    assert step_coefficients(gdiff, Gram(float("nan"), 1.0, 0.0)) is None
    assert step_coefficients(ngdiff, Gram(4.0, 9.0, 1.0)) == (1 / 3, 1 / 2)
    # opposite equal gradients: d = g_r + g_f = 0 (|d|^2 from the Gram entries by hand: 1+1-2)
    assert step_coefficients(gdiff, Gram(1.0, 1.0, -1.0)) is None

    def broken(gram):
        raise ValueError("a bug in a rule")

    with pytest.raises(ValueError, match="a bug"):
        step_coefficients(broken, Gram(4.0, 9.0, 1.0))  # usable gradients: not a skip
