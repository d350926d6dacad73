"""benchmarks/foreign_models.py: the models it finds, the inputs it makes, and the verdict it writes."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import foreign_models  # noqa: E402


@pytest.mark.parametrize("name", foreign_models.MODELS)
def test_every_listed_model_ships_with_onnx(name):
    assert foreign_models.light_model(name).is_file()


def test_an_unknown_model_names_the_missing_file():
    with pytest.raises(FileNotFoundError, match="light_nosuchnet.onnx is missing"):
        foreign_models.light_model("nosuchnet")


def test_feeds_cover_the_graph_inputs_and_skip_initializers():
    feeds = foreign_models.random_feeds(foreign_models.light_model("squeezenet"))
    assert {name: (a.shape, str(a.dtype)) for name, a in feeds.items()} == {"data_0": ((1, 3, 224, 224), "float32")}


def test_results_files_and_verdict(tmp_path, monkeypatch):
    monkeypatch.setattr(foreign_models, "RESULTS", tmp_path)
    rows = [{"target": "host", "model": m, "ort_ms": 2.0, "tvm_ms": t, "tvm_over_ort": t / 2.0, "compile_s": 5.0,
             "packed_conv2d": 3, "packed_dense": 1, "generic_kernels": 4, "kernels": 9}
            for m, t in (("a", 2.2), ("b", 3.0))]
    markdown = foreign_models.write(rows, {"date": "today"}, "fm")
    assert "1 of 2 models within 1.25x ONNX Runtime's latency; worst b 1.50x." in markdown
    assert json.loads((tmp_path / "fm.json").read_text())["rows"] == rows
    assert (tmp_path / "fm.md").read_text() == markdown
