"""benchmarks/throughput.py and benchmarks/scaling_report.py.

The smoke test runs the real benchmark for 2 steps per mode at 2 ranks under the deepspeed
launcher on a tiny model; it checks the files and their shape, never a speed (throughput
targets live in the benchmarks). The report test merges hand-written records whose
efficiencies are computed here by hand.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO, run_deepspeed

sys.path.insert(0, str(REPO / "benchmarks"))

MODES = ("ngdiff", "ngdiff_adaptive", "floor", "gdiff")
TINY = ["--hidden-size", "32", "--layers", "2", "--heads", "2", "--vocab-size", "256",
        "--seq-len", "16", "--micro-batch-size", "2", "--steps", "2", "--warmup", "1"]


@pytest.mark.slow
def test_throughput_runs_every_mode_at_two_ranks(tmp_path):
    out = tmp_path / "out"
    result = run_deepspeed(2, "benchmarks/throughput.py",
                           [*TINY, "--model-cache", str(tmp_path), "--output-dir", str(out)],
                           timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "throughput.json").read_text())
    assert record["world_size"] == 2 and record["nodes"] == 1
    assert record["global_batch"] == 4 and record["tokens_per_step"] == 2 * 2 * 2 * 16
    assert sorted(record["modes"]) == sorted(MODES)
    for mode, entry in record["modes"].items():
        assert entry["tokens_per_s"] > 0 and entry["tokens_per_s_per_rank"] > 0, mode
        assert len(entry["step_times_s"]) == 2, mode
        assert len(entry["peak_memory_bytes_per_rank"]) == 2, mode
        assert entry["plan"]["predicted_peak_bytes"] > 0, mode
        assert entry["measured_over_plan"] > 0, mode
    assert record["modes"]["gdiff"]["breakdown_median_s"]["joint_fwd_bwd"] > 0
    assert record["modes"]["ngdiff"]["breakdown_median_s"]["forget_fwd_bwd"] > 0
    assert "| ngdiff_adaptive |" in (out / "throughput.md").read_text()
    assert (out / "throughput.png").stat().st_size > 0


def _record(ranks: int, nodes: int, rates: dict, micro_batch: int = 4) -> dict:
    """The fields of a throughput.json the report reads."""
    return {"benchmark": "throughput", "scaling": "weak", "world_size": ranks, "nodes": nodes,
            "hosts": nodes, "micro_batch_size": micro_batch, "global_batch": micro_batch * ranks,
            "accum": 1, "seq_len": 64, "precision": "fp32", "gradient_checkpointing": False,
            "device_name": "cpu",
            "model": {"parameters": 20_000_000, "hidden_size": 256, "layers": 4,
                      "vocab_size": 32000},
            "modes": {mode: {"tokens_per_s": rate} for mode, rate in rates.items()}}


def test_scaling_report_efficiency_by_hand(tmp_path, capsys):
    import scaling_report

    records = {"one": _record(1, 1, {"ngdiff": 1000.0, "ngdiff_adaptive": 900.0,
                                     "floor": 1100.0, "gdiff": 1500.0}),
               "two": _record(2, 2, {"ngdiff": 1800.0, "ngdiff_adaptive": 1800.0,
                                     "floor": 1650.0, "gdiff": 3300.0}),
               "other": _record(2, 1, {"ngdiff": 500.0}, micro_batch=8)}  # another study
    for name, record in records.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "throughput.json").write_text(json.dumps(record))
    out = tmp_path / "report"
    scaling_report.main([str(tmp_path), "--output-dir", str(out)])
    rows = {(row["nodes"], row["ranks"], row["micro_batch_size"]): row
            for row in json.loads((out / "scaling.json").read_text())["rows"]}
    assert rows[(1, 1, 4)]["efficiency"] == {m: 1.0 for m in MODES}
    # 2 ranks: efficiency = tokens/s / (2 x the 1-rank tokens/s)
    expected = {"ngdiff": 1800 / 2000, "ngdiff_adaptive": 1800 / 1800, "floor": 1650 / 2200,
                "gdiff": 3300 / 3000}
    assert rows[(2, 2, 4)]["efficiency"] == pytest.approx(expected)
    assert rows[(2, 2, 4)]["tokens_per_s"]["gdiff"] == 3300.0
    assert rows[(1, 2, 8)]["efficiency"] == {"ngdiff": 1.0}  # its own baseline
    table = (out / "scaling.md").read_text()
    assert "| 0.90 | 1.00 | 0.75 | 1.10 |" in table
    assert (out / "scaling.png").stat().st_size > 0
    assert "0.75" in capsys.readouterr().out


def test_flops_per_token_and_peak_table():
    import throughput

    dims = {"layers": 4, "heads": 4, "head_dim": 64, "tie_word_embeddings": False}
    # 6 x (parameters - input embedding) + 12 x layers x heads x head_dim x seq
    assert throughput.flops_per_token(dims, 1_000_000, 100_000, 128) == (
        6 * 900_000 + 12 * 4 * 4 * 64 * 128)
    tied = {**dims, "tie_word_embeddings": True}
    assert throughput.flops_per_token(tied, 1_000_000, 100_000, 128) == (
        6 * 1_000_000 + 12 * 4 * 4 * 64 * 128)
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert throughput.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert throughput.peak_flops("NVIDIA H200") == 989e12
    assert throughput.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert throughput.peak_flops("Some CPU") is None


def test_strong_scaling_splits_the_global_batch():
    import throughput

    args = throughput.parse_args(["--global-batch", "16", "--accum", "2"])
    assert args.scaling == "strong"
    assert throughput.micro_batch_for(args, world_size=4, rank=0) == 2
    with pytest.raises(SystemExit) as stopped:
        throughput.micro_batch_for(args, world_size=3, rank=1)
    assert stopped.value.code == 2
