"""NPO, SimNPO and the KL retaining loss against hand computations in float64 (plain Python
math on each token, no torch loss function), and the method presets."""

from __future__ import annotations

import math

import pytest
import torch

from ngdiff_ds.errors import ConfigError
from ngdiff_ds.losses import (FORGET_LOSSES, IGNORE_INDEX, REFERENCE_LOGITS, REFERENCE_LOGPROB,
                              RETAIN_LOSSES, NPOOptions, SimNPOOptions, npo_loss, retain_kl_loss,
                              simnpo_loss)

VOCAB = 7


def _log_softmax_row(row: list[float]) -> list[float]:
    top = max(row)
    log_normaliser = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_normaliser for v in row]


def _targets(labels: torch.Tensor, b: int) -> list[tuple[int, int]]:
    """(position, target token) pairs of example b: logits[b, t] predicts labels[b, t + 1]."""
    return [(t, int(labels[b, t + 1])) for t in range(labels.shape[1] - 1)
            if int(labels[b, t + 1]) != IGNORE_INDEX]


def hand_logprob(logits: torch.Tensor, labels: torch.Tensor, b: int) -> float:
    return sum(_log_softmax_row(logits[b, t].tolist())[y] for t, y in _targets(labels, b))


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def make_batch(seed: int = 0, batch: int = 3, seq: int = 6):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, VOCAB, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    labels[0, :2] = IGNORE_INDEX  # a question
    labels[1, :4] = IGNORE_INDEX
    labels[2, -1] = IGNORE_INDEX  # padding
    return logits, labels


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_npo_matches_hand_computation_per_example(beta):
    logits, labels = make_batch(seed=1)
    reference = torch.tensor([-9.0, -2.5, -14.0], dtype=torch.float64)
    expected = []
    for b in range(3):
        log_ratio = hand_logprob(logits, labels, b) - float(reference[b])
        expected.append(-(2 / beta) * _log_sigmoid(-beta * log_ratio))
    got = npo_loss(logits, {"labels": labels, REFERENCE_LOGPROB: reference}, NPOOptions(beta))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(sum(expected) / 3, rel=1e-12, abs=1e-12)
    # one example at a time: each example's own loss, by hand
    for b in range(3):
        one = npo_loss(logits[b:b + 1], {"labels": labels[b:b + 1],
                                         REFERENCE_LOGPROB: reference[b:b + 1]}, NPOOptions(beta))
        assert one.item() == pytest.approx(expected[b], rel=1e-12)


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_npo_is_two_over_beta_log_two_when_the_policy_is_the_reference(dtype, rel):
    logits, labels = make_batch(seed=2)
    logits = logits.to(dtype)
    reference = torch.tensor([hand_logprob(logits.double(), labels, b) for b in range(3)],
                             dtype=torch.float64)
    for beta in (0.1, 0.5):
        got = npo_loss(logits, {"labels": labels, REFERENCE_LOGPROB: reference}, NPOOptions(beta))
        assert got.item() == pytest.approx(2 / beta * math.log(2), rel=rel)


