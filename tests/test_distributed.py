"""NGDiff on ZeRO-3 over 2 CPU ranks (gloo) against an independent single-process reference.

One launch of ``tests/dist_worker.py`` per world size runs every scenario (a launch costs
~10 s, so scenarios are batched). The reference (tests/reference.py) is plain PyTorch on the
unpartitioned model with float64 norms.

Tolerances: weights agree to 2e-5 absolute (float32 forward/backward sums in a different
order over different shards give ~1e-7 relative differences per step); norms and cosine to
1e-5 relative.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import run_deepspeed
from tests.reference import PRESET_METHODS, reference_run

pytestmark = pytest.mark.slow  # multi-rank DeepSpeed launches

SGD = {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}
# eps 1e-6, not 1e-8: AdamW's first step moves each weight by lr * g / (|g| + eps), so a
# gradient element that is a near-cancelling float32 sum (|g| ~ 1e-9) turns summation-order
# noise between shardings into weight differences of ~lr; a larger eps damps only those.
ADAMW = {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-6,
                                     "weight_decay": 0.01, "torch_adam": True}}
# DeepSpeed's own CPU Adam (AdamW mode), the optimizer ZeRO-Offload normally runs
CPU_ADAMW = {"type": "AdamW", "params": {k: v for k, v in ADAMW["params"].items()
                                         if k != "torch_adam"}}
LORA = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]}
GLOBAL_BATCH = 4  # examples of each task per step, in every layout below
# GeN's rule (rise budget off); BUDGET: the rise budget with backtracking, probes every step
ADAPTIVE = {"period": 1, "smoothing": 0.5, "clip_low": 0.1, "clip_high": 10.0, "max_rise": 0.0}
BUDGET = {**ADAPTIVE, "max_rise": 0.01}  # backtracking above 3 x the budget (the default)
# AdamW at a rate that overshoots on the tiny model, so that a backtrack runs with the
# optimizer offloaded (master and forward weights apart, on different devices on a GPU)
ADAMW_TOO_LARGE = {"type": "AdamW", "params": {**ADAMW["params"], "lr": 0.05}}
NO_PERSISTENT = {"stage3_param_persistence_threshold": 0}
# On the tiny random model the probe profile is convex and downhill around SGD rate 3 (the
# fit grows the rate a little) and badly overshot at 30 (the fit must cut it).
GEN_SGD = {"type": "SGD", "params": {"lr": 3.0}}
GEN_SGD_TOO_LARGE = {"type": "SGD", "params": {"lr": 30.0}}

FINETUNE_SGD = {"type": "SGD", "params": {"lr": 0.5}}

# every --method preset at a fixed SGD rate (the package's own setup of each: losses, rule,
# weights, NPO's reference log-probs, KL's frozen copy), against the reference and 1 vs 2 ranks
PRESETS = ["ga", "gdiff", "gdiff_kl", "npo", "npo_gdiff", "simnpo", "ngdiff", "ngdiff_npo"]


def _preset_scenarios(micro: int) -> list[dict]:
    # ngdiff (SGD, 3 steps) is the "sgd" scenario of both launches already
    return [{"name": f"preset_{name}", "method": name, "optimizer": SGD, "micro": micro,
             "accum": 1, "save_after": [3]} for name in PRESETS if name != "ngdiff"]


def _preset_results(preset: str) -> str:
    return "sgd" if preset == "ngdiff" else f"preset_{preset}"


TWO_RANK_SCENARIOS = [
    {"name": "sgd", "optimizer": SGD, "micro": 2, "accum": 1, "save_after": [1, 3]},
    {"name": "adamw", "optimizer": ADAMW, "micro": 2, "accum": 1, "save_after": [1, 3]},
    {"name": "sgd_accum2", "optimizer": SGD, "micro": 1, "accum": 2, "save_after": [3]},
    {"name": "adamw_accum2", "optimizer": ADAMW, "micro": 1, "accum": 2, "save_after": [3]},
    # activation checkpointing: recomputed layers give the same gradients and step
    {"name": "adamw_checkpointed", "optimizer": ADAMW, "micro": 2, "accum": 1, "save_after": [3],
     "gradient_checkpointing": True},
    # adaptive learning rate (GeN): probes after every step
    # (persistence threshold 0: every parameter is released and re-gathered around the probes,
    # as in a large model; the tiny model is otherwise entirely "persistent")
    {"name": "gen_sgd", "optimizer": GEN_SGD, "micro": 2, "accum": 1, "save_after": [4],
     "adaptive": ADAPTIVE, "zero": NO_PERSISTENT},
    {"name": "gen_sgd_too_large", "optimizer": GEN_SGD_TOO_LARGE, "micro": 2, "accum": 1,
     "save_after": [2], "adaptive": ADAPTIVE, "zero": NO_PERSISTENT},
    # the rise budget: SGD at 30 overshoots (backtracking retakes the step), then the budget
    # sets the rate; AdamW (offloaded: master and forward weights apart) with a fit every 3rd
    # step, so that a clipped proposal's refit shows
    {"name": "budget_sgd", "optimizer": GEN_SGD_TOO_LARGE, "micro": 2, "accum": 1,
     "save_after": [4], "adaptive": BUDGET, "zero": NO_PERSISTENT},
    {"name": "budget_adamw_offload", "optimizer": ADAMW_TOO_LARGE, "micro": 2, "accum": 1,
     "save_after": [4], "adaptive": {**BUDGET, "period": 3}, "replay_without_probes": True,
     "zero": {"offload_optimizer": {"device": "cpu"}, **NO_PERSISTENT}},
    {"name": "gen_adamw", "optimizer": ADAMW, "micro": 2, "accum": 1, "save_after": [4],
     "adaptive": {**ADAPTIVE, "period": 2}, "replay_without_probes": True},
    {"name": "eval", "kind": "eval", "optimizer": SGD, "micro": 2, "accum": 1, "num_examples": 7},
    # micro-batch 1 per rank, QA pairs mixed with long passages: length groups must agree
    {"name": "finetune", "kind": "finetune", "optimizer": FINETUNE_SGD, "micro": 1, "accum": 1,
     "steps": 4},
    {"name": "nan_skip", "kind": "nan_skip", "optimizer": ADAMW, "micro": 2, "accum": 1},
    # optimizer and parameters offloaded to CPU, with probes every step
    {"name": "gen_offload", "optimizer": ADAMW, "micro": 2, "accum": 1, "save_after": [3],
     "adaptive": ADAPTIVE, "zero": {"offload_optimizer": {"device": "cpu"},
                                    "offload_param": {"device": "cpu"}}},
    # LoRA adapters (peft) only: the partition, the norms and the step cover the adapters
    {"name": "lora", "optimizer": ADAMW, "micro": 2, "accum": 1, "save_after": [3],
     "lora": LORA},
    {"name": "cpu_adam_offload", "optimizer": CPU_ADAMW, "micro": 2, "accum": 1, "save_after": [3],
     "zero": {"offload_optimizer": {"device": "cpu"}}},
    {"name": "restore_fp32", "kind": "probe_restore", "optimizer": ADAMW, "micro": 2, "accum": 1,
     "zero": NO_PERSISTENT},
    {"name": "restore_bf16", "kind": "probe_restore", "optimizer": ADAMW, "micro": 2, "accum": 1,
     "bf16": True},
]
TWO_RANK_SCENARIOS += _preset_scenarios(micro=2)
ONE_RANK_SCENARIOS = [
    {"name": "sgd", "optimizer": SGD, "micro": 4, "accum": 1, "save_after": [3]},
    {"name": "eval", "kind": "eval", "optimizer": SGD, "micro": 4, "accum": 1, "num_examples": 7},
    *_preset_scenarios(micro=4),
]

WEIGHT_ATOL = 2e-5
NORM_RTOL = 1e-5


def _launch(num_ranks, scenarios, tiny_assets, out):
    out.mkdir()
    (out / "scenarios.json").write_text(json.dumps(scenarios))
    result = run_deepspeed(num_ranks, "tests/dist_worker.py",
                           ["--model", tiny_assets["model"], "--data", tiny_assets["data"],
                            "--scenarios", str(out / "scenarios.json"), "--out", str(out)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_rank_results(tiny_assets, tmp_path_factory, cpu_adam_built):
    return _launch(2, TWO_RANK_SCENARIOS, tiny_assets, tmp_path_factory.mktemp("two") / "out")


@pytest.fixture(scope="module")
def one_rank_results(tiny_assets, tmp_path_factory):
    return _launch(1, ONE_RANK_SCENARIOS, tiny_assets, tmp_path_factory.mktemp("one") / "out")


def _load(results, name, steps):
    state = torch.load(results / f"{name}_step{steps}.pt")
    stats = json.loads((results / f"{name}_step{steps}.json").read_text())
    return state, stats


def _assert_same_weights(actual: dict, expected: dict, atol: float, what: str):
    assert set(expected) <= set(actual), f"{what}: missing {set(expected) - set(actual)}"
    worst = max((actual[k].float() - expected[k].float()).abs().max().item() for k in expected)
    assert worst <= atol, f"{what}: max |weight difference| {worst:.3g} > {atol}"


@pytest.mark.parametrize("name,optimizer,steps", [
    ("sgd", SGD, 1), ("sgd", SGD, 3), ("adamw", ADAMW, 1), ("adamw", ADAMW, 3),
    ("sgd_accum2", SGD, 3), ("adamw_accum2", ADAMW, 3), ("adamw_checkpointed", ADAMW, 3),
    ("cpu_adam_offload", ADAMW, 3), ("lora", ADAMW, 3),
])
def test_two_ranks_match_single_process_reference(two_rank_results, tiny_assets, name, optimizer, steps):
    state, stats = _load(two_rank_results, name, steps)
    lora = LORA if name == "lora" else None
    expected_state, expected_stats = reference_run(tiny_assets["model"], tiny_assets["data"],
                                                   optimizer, GLOBAL_BATCH, steps, lora=lora)
    # The step must actually move the weights, or equality would prove nothing.
    initial, _ = reference_run(tiny_assets["model"], tiny_assets["data"], optimizer, GLOBAL_BATCH, 0,
                               lora=lora)
    largest_move = max((expected_state[k] - initial[k]).abs().max().item() for k in initial)
    assert largest_move > 20 * WEIGHT_ATOL, f"reference barely moved ({largest_move})"
    _assert_same_weights(state, expected_state, WEIGHT_ATOL, f"{name} after {steps} step(s)")
    assert len(stats) == steps and not any(s["skipped"] for s in stats)
    for got, want in zip(stats, expected_stats):
        for key in ("forget_grad_norm", "retain_grad_norm", "forget_loss", "retain_loss"):
            assert got[key] == pytest.approx(want[key], rel=NORM_RTOL), (key, got, want)
        assert got["cosine"] == pytest.approx(want["cosine"], abs=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_method_preset_matches_the_reference_on_one_and_two_ranks(
        two_rank_results, one_rank_results, tiny_assets, preset):
    """Three SGD steps of each preset on 2 ranks equal plain PyTorch's (the method's formulas
    written out in tests/reference.py) and 1 rank's with the same global batch."""
    state, stats = _load(two_rank_results, _preset_results(preset), 3)
    one_rank, one_rank_stats = _load(one_rank_results, _preset_results(preset), 3)
    method = PRESET_METHODS[preset]
    expected_state, expected = reference_run(tiny_assets["model"], tiny_assets["data"], SGD,
                                             GLOBAL_BATCH, 3, method=method)
    initial, _ = reference_run(tiny_assets["model"], tiny_assets["data"], SGD, GLOBAL_BATCH, 0)
    largest_move = max((expected_state[k] - initial[k]).abs().max().item() for k in initial)
    assert largest_move > 20 * WEIGHT_ATOL, f"reference barely moved ({largest_move})"
    _assert_same_weights(state, expected_state, WEIGHT_ATOL, f"{preset} vs the reference")
    _assert_same_weights(state, one_rank, WEIGHT_ATOL, f"{preset}: 2 ranks vs 1 rank")
    assert not any(s["skipped"] for s in stats + one_rank_stats)
    for got, one, want in zip(stats, one_rank_stats, expected):
        for key in ("forget_loss", "retain_loss", "forget_grad_norm", "retain_grad_norm"):
            # abs: the KL and its gradient are 0 at step 0 (to float noise on ZeRO-3), and a
            # small KL is a difference of near-equal float32 sums (measured: 1 vs 2 ranks
            # 1.70281e-4 vs 1.70275e-4)
            assert got[key] == pytest.approx(want[key], rel=NORM_RTOL, abs=1e-7), (key, got, want)
            assert one[key] == pytest.approx(got[key], rel=NORM_RTOL, abs=1e-7), (key, one, got)
    if method["forget"] == "npo":  # policy = reference at step 0: (2 / beta) log 2
        assert stats[0]["forget_loss"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-6)
    if method["retain"] == "kl":
        assert abs(stats[0]["retain_loss"]) < 1e-6 and stats[2]["retain_loss"] > 1e-4


