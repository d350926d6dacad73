"""The library calls behind the thin CLI, called directly from Python: compress_checkpoint / train_checkpoint
(adntn_deploy.workflows), export_checkpoint (onnx_export), benchmark / load_feeds / read_npz (runtime) and
preset_rows / inspect_targets (inspection)."""

import numpy as np
import pytest
import torch

from tolerance import float32_rtol, relative_error
from adntn_deploy.checkpoint import CheckpointError, read_checkpoint
from adntn_deploy.data import Dataset
from adntn_deploy.errors import ExportError, GeneratorError, InferenceError
from adntn_deploy.models import build_sequential
from adntn_deploy.outputs import OutputError
from adntn_deploy.runtime import InputError, TensorInfo, benchmark, load, load_feeds, read_npz
from adntn_deploy.workflows import compress_checkpoint, train_checkpoint


@pytest.fixture(scope="module")
def tiny_data():
    """A 3-class problem on 1x4x4 inputs whose labels a linear rule decides: learnable in one epoch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(384, 1, 4, 4, generator=gen)
    y = (x.flatten(1) @ torch.randn(16, 3, generator=gen)).argmax(1)
    return Dataset("tiny", x[:256], y[:256], x[256:320], y[256:320], x[320:], y[320:], ("a", "b", "c"))


def _dense_model():
    torch.manual_seed(0)
    return build_sequential({"type": "sequential", "layers": [
        {"type": "flatten"},
        {"type": "linear", "in_features": 16, "out_features": 32}, {"type": "relu"},
        {"type": "linear", "in_features": 32, "out_features": 32}, {"type": "relu"},
        {"type": "linear", "in_features": 32, "out_features": 3},
    ]})


@pytest.fixture(scope="module")
def compressed(tiny_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("workflows") / "small.ckpt"
    outcome = compress_checkpoint(_dense_model(), path, tiny_data, ratio=4, fit_steps=5, calibrate=64, epochs=1,
                                  scope="head", measure_fit=True, seed=0)
    return outcome, path


def test_compress_checkpoint_writes_what_the_command_wrote(compressed, tiny_data):
    outcome, path = compressed
    assert outcome.checkpoint == path and [r.name for r in outcome.report.layers] == ["1", "3"]
    assert all(r.ratio >= 4 for r in outcome.report.layers)
    assert 0 <= outcome.accuracy <= 1 and 0 <= outcome.fitted_accuracy <= 1 and outcome.finetune.scope == "head"
    summary = outcome.summary()
    assert set(summary) == {"source", "data", "dense_accuracy", "accuracy", "compression", "finetune", "seconds", "checkpoint"}
    assert summary["source"] == "the given model" and summary["seconds"] > 0
    info = read_checkpoint(path)
    assert set(info.generators) == {"1", "3"}
    assert info.extra["inputs"] == [{"name": "input", "shape": [1, 1, 4, 4]}]
    assert info.extra["dense_accuracy"] == outcome.dense_accuracy and info.extra["test_accuracy"] == outcome.accuracy


def test_compress_checkpoint_without_a_file_and_from_a_checkpoint(compressed, tiny_data, tmp_path):
    _, path = compressed
    outcome = compress_checkpoint(path, None, tiny_data, layers="Linear", bond_dim=2, fit_steps=2, calibrate=0, epochs=0,
                                  distill=False, dense_accuracy=0.5)
    assert outcome.checkpoint is None and outcome.finetune is None and outcome.dense_accuracy == 0.5
    assert outcome.source == f"checkpoint {path}" and [r.name for r in outcome.report.layers] == ["5"]


@pytest.mark.parametrize("kwargs, error, message", [
    ({"model": "resnet"}, CheckpointError, r"model= 'resnet' is neither a checkpoint file nor a zoo model"),
    ({"ratio": None}, GeneratorError, r"exactly one of bond_dim= or ratio="),
    ({"output": "{input}"}, OutputError, r"output= .* would overwrite the input checkpoint"),
])
def test_compress_checkpoint_refuses_before_any_work(compressed, tiny_data, kwargs, error, message):
    _, path = compressed
    before = path.read_bytes()
    options = {"model": path, "output": path.with_name("other.ckpt"), "ratio": 4, **kwargs}
    if options["output"] == "{input}":
        options["output"] = path
    with pytest.raises(error, match=message):
        compress_checkpoint(options.pop("model"), options.pop("output"), tiny_data, **options)
    assert path.read_bytes() == before and not path.with_name("other.ckpt").exists()


def test_train_checkpoint_checks_the_model_name_before_reading_data(tmp_path):
    with pytest.raises(GeneratorError, match="unknown model 'resnet': the zoo has"):
        train_checkpoint("resnet", tmp_path / "x.ckpt", "fashion-mnist", data_dir=tmp_path)
    with pytest.raises(GeneratorError, match="family= and ratio= together"):
        train_checkpoint("mlp", tmp_path / "x.ckpt", "digits", family="ttn")
    assert not (tmp_path / "x.ckpt").exists()


def test_export_checkpoint_matches_torch_and_runs_in_the_runtime(compressed, tiny_data, tmp_path):
    from adntn_deploy.checkpoint import load_checkpoint
    from adntn_deploy.onnx_export import export_checkpoint

    _, path = compressed
    result = export_checkpoint(path, tmp_path / "small.onnx", dynamic_batch=True)
    assert result.path == tmp_path / "small.onnx" and result.bytes == result.path.stat().st_size
    assert len(result.generators) == 2 and result.streamed == []
    predictor = load(result.path)
    x = tiny_data.test_x[:8].numpy()
    timing = benchmark(predictor, {"input": x}, repeat=3, warmup=1)
    with torch.no_grad():
        expected = load_checkpoint(path)(torch.from_numpy(x)).numpy()
    (got,) = timing.outputs.values()
    assert relative_error(got, expected) < float32_rtol(32)
    # shapes given explicitly win over the recorded ones; a bad one names the parameter
    export_checkpoint(path, tmp_path / "given.onnx", input_shapes={"input": (2, 1, 4, 4)})
    with pytest.raises(ExportError, match=r"input_shapes= 'input': \(0, 4\) is not a shape of positive integers"):
        export_checkpoint(path, tmp_path / "bad.onnx", input_shapes=[("input", (0, 4))])
    with pytest.raises(OutputError, match="output= .* is the input"):
        export_checkpoint(path, path)


class FakePredictor:
    """Counts its calls; each returns the call number."""

    inputs = (TensorInfo("x", (None, 3), np.dtype("float32")), )

    def __init__(self):
        self.calls = 0

    def run(self, feeds):
        assert set(feeds) == {"x"}
        self.calls += 1
        return {"y": np.array(self.calls)}


def test_benchmark_runs_warmup_then_timed_calls():
    fake = FakePredictor()
    timing = benchmark(fake, {"x": np.zeros((1, 3), np.float32)}, repeat=5, warmup=2)
    assert fake.calls == 7 and timing.calls == 5 and timing.warmup == 2 and int(timing.outputs["y"]) == 7
    stats = timing.stats()
    assert set(stats) == {"calls", "mean", "p50", "p90", "p99", "min"} and stats["calls"] == 5
    assert 0 <= stats["min"] <= stats["p50"] <= stats["p99"] and timing.median_ms == pytest.approx(stats["p50"])
    # a plain callable taking the feeds works too; no warm-up means exactly `repeat` calls
    seen = []
    assert benchmark(lambda feeds: seen.append(feeds) or len(seen), {"x": 1}, repeat=3, warmup=0).outputs == 3
    assert len(seen) == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"repeat": 0}, "repeat= must be an integer of at least 1"),
    ({"warmup": -1}, "warmup= must be an integer of at least 0"),
    ({"repeat": 2.5}, "repeat= must be"),
])
def test_benchmark_refuses_bad_counts(kwargs, message):
    fake = FakePredictor()
    with pytest.raises(InferenceError, match=message):
        benchmark(fake, {"x": np.zeros((1, 3), np.float32)}, **kwargs)
    assert fake.calls == 0


def test_load_feeds_random_and_from_npz(tmp_path):
    feeds = load_feeds(FakePredictor(), seed=3)
    assert feeds["x"].shape == (1, 3) and feeds["x"].dtype == np.float32
    np.testing.assert_array_equal(feeds["x"], load_feeds(FakePredictor(), seed=3)["x"])
    np.savez(tmp_path / "one.npz", np.ones((2, 3), np.float32))  # a single unnamed array feeds the only input
    assert load_feeds(FakePredictor(), tmp_path / "one.npz")["x"].shape == (2, 3)
    np.save(tmp_path / "one.npy", np.ones((2, 3), np.float32))  # so does numpy.save's single array
    assert load_feeds(FakePredictor(), tmp_path / "one.npy")["x"].shape == (2, 3)
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="holds Python objects"):
        read_npz(tmp_path / "obj.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read inputs from .*numpy.savez"):
        read_npz(tmp_path / "bad.npz")


def test_run_model_feeds_times_and_saves_in_one_call(tmp_path):
    """run_model is the whole ``run`` command: open, feed, time, save; a save over an input is refused first."""
    import torch
    from torch import nn

    from adntn_deploy.onnx_export import export_onnx
    from adntn_deploy.outputs import OutputError
    from adntn_deploy.runtime.session import run_model

    torch.manual_seed(0)
    path = tmp_path / "lin.onnx"
    export_onnx(nn.Linear(3, 2).eval(), [torch.randn(1, 3)], path, input_names=["x"])
    np.savez(tmp_path / "in.npz", x=np.ones((1, 3), np.float32))
    result = run_model(path, tmp_path / "in.npz", tmp_path / "out", repeat=3, warmup=0)
    assert result.backend == "ort" and result.timing.calls == 3 and result.written == tmp_path / "out.npz"
    (name,) = result.outputs
    np.testing.assert_array_equal(np.load(result.written)[name], result.outputs[name])
    assert result.summary()["inputs"] == {"x": [1, 3]} and result.summary()["latency_ms"]["calls"] == 3
    before = (tmp_path / "in.npz").read_bytes()
    with pytest.raises(OutputError, match="outputs= .* is the input"):
        run_model(path, tmp_path / "in.npz", tmp_path / "in.npz")
    assert (tmp_path / "in.npz").read_bytes() == before


def test_inspection_calls(compressed):
    from adntn_deploy.inspection import inspect_targets, preset_rows

    rows = preset_rows("alexnet")
    assert rows and all(r["ratio"] > 1 for r in rows) and len(preset_rows()) > len(rows)
    _, path = compressed
    notes = []
    found = inspect_targets([str(path), rows[0]["name"]], notes=notes.append)
    assert [r["name"] for r in found] == ["1", "3", rows[0]["name"]] and found[0]["source"] == str(path)
    with pytest.raises(GeneratorError, match="neither a file nor a preset"):
        inspect_targets(["no-such-preset"])
    assert notes == []