def test_npo_gradient_at_the_reference_is_the_summed_ascent_gradient():
    """d/dtheta (2/beta) softplus(beta r) = 2 sigmoid(beta r) d log p = d log p at r = 0: the
    gradient of ascent on the summed NLL (-log p(y|x)), averaged over examples."""
    logits, labels = make_batch(seed=3)
    logits.requires_grad_(True)
    reference = torch.tensor([hand_logprob(logits.detach(), labels, b) for b in range(3)],
                             dtype=torch.float64)
    npo_loss(logits, {"labels": labels, REFERENCE_LOGPROB: reference}).backward()
    # by hand: d log p / d logits[b, t, v] = 1[v = y] - softmax(logits[b, t])[v], over 3 examples
    expected = torch.zeros_like(logits)
    for b in range(3):
        for t, y in _targets(labels, b):
            probabilities = [math.exp(v) for v in _log_softmax_row(logits[b, t].tolist())]
            for v in range(VOCAB):
                expected[b, t, v] = ((v == y) - probabilities[v]) / 3
    torch.testing.assert_close(logits.grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("beta,delta", [(4.5, 0.0), (1.0, 0.5), (2.5, -1.0)])
def test_simnpo_matches_hand_computation(beta, delta):
    logits, labels = make_batch(seed=4)
    expected = []
    for b in range(3):
        mean_nll = -hand_logprob(logits, labels, b) / len(_targets(labels, b))
        expected.append(-(2 / beta) * _log_sigmoid(beta * (mean_nll - delta)))
    got = simnpo_loss(logits, {"labels": labels}, SimNPOOptions(beta, delta))
    assert got.item() == pytest.approx(sum(expected) / 3, rel=1e-12)


def hand_kl(logits, reference_logits, labels, b) -> float:
    """Mean over example b's target positions of sum_v p_ref(v) (log p_ref(v) - log p(v))."""
    values = []
    for t, _ in _targets(labels, b):
        log_p = _log_softmax_row(logits[b, t].tolist())
        log_ref = _log_softmax_row(reference_logits[b, t].tolist())
        values.append(sum(math.exp(r) * (r - q) for r, q in zip(log_ref, log_p)))
    return sum(values) / len(values)


def test_kl_matches_hand_computation_and_ignores_other_positions():
    logits, labels = make_batch(seed=5)
    reference_logits = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9),
                                   dtype=torch.float64)
    batch = {"labels": labels, REFERENCE_LOGITS: reference_logits}
    expected = sum(hand_kl(logits, reference_logits, labels, b) for b in range(3)) / 3
    assert retain_kl_loss(logits, batch).item() == pytest.approx(expected, rel=1e-12)
    # a position that predicts no target (question, padding) does not count
    changed = reference_logits.clone()
    changed[1, :3] += 5.0  # positions 0..2 of example 1 predict masked labels 1..3
    changed[2, -1] -= 3.0
    assert retain_kl_loss(logits, {**batch, REFERENCE_LOGITS: changed}).item() == \
        pytest.approx(expected, rel=1e-12)


def test_kl_is_zero_with_zero_gradient_at_the_reference():
    logits, labels = make_batch(seed=6)
    logits.requires_grad_(True)
    loss = retain_kl_loss(logits, {"labels": labels, REFERENCE_LOGITS: logits.detach().clone()})
    assert loss.item() == pytest.approx(0.0, abs=1e-15)
    loss.backward()
    assert logits.grad.abs().max().item() < 1e-15


def test_kl_gradient_matches_hand_computation():
    """d KL(p_ref || softmax(z)) / dz = softmax(z) - p_ref, divided by the example's target
    count and the batch size."""
    logits, labels = make_batch(seed=7)
    reference_logits = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2),
                                   dtype=torch.float64)
    logits.requires_grad_(True)
    retain_kl_loss(logits, {"labels": labels, REFERENCE_LOGITS: reference_logits}).backward()
    expected = torch.zeros_like(logits)
    for b in range(3):
        positions = _targets(labels, b)
        for t, _ in positions:
            p = [math.exp(v) for v in _log_softmax_row(logits[b, t].tolist())]
            r = [math.exp(v) for v in _log_softmax_row(reference_logits[b, t].tolist())]
            for v in range(VOCAB):
                expected[b, t, v] = (p[v] - r[v]) / len(positions) / 3
    torch.testing.assert_close(logits.grad, expected, rtol=1e-12, atol=1e-14)


def test_bf16_logits_are_scored_in_float32():
    logits, labels = make_batch(seed=8)
    reference = torch.zeros(3, dtype=torch.float64)
    low = logits.to(torch.bfloat16)
    for value in (npo_loss(low, {"labels": labels, REFERENCE_LOGPROB: reference}),
                  simnpo_loss(low, {"labels": labels}),
                  retain_kl_loss(low, {"labels": labels, REFERENCE_LOGITS: low.clone() + 1})):
        assert value.dtype == torch.float32 and torch.isfinite(value)


def test_registered_with_what_they_need():
    assert FORGET_LOSSES.entry("npo").needs == (REFERENCE_LOGPROB,)
    assert FORGET_LOSSES.entry("simnpo").needs == ()  # reference-free
    assert RETAIN_LOSSES.entry("kl").needs == (REFERENCE_LOGITS,)
    assert FORGET_LOSSES.entry("ga").needs == RETAIN_LOSSES.entry("nll").needs == ()