def test_lora_trains_the_adapters_only(two_rank_results, tiny_assets):
    """The LoRA run (matching its reference above) moved adapter weights and nothing else."""
    state, _ = _load(two_rank_results, "lora", 3)
    initial, _ = reference_run(tiny_assets["model"], tiny_assets["data"], ADAMW, GLOBAL_BATCH, 0,
                               lora=LORA)
    moved = {k for k in initial if not torch.equal(state[k].float(), initial[k].float())}
    assert moved and all(".lora_A." in k or ".lora_B." in k for k in moved), sorted(moved)[:5]
    assert any(".lora_B." in k for k in moved)  # B starts at zero: the first step moves it


def test_offload_ran_deepspeeds_cpu_adam(two_rank_results):
    """The cpu_adam_offload scenario matches torch AdamW's reference (above) with DeepSpeed's
    CPU Adam doing the step, not torch's AdamW."""
    assert json.loads((two_rank_results / "cpu_adam_offload_step3_optimizer.json").read_text()) \
        == "DeepSpeedCPUAdam"


def test_gradient_checkpointing_recomputes_the_layers(two_rank_results):
    """Its step matches the reference (above); here: it was really on. Each step runs the
    first layer's MLP once per task, and once more per task when the backward recomputes."""
    def calls(name):
        return json.loads((two_rank_results / f"{name}_step3_layer0_calls.json").read_text())

    assert calls("adamw") == 3 * 2
    assert calls("adamw_checkpointed") == 3 * 2 * 2


