"""benchmarks/models.py and benchmarks/read_floor.py: the weight-read floor and the verdict lines built on it."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import models  # noqa: E402
import read_floor  # noqa: E402


def _row(**changes) -> dict:
    row = {"target": "host", "model": "mlp", "batch": 1, "ort_ms": 0.150, "untuned_ms": 0.170, "records_ms": 0.160,
           "untuned_over_ort": 0.170 / 0.150, "records_over_ort": 0.160 / 0.150, "weights_mib": 7.1,
           "floor_ms": 0.120, "above_floor": (0.160 - 0.120) / (0.150 - 0.120), "packed": "3 dense + 0 conv",
           "kernels_from_records": "6/7"}
    return {**row, **changes}


@pytest.mark.parametrize("row, line", [
    (_row(), "mlp b1: reading its 7.1 MiB of weights takes 80% of ORT's time; 0.9 x ORT leaves 0.015 ms for the "
             "rest, where ORT spends 0.030 and TVM 0.040"),
    (_row(floor_ms=0.2, above_floor=None), "mlp b1: the read floor measured above ORT's time: noise, rerun"),
    (_row(batch=32, ort_ms=0.46, records_ms=0.47, records_over_ort=0.47 / 0.46), None),  # not bound by the weights
    (_row(records_ms=0.13, records_over_ort=0.13 / 0.150), None),                        # meets the goal
])
def test_verdict_explains_rows_bound_by_their_weights(row, line):
    lines = models.verdicts([row])
    assert lines[0].startswith("host: worst untuned/ORT")
    assert lines[1:] == ([f"  {line}"] if line else [])


def test_table_shows_the_floor_and_a_dash_when_ort_beat_it():
    text = models.table([_row(), _row(floor_ms=0.2, above_floor=None)])
    assert "| 7.1 | 0.120 | 1.33 |" in text and "| 7.1 | 0.200 | - |" in text


@pytest.mark.parametrize("by_round, cell", [
    ([1.04, 0.95, 0.99], "| 1.07 | 0.95-1.04 | 7.1 |"),
    ([0.9], "| 1.07 | 0.90-0.90 | 7.1 |"),
    (None, "| 1.07 | - | 7.1 |"),  # a row of a results file written before the rounds were kept
])
def test_table_shows_the_records_ratio_of_each_round(by_round, cell):
    row = _row() if by_round is None else _row(records_over_ort_by_round=by_round)
    assert cell in models.table([row])


@pytest.mark.skipif(importlib.util.find_spec("tvm") is None, reason="needs TVM: pip install -e '.[tvm]'")
def test_read_floor_reads_at_least_the_bytes_asked(monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "1")  # read_floor sets it for its process: restored after the test
    got = read_floor.read_floor(1 << 20, calls=3)
    assert got["bytes"] >= 1 << 20 and got["floor_ms"] > 0 and got["threads"] >= 1
    assert got["gb_per_s"] == pytest.approx(got["bytes"] / got["floor_ms"] / 1e6)


def test_read_floor_cli_refuses_a_non_positive_size():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "read_floor.py"), "0"], capture_output=True, text=True)
    assert done.returncode == 2 and "BYTES and --calls must be positive" in done.stderr


def test_interleaved_samples_time_every_model_once_per_round_in_fresh_processes(tmp_path):
    """Real worker processes: one latency per model and round (what the per-round ratios divide), and a model
    whose outputs differ from the reference's is refused."""
    from torch import nn

    from exporting import export_seeded
    from isolated import interleaved_medians, interleaved_samples

    good = export_seeded(lambda: nn.Linear(8, 4), (1, 8), tmp_path / "good.onnx")
    other = export_seeded(lambda: nn.Linear(8, 4, bias=False), (1, 8), tmp_path / "other.onnx")  # same output name
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)}
    samples = interleaved_samples({"ort": good, "again": good}, feeds, calls=3, rounds=2)
    assert set(samples) == {"ort", "again"} and all(len(v) == 2 and min(v) > 0 for v in samples.values())
    with pytest.raises(AssertionError, match="other output .* is off by"):
        interleaved_medians({"ort": good, "other": other}, feeds, calls=3, rounds=1)