@pytest.mark.parametrize("options,message", [
    (lambda: NPOOptions(beta=0.0), "npo's beta must be a finite number > 0"),
    (lambda: SimNPOOptions(beta=-1.0), "simnpo's beta"),
    (lambda: SimNPOOptions(delta=float("nan")), "simnpo's delta"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        options()


# ----- presets -----------------------------------------------------------------------------

def test_presets_set_the_three_parts_and_explicit_flags_override():
    from ngdiff_ds.unlearn import UnlearnSettings

    expected = {"ga": ("ga", "nll", "ga"), "gdiff": ("ga", "nll", "gdiff"),
                "gdiff_kl": ("ga", "kl", "gdiff"), "npo": ("npo", "nll", "ga"),
                "npo_gdiff": ("npo", "nll", "gdiff"), "simnpo": ("simnpo", "nll", "gdiff"),
                "ngdiff": ("ga", "nll", "ngdiff"), "ngdiff_npo": ("npo", "nll", "ngdiff")}
    for name, parts in expected.items():
        settings = UnlearnSettings(method_name=name)
        assert (settings.forget_loss, settings.retain_loss, settings.combine) == parts, name
    assert UnlearnSettings().method_name == "ngdiff"
    # open-unlearning's SimNPO weights: gamma 0.125 on the forget loss, alpha 1 on retain
    simnpo = UnlearnSettings(method_name="simnpo").method()
    assert simnpo.combine_rule(None) == (1.0, 0.125)
    # an explicit part wins; an explicit option of the preset's rule wins over the preset's
    settings = UnlearnSettings(method_name="gdiff", retain_loss="kl", combine_options=["alpha=0.5"])
    assert settings.retain_loss == "kl" and settings.method().combine_rule(None) == (0.5, 1.0)
    assert settings.method().retain_needs == (REFERENCE_LOGITS,)
    # another rule than the preset's does not get the preset's options
    assert UnlearnSettings(method_name="gdiff", combine="pcgrad").combine_options == []


def test_an_unknown_method_names_the_flag_and_the_choices():
    from ngdiff_ds.unlearn import UnlearnSettings

    with pytest.raises(ConfigError, match=r"--method must be one of ga, gdiff, .*ngdiff_npo"):
        UnlearnSettings(method_name="npo2")


def test_the_baselines_run_at_a_fixed_rate_unless_asked():
    from ngdiff_ds.adaptive_lr import AdaptiveLRConfig
    from ngdiff_ds.unlearn import UnlearnSettings

    on, off = AdaptiveLRConfig(), AdaptiveLRConfig(enabled=False)
    assert UnlearnSettings(method_name="ngdiff").rate_settings(on).enabled
    assert UnlearnSettings(method_name="ngdiff_npo").rate_settings(on).enabled
    assert not UnlearnSettings(method_name="ngdiff").rate_settings(off).enabled
    for baseline in ("ga", "gdiff", "gdiff_kl", "npo", "npo_gdiff", "simnpo"):
        assert not UnlearnSettings(method_name=baseline).rate_settings(on).enabled, baseline
    assert UnlearnSettings(method_name="npo", adaptive_lr=True).rate_settings(on).enabled
    with pytest.raises(ConfigError, match="--adaptive-lr and --no-adaptive-lr"):
        UnlearnSettings(method_name="npo", adaptive_lr=True).rate_settings(off)


@pytest.mark.parametrize("values,message", [
    ({"select_best": "best"}, "--select-best 'best' is not a rule"),
    ({"select_best": "fq_mu", "evaluate": False}, "cannot be used with --no-eval"),
    ({"select_best": "fq_keep_mu", "evaluate_before": False}, "with --no-eval-before"),
])
def test_select_best_needs_a_rule_and_the_evaluation(values, message):
    from ngdiff_ds.unlearn import UnlearnSettings

    with pytest.raises(ConfigError, match=message):
        UnlearnSettings(**values)


def test_rules_that_divide_by_the_retain_gradient_refuse_the_kl():
    from ngdiff_ds.unlearn import UnlearnSettings

    for combine in ("ngdiff", "pcgrad"):
        with pytest.raises(ConfigError, match=f"--combine {combine} with --retain-loss kl"):
            UnlearnSettings(retain_loss="kl", combine=combine)
    with pytest.raises(ConfigError, match="alpha and gamma are both 0"):
        UnlearnSettings(method_name="gdiff", combine_options=["alpha=0", "gamma=0"])
