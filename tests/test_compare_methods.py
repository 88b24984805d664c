"""benchmarks/compare_methods.py: its --quick mode end to end on the tiny model (the CI smoke
test: the same files and plot as the full comparison), and its rate pick by hand."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO, cpu_env

sys.path.insert(0, str(REPO / "benchmarks"))
import compare_methods  # noqa: E402


@pytest.fixture(scope="module")
def quick(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    model = tiny_assets["model"]
    # the tiny random model never says eos: generations as short as the CI budget wants
    extra = ["--model", model, "--data", tiny_assets["data"], "--max-length", "64",
             "--eval-batch-size", "8", "--max-new-tokens", "4", "--verbmem-max-new-tokens", "4",
             "--knowmem-max-new-tokens", "4", "--eval-retain-size", "4", "--select-best", "fq_mu"]
    result = subprocess.run(
        [sys.executable, "benchmarks/compare_methods.py", "--quick", "--output-dir", str(out),
         "--retain-model", model, "--extra-all", shlex.join(extra)],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, result


@pytest.mark.slow
def test_quick_mode_writes_the_table_the_plot_and_every_run(quick):
    out, result = quick
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    # NGDiff first: it scores the shared points (NPO's reference log-probs, KL's frozen copy
    # through the run's own set-up)
    assert list(runs) == ["ngdiff_npo", "gdiff_kl_lr1e-04"]
    second = "gdiff_kl_lr1e-04"
    assert runs["ngdiff_npo"]["adaptive_lr"] is not None and runs[second]["adaptive_lr"] is None
    assert runs[second]["method_as_run"]["combine_options"] == ["alpha=1", "gamma=1"]
    assert runs[second]["method_as_run"]["retain_loss"] == "kl"
    # the second run reads the reference and the starting model's point from the first
    settings = (out / second / "settings.txt").read_text()
    assert "--retain-results" in settings and "--no-eval-before" in settings
    assert not (out / second / "eval" / "before_summary.json").exists()
    rows = [json.loads(line) for line in (out / second / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    kl = [r["retain_loss"] for r in train]  # 0 at the start, then growing as the model moves
    assert abs(kl[0]) < 1e-9 and 0 < kl[1] < kl[2] < kl[3], kl
    rows = [json.loads(line) for line in (out / "ngdiff_npo" / "metrics.jsonl").read_text().splitlines()]
    first_step = next(r for r in rows if r["kind"] == "train")
    assert first_step["forget_loss"] == pytest.approx(20 * 0.6931471805599453, rel=1e-5)
    for name, run in runs.items():
        assert [p["label"] for p in run["points"]] == ["before", "step2", "final"], name
        # the table's numbers are the run's own evaluation files
        final = json.loads((out / name / "eval" / "final_summary.json").read_text())
        assert run["final"]["forget_quality"] == pytest.approx(final["forget_quality"])
        assert run["final"]["model_utility"] == pytest.approx(final["model_utility"])
        # --select-best fq_mu: the run's own pick, checked by hand, and its model saved
        summary = json.loads((out / name / "summary.json").read_text())
        candidates = {label: json.loads((out / name / "eval" / f"{label}_summary.json").read_text())
                      for label in ("step2", "final")}
        by_hand = max(candidates, key=lambda k: (candidates[k]["forget_quality"]
                                                 + candidates[k]["model_utility"]) / 2)
        assert summary["best_point"]["label"] == by_hand
        assert (out / name / "model_best" / "config.json").is_file()
    table = (out / "table.md").read_text()
    for _, header in compare_methods.COLUMNS:
        assert header in table
    assert "gdiff_kl | 1e-04 **(picked)** | final" in table
    assert "| (starting model) | - | before |" in table
    assert "ran 2 of 2 runs" in result.stdout


def test_the_rate_with_the_best_scored_point_is_picked():
    def record(name, method, score):
        return {"name": name, "method": method, "score": score}

    records = [record("ga_lr3e-05", "ga", None), record("ga_lr1e-04", "ga", 0.2),
               record("ga_lr3e-04", "ga", 0.05), record("npo_lr1e-04", "npo", None),
               record("ngdiff", "ngdiff", 0.4)]
    assert compare_methods.pick_rates(records) == {
        "ga": "ga_lr1e-04", "npo": "npo_lr1e-04", "ngdiff": "ngdiff"}


def test_quick_is_two_presets_one_rate_few_steps():
    args = compare_methods.parse_args(["--quick"])
    runs = compare_methods.planned_runs(args)
    assert [(r["method"], r["rate"]) for r in runs] == [("ngdiff_npo", None), ("gdiff_kl", 1e-4)]
    assert args.steps == 4
    full = compare_methods.planned_runs(compare_methods.parse_args([]))
    assert len(full) == 2 + 6 * 3  # NGDiff's two without a sweep, six baselines at three rates
    assert [r["method"] for r in full[:2]] == ["ngdiff", "ngdiff_npo"]