def test_world_size_invariance(one_rank_results, two_rank_results):
    """Same global batch (4 per task) at 1 rank x 4 and 2 ranks x 2: same weights after 3 steps."""
    one, one_stats = _load(one_rank_results, "sgd", 3)
    two, two_stats = _load(two_rank_results, "sgd", 3)
    _assert_same_weights(two, one, WEIGHT_ATOL, "1 rank vs 2 ranks")
    for a, b in zip(one_stats, two_stats):
        assert a["forget_grad_norm"] == pytest.approx(b["forget_grad_norm"], rel=NORM_RTOL)
        assert a["retain_grad_norm"] == pytest.approx(b["retain_grad_norm"], rel=NORM_RTOL)


def test_adaptive_rate_matches_reference(two_rank_results, tiny_assets):
    """Probe losses, the fitted rate after every step, and the weights, against plain PyTorch."""
    state, stats = _load(two_rank_results, "gen_sgd", 4)
    expected_state, expected = reference_run(tiny_assets["model"], tiny_assets["data"], GEN_SGD,
                                             GLOBAL_BATCH, 4, adaptive=ADAPTIVE)
    rates = [s["lr"] for s in stats]
    assert rates == pytest.approx([e["lr"] for e in expected], rel=1e-4), (rates, expected)
    assert len(set(rates)) > 1, f"no fit was accepted, so the rate was never exercised: {rates}"
    for got, want in zip(stats, expected):
        assert got["probe_losses"] == pytest.approx(want["probe_losses"], rel=1e-5)
    _assert_same_weights(state, expected_state, WEIGHT_ATOL, "GeN SGD after 4 steps")


