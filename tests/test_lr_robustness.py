"""benchmarks/lr_robustness.py without running the runs: reading a run directory, the table,
and the acceptance checks, on run directories written by hand."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import lr_robustness  # noqa: E402


def fake_run(directory, start, rates, forget, retain, fits=()):
    """A run directory as unlearn.py writes it: summary.json and metrics.jsonl."""
    directory.mkdir(parents=True)
    (directory / "summary.json").write_text(json.dumps({
        "before": {"forget_nll": forget[0], "retain_nll": retain[0]},
        "after": {"forget_nll": forget[1], "retain_nll": retain[1]}}))
    rows = [{"kind": "train", "step": i, "lr": lr} for i, lr in enumerate(rates)]
    rows += [{"kind": "lr_fit", "step": step, "reason": reason, "rule": rule,
              "step_multiple": multiple} for step, reason, rule, multiple in fits]
    (directory / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return directory


def test_read_run_finds_the_first_step_below_1e3_and_counts_the_fits(tmp_path):
    run = fake_run(tmp_path / "a", 1e-2, [1e-2, 5e-3, 9e-4, 2e-4], (0.1, 0.4), (0.1, 0.15),
                   fits=[(0, "rise 24 over the budget 0.01", "backtrack", 0.5),
                         (1, "not downhill", "rise budget", 1.0), (2, "non-finite loss", "kept", 1.0)])
    record = lr_robustness.read_run(run, "adaptive", 1e-2)
    assert record["rates"] == [5e-3, 5e-3, 9e-4, 2e-4]  # step 0 was retaken at half its rate
    assert record["first_step_below"] == 2 and record["final_rate"] == 2e-4
    assert lr_robustness.fit_counts(record) == "1 / 1 / 1"
    assert lr_robustness.ratio(record, "forget_nll") == pytest.approx(4.0)
    table = lr_robustness.table([record])
    assert "| 1e-02 | adaptive | 1 / 1 / 1 | 0.0002 | 2 |" in table
    assert "0.100 -> 0.400 (4.0x)" in table and "0.100 -> 0.150 (1.50x)" in table


def test_acceptance_checks_follow_the_issue(tmp_path):
    """From 1e-6..1e-3: retain <= 2x and forget >= 3x; from 1e-2: retain <= 5x and the rate
    below 1e-3 by step 16; at the extremes adaptive beats fixed."""
    runs = {
        ("adaptive", 1e-6): ([1e-6] * 3, (0.1, 0.31), (0.1, 0.19)),   # passes
        ("fixed", 1e-6): ([1e-6] * 3, (0.1, 0.10), (0.1, 0.10)),
        ("adaptive", 1e-4): ([1e-4] * 3, (0.1, 0.29), (0.1, 0.15)),   # forgets too little
        ("adaptive", 1e-2): ([1e-2] * 17 + [1e-4], (0.1, 3.0), (0.1, 0.3)),  # too late
        ("fixed", 1e-2): ([1e-2] * 18, (0.1, 70.0), (0.1, 20.0)),
    }
    records = [lr_robustness.read_run(fake_run(tmp_path / f"{mode}{start}", start, *values),
                                      mode, start)
               for (mode, start), values in runs.items()]
    checks = dict((what.split(":")[0] + (" vs" if "than" in what else ""), ok)
                  for ok, what in lr_robustness.acceptance(records))
    assert checks == {"start 1e-06": True, "start 1e-06 vs": True, "start 1e-04": False,
                      "start 1e-02": False, "start 1e-02 vs": True}


def test_the_commands_are_the_main_command_with_the_start_rate(tmp_path):
    args = lr_robustness.parse_args(["--steps", "7", "--extra=--lr-period 4"])
    adaptive = lr_robustness.command_of(args, "adaptive", 1e-3, tmp_path)
    fixed = lr_robustness.command_of(args, "fixed", 1e-3, tmp_path)
    gen = lr_robustness.command_of(args, "gen", 1e-3, tmp_path)
    assert adaptive[:3] == ["deepspeed", "--num_gpus", "2"] and "launch/unlearn.py" in adaptive
    for command in (adaptive, fixed, gen):
        assert command[command.index("--lr") + 1] == "0.001"
        assert command[command.index("--max-steps") + 1] == "7" and "--no-eval" in command
    assert adaptive[-2:] == ["--lr-period", "4"] and "--no-adaptive-lr" in fixed
    assert gen[gen.index("--lr-max-rise") + 1] == "0" and "--lr-period" not in gen