def test_adaptive_rate_cuts_a_rate_that_is_far_too_large(two_rank_results, tiny_assets):
    """Starting at SGD rate 30 the first fit sees the overshoot (s* < 1) and cuts the rate,
    exactly as the reference does. (The 100x-too-small and 10x-too-large trajectories over
    many fits are in tests/test_adaptive_lr.py, on a quadratic.)"""
    _, stats = _load(two_rank_results, "gen_sgd_too_large", 2)
    _, expected = reference_run(tiny_assets["model"], tiny_assets["data"], GEN_SGD_TOO_LARGE,
                                GLOBAL_BATCH, 2, adaptive=ADAPTIVE)
    rates = [s["lr"] for s in stats]
    assert rates[1] < 0.7 * rates[0], f"rate trajectory {rates}"
    assert rates[1] == pytest.approx(expected[1]["lr"], rel=1e-4), (rates, expected)
    assert stats[0]["probe_losses"] == pytest.approx(expected[0]["probe_losses"], rel=1e-5)


@pytest.mark.parametrize("name, optimizer, adaptive", [
    ("budget_sgd", GEN_SGD_TOO_LARGE, BUDGET),
    ("budget_adamw_offload", ADAMW_TOO_LARGE, {**BUDGET, "period": 3}),
])
def test_rise_budget_and_backtracking_match_reference(two_rank_results, tiny_assets, name,
                                                      optimizer, adaptive):
    """Every rule of the rise budget on 2 ranks against plain PyTorch: which steps probe
    (period and refits), the probes, the backtracking tries and the multiple the step is
    retaken at, the rate after each fit, and the weights after 4 steps."""
    state, stats = _load(two_rank_results, name, 4)
    expected_state, expected = reference_run(tiny_assets["model"], tiny_assets["data"],
                                             optimizer, GLOBAL_BATCH, 4, adaptive=adaptive)
    assert [s["probe_losses"] is not None for s in stats] == \
        [e.get("probe_losses") is not None for e in expected]
    assert [s["lr"] for s in stats] == pytest.approx([e["lr"] for e in expected], rel=1e-4)
    for got, want in zip(stats, expected):
        if want.get("probe_losses") is not None:
            assert got["probe_losses"] == pytest.approx(want["probe_losses"], rel=1e-5)
        multiple, tries = got["backtrack"] or (1.0, None)
        # the multiple is a root of the parabola through the probes: their 1e-5 agreement
        # becomes ~1e-4 in a root that depends on their differences
        assert multiple == pytest.approx(want.get("step_multiple", 1.0), rel=1e-3)
        assert tries == (None if "backtrack_losses" not in want
                         else pytest.approx(want["backtrack_losses"], rel=1e-5))
    # AdamW at 50x the usual rate: its first step moves each weight by ~lr (see ADAMW's eps
    # note), so summation-order noise between shardings grows with the rate
    atol = WEIGHT_ATOL * (5 if optimizer is ADAMW_TOO_LARGE else 1)
    _assert_same_weights(state, expected_state, atol, f"{name} after 4 steps")


def test_rise_budget_scenarios_exercise_every_rule(two_rank_results):
    """The scenarios above are only a test of the rules if the rules fired: a backtrack that
    shortened a step, a fit that set the rate from the budget, and a refit off the period."""
    sgd = json.loads((two_rank_results / "budget_sgd_step4.json").read_text())
    adamw = json.loads((two_rank_results / "budget_adamw_offload_step4.json").read_text())
    assert any(s["backtrack"] and s["backtrack"][0] < 1.0 for s in sgd), sgd
    assert any(s["backtrack"] and s["backtrack"][0] < 1.0 for s in adamw), adamw
    assert any(s["probe_losses"] is not None and not s["backtrack"][1] for s in sgd + adamw)
    # period 3: steps 0 and 3 fit by the period; any other fit is a refit
    assert any(s["probe_losses"] is not None for s in adamw[1:3]), adamw


def test_a_backtracked_step_is_the_optimizers_step_at_the_shorter_rate(two_rank_results):
    """Backtracking moves the weights to theta_old + s delta, claimed to be the step AdamW
    takes at rate s lr: a replay without probes at those rates (each backtracked step at its
    retaken rate) gives the same moments, step counts and master weights on every rank, up to
    the rounding of theta_old + delta + (s - 1) delta vs theta_old + s delta."""
    _, stats = _load(two_rank_results, "budget_adamw_offload", 4)
    assert any(s["backtrack"] and s["backtrack"][0] < 1.0 for s in stats), stats
    for rank in (0, 1):
        probed = torch.load(two_rank_results / f"budget_adamw_offload_step4_probed_rank{rank}.pt")
        replay = torch.load(two_rank_results / f"budget_adamw_offload_step4_replay_rank{rank}.pt")
        for group in (k for k in probed if k.startswith("group")):
            assert float(probed[group]["step"]) == float(replay[group]["step"]) == 4.0
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(probed[group][key], replay[group][key],
                                           rtol=1e-4, atol=1e-9)
        for a, b in zip(probed["master"], replay["master"]):
            torch.testing.assert_close(a, b, rtol=0, atol=WEIGHT_ATOL)


def test_probes_leave_adamw_state_untouched(two_rank_results):
    """With probes every 2nd step, AdamW moments, step counts and weights equal a replay of the
    same steps at the same rates without any probe — bit for bit, on every rank."""
    for rank in (0, 1):
        probed = torch.load(two_rank_results / f"gen_adamw_step4_probed_rank{rank}.pt")
        replay = torch.load(two_rank_results / f"gen_adamw_step4_replay_rank{rank}.pt")
        assert probed.keys() == replay.keys()
        for group in (k for k in probed if k.startswith("group")):
            assert float(probed[group]["step"]) == 4.0
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(probed[group][key], replay[group][key]), (rank, group, key)
        for a, b in zip(probed["master"], replay["master"]):
            assert torch.equal(a, b), rank
    _, stats = _load(two_rank_results, "gen_adamw", 4)
    assert [s["probe_losses"] is not None for s in stats] == [True, False, True, False]


@pytest.mark.parametrize("name", ["restore_fp32", "restore_bf16"])
def test_probe_restores_weights_bit_exactly(two_rank_results, name):
    for rank in (0, 1):
        result = json.loads((two_rank_results / name / f"rank{rank}.json").read_text())
        assert result["identical"], result
        assert result["loss_perturbed"] != result["loss_before"], "the forward saw no perturbation"
        assert result["loss_after"] == result["loss_before"], result
        # shorten_step (backtracking) in the same layout: master moved, forward re-cast and seen
        assert result["master_error"] <= 1e-7 and result["forward_is_cast"], result
        assert result["loss_shortened"] == result["loss_probe_at_quarter"], result
        assert result["loss_shortened"] != result["loss_before"], result


def test_offloaded_optimizer_and_params_match_reference(two_rank_results, tiny_assets):
    """ZeRO-Offload (optimizer + parameters on CPU): direction, probes and rate still exact."""
    state, stats = _load(two_rank_results, "gen_offload", 3)
    expected_state, expected = reference_run(tiny_assets["model"], tiny_assets["data"], ADAMW,
                                             GLOBAL_BATCH, 3, adaptive=ADAPTIVE)
    assert [s["lr"] for s in stats] == pytest.approx([e["lr"] for e in expected], rel=1e-4)
    for got, want in zip(stats, expected):
        assert got["probe_losses"] == pytest.approx(want["probe_losses"], rel=1e-5)
    _assert_same_weights(state, expected_state, WEIGHT_ATOL, "offload after 3 steps")


def test_non_finite_norm_skips_the_step_on_every_rank(two_rank_results):
    for rank in (0, 1):
        result = json.loads((two_rank_results / "nan_skip" / f"rank{rank}.json").read_text())
        assert result == {"skipped": True, "unchanged": True, "finite": True,
                          "next_skipped": False, "next_moved": True}, (rank, result)


def test_evaluation_does_not_depend_on_rank_count(one_rank_results, two_rank_results, tiny_assets):
    """7 examples (not divisible by 2 ranks, batch 2): same per-example values in the same order,
    and they equal a plain single-process computation."""
    one = json.loads((one_rank_results / "eval" / "scores.json").read_text())
    two = json.loads((two_rank_results / "eval" / "scores.json").read_text())
    assert len(two["scores"]) == 7 and len(two["generations"]) == 7
    assert two["generations"] == one["generations"]
    for (sum_two, count_two), (sum_one, count_one) in zip(two["scores"], one["scores"]):
        assert count_two == count_one
        assert sum_two == pytest.approx(sum_one, rel=1e-5)
    # independent reference: per-example forward of the unpartitioned model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ngdiff_ds.data.encoding import encode_qa
    from ngdiff_ds.data.records import load_qa_split
    from tests.reference import _example_nll

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"]).eval()
    records = load_qa_split(tiny_assets["data"], "forget10")[:7]
    for record, (logprob_sum, count) in zip(records, two["scores"]):
        example = encode_qa(tokenizer, record["question"], record["answer"], 64)
        with torch.no_grad():
            expected = -_example_nll(model, example).item() * count
        assert logprob_sum == pytest.approx(expected, rel=1e-5)


def test_muse_text_scoring_does_not_depend_on_rank_count(one_rank_results, two_rank_results,
                                                         tiny_assets):
    """Per-token log-probs of 7 passages and greedy continuations of their first sentences:
    2 ranks (7 not divisible, batch 2) equal 1 rank and an unpartitioned float64 forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ngdiff_ds.data.records import load_text_split
    from tests.test_muse_eval import reference_token_logprobs

    one = json.loads((one_rank_results / "eval" / "scores.json").read_text())
    two = json.loads((two_rank_results / "eval" / "scores.json").read_text())
    assert len(two["token_logprobs"]) == 7 and len(two["continuations"]) == 7
    assert two["continuations"] == one["continuations"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"]).eval()
    passages = [r["text"] for r in load_text_split(tiny_assets["data"], "full_text")][:7]
    for text, values_two, values_one in zip(passages, two["token_logprobs"], one["token_logprobs"]):
        assert values_two == pytest.approx(values_one, rel=1e-5, abs=1e-6)
        assert values_two == pytest.approx(reference_token_logprobs(model, tokenizer, text),
                                           rel=1e-4, abs=1e-5)


def _flatten(value, prefix=""):
    """Every number (and string) of a results entry, keyed by its path."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}/{key}"))
        return out
    if isinstance(value, list):
        out = {}
        for index, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{index}]"))
        return out
    return {prefix: value}


def test_every_metric_of_the_evaluation_does_not_depend_on_rank_count(one_rank_results,
                                                                      two_rank_results):
    """TOFU (9-component utility, memorisation, QA-side attacks, tofu_privleak) and MUSE
    (VerbMem, text attacks, privleak) on a few examples of each set: 2 ranks give the values
    and generations of 1 rank, per example."""
    one = json.loads((one_rank_results / "eval" / "scores.json").read_text())["results"]
    two = json.loads((two_rank_results / "eval" / "scores.json").read_text())["results"]
    for name in ("model_utility", "extraction_strength", "exact_memorization", "tofu_mia_min_k",
                 "tofu_mia_min_k_plus_plus", "tofu_privleak", "forget_Q_A_PERT_Prob",
                 "ra_Q_A_Prob_normalised", "mia_zlib", "mia_min_k_plus_plus", "privleak",
                 "forget_verbmem_ROUGE"):
        assert name in one, name
    assert set(two) == set(one)
    flat_one, flat_two = _flatten(one), _flatten(two)
    assert set(flat_two) == set(flat_one)
    for path, value in flat_one.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert flat_two[path] == pytest.approx(value, rel=1e-4, abs=1e-6), path
        else:
            assert flat_two[path] == value, path


def test_finetune_on_mixed_lengths_matches_reference(two_rank_results, tiny_assets):
    """run_finetune over 2 ranks with micro-batch 1 on QA pairs and passages (each step's
    short and long rows run as separate forwards) equals plain one-example-at-a-time SGD."""
    from tests.dist_worker import FINETUNE_MAX_LENGTH, FINETUNE_SPLITS, FINETUNE_WARMUP
    from tests.reference import reference_finetune

    state = torch.load(two_rank_results / "finetune.pt")
    expected = reference_finetune(tiny_assets["model"], tiny_assets["data"], FINETUNE_SPLITS,
                                  FINETUNE_MAX_LENGTH, global_batch=2, steps=4,
                                  peak_lr=FINETUNE_SGD["params"]["lr"],
                                  warmup_steps=FINETUNE_WARMUP, seed=5)
    initial = reference_finetune(tiny_assets["model"], tiny_assets["data"], FINETUNE_SPLITS,
                                 FINETUNE_MAX_LENGTH, 2, 0, 0.0, 1, 5)
    moved = max((expected[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 20 * WEIGHT_ATOL, f"reference barely moved ({moved})"
    _assert_same_weights(state, expected, WEIGHT_ATOL, "fine-tune after 4 steps")
