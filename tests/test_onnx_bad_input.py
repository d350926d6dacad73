"""Bad ONNX files and bad run-time inputs: one clear line and a non-zero exit, never a deep traceback.

The CLI runs in this process (the cli_runner fixture): what is checked is its messages and exit codes; an
exception it failed to turn into one line would fail the test itself.
"""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tolerance import float32_rtol, relative_error
from adntn_deploy.checkpoint import save_checkpoint
from adntn_deploy.models import build_sequential
from adntn_deploy.nn import ADNTNLinear
from adntn_deploy.onnx_export import DOMAIN, export_onnx
from adntn_deploy.onnx_export.reader import OnnxModelError
from adntn_deploy.runtime import InputError, TensorInfo, load


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "good.onnx"
    model = nn.Sequential(ADNTNLinear(32, 16, family="mera"), nn.ReLU(), ADNTNLinear(16, 4)).eval()
    export_onnx(model, [torch.randn(2, 32)], path, input_names=["input"], dynamic_batch=True)
    return path


def _generator_nodes(model):
    return [n for n in model.graph.node if n.domain == DOMAIN]


def _mutate(model, how):
    node = _generator_nodes(model)[0]
    if how == "unknown-op":
        node.op_type = "PEPS"
    elif how == "newer-opset":
        next(o for o in model.opset_import if o.domain == DOMAIN).version = 7
    elif how == "missing-core":
        name = node.input[0]
        kept = [i for i in model.graph.initializer if i.name != name]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    elif how == "wrong-core-shape":
        init = next(i for i in model.graph.initializer if i.name == node.input[0])
        init.CopyFrom(onnx.numpy_helper.from_array(np.zeros([d + 1 for d in init.dims], np.float32), init.name))
    elif how == "bad-program":
        next(a for a in node.attribute if a.name == "program").s = b"{not json"
    elif how == "no-function":
        del model.functions[:]
    return model


@pytest.mark.parametrize(
    "how, message",
    [
        ("unknown-op", "unknown op ai.adntn::PEPS"),
        ("newer-opset", "upgrade adntn-deploy"),
        ("missing-core", "is missing"),
        ("wrong-core-shape", "the program expects"),
        ("bad-program", "unreadable generator program"),
        ("no-function", "no function body"),
    ],
)
def test_invalid_adntn_nodes(tmp_path, good_model, cli_runner, how, message):
    bad = tmp_path / f"{how}.onnx"
    onnx.save(_mutate(onnx.load(good_model), how), bad)
    with pytest.raises(OnnxModelError, match=message):
        load(bad)
    proc = cli_runner("run", bad)
    assert proc.returncode == 1
    assert message.split(" ")[0] in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), (b"", "holds no graph"), (b"\x08\x07garbage\xff\xff", "not a valid ONNX file"), ("half", "")],
)
def test_unreadable_files(tmp_path, good_model, cli_runner, content, message):
    path = tmp_path / "broken.onnx"
    if content == "half":
        path.write_bytes(good_model.read_bytes()[: good_model.stat().st_size // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(OnnxModelError, match=message):
        load(path)
    for command in ("run", "inspect"):
        proc = cli_runner(command, path)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "feeds, message",
    [
        ({"input": np.zeros((2, 31), np.float32)}, "expects"),
        ({"input": np.zeros((2, 32), np.float64)}, "dtype float64"),
        ({"input": np.zeros((32,), np.float32)}, "rank 2"),
        ({"x": np.zeros((2, 32), np.float32)}, "unknown \\['x'\\]"),
        ({}, "missing \\['input'\\]"),
    ],
)
def test_bad_runtime_inputs(good_model, feeds, message):
    predictor = load(good_model)
    with pytest.raises(InputError, match=message):
        predictor.run(feeds)


_INFO = (TensorInfo("x", ("batch", 3), np.dtype(np.float32)), TensorInfo("n", (), np.dtype(np.int64)))


@pytest.mark.parametrize("x, n, passed_as_is, message", [
    (np.ones((2, 3), np.float32), np.array(5), True, None),  # what a serving loop passes: no check beyond a glance
    (np.ones((7, 3), np.float32), np.array(5), True, None),  # any length on the symbolic axis
    (np.ones((2, 4), np.float32), np.array(5), False, "expects \\(batch, 3\\) \\(axis 1\\)"),
    (np.ones((2, 3, 1), np.float32), np.array(5), False, "rank 2"),
    (np.asfortranarray(np.ones((2, 3), np.float32)), np.array(5), False, None),  # made C-contiguous
    (np.ones((2, 3), np.float64), np.array(5), False, "dtype float64"),
    (np.ones((2, 3), np.float32), np.array([5]), False, "rank 0"),
    ([[1.0] * 3] * 2, np.array(5), False, "dtype float64"),  # a list is converted, then checked
])
def test_exact_feeds_pass_through_and_the_rest_get_the_full_check(x, n, passed_as_is, message):
    from adntn_deploy.runtime.base import validate_feeds

    feeds = {"x": x, "n": n}
    if message:
        with pytest.raises(InputError, match=message):
            validate_feeds(_INFO, feeds)
        return
    got = validate_feeds(_INFO, feeds)
    assert (got["x"] is x) == passed_as_is and got["x"].flags.c_contiguous and got["n"] is n
    with pytest.raises(InputError, match="unknown \\['y'\\]"):  # an extra name is never passed through
        validate_feeds(_INFO, {**feeds, "y": x})


def test_cli_run_with_bad_inputs_file(tmp_path, good_model, cli_runner):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, input=np.zeros((1, 5), np.float32))
    proc = cli_runner("run", good_model, "--inputs", wrong)
    assert proc.returncode == 1 and "expects" in proc.stderr and "Traceback" not in proc.stderr
    notnpz = tmp_path / "x.npz"
    notnpz.write_text("hello")
    proc = cli_runner("run", good_model, "--inputs", notnpz)
    assert proc.returncode == 1 and "cannot read inputs" in proc.stderr


def test_cli_export_run_inspect_round_trip(tmp_path, cli_runner):
    model = build_sequential({"type": "sequential", "layers": [
        {"type": "adntn_linear", "in_features": 64, "out_features": 32, "generator": {"family": "attn", "bond_dim": 2}},
        {"type": "relu"}, {"type": "linear", "in_features": 32, "out_features": 3}]})
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, extra={"inputs": [{"name": "input", "shape": [1, 64]}]})
    out = tmp_path / "m.onnx"
    proc = cli_runner("export", ckpt, "-o", out, "--dynamic-batch", "--output-name", "logits")
    assert proc.returncode == 0, proc.stderr
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    np.savez(tmp_path / "x.npz", input=x)
    proc = cli_runner("run", out, "--inputs", tmp_path / "x.npz", "--outputs", tmp_path / "y.npz", "--repeat", "5")
    assert proc.returncode == 0 and "p99" in proc.stdout, proc.stderr
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    got = np.load(tmp_path / "y.npz")["logits"]
    assert relative_error(got, expected) < float32_rtol(64, 32)
    proc = cli_runner("inspect", out)
    assert proc.returncode == 0 and "attn" in proc.stdout
    # no recorded shape and none given: one clear line
    bare = save_checkpoint(tmp_path / "bare.safetensors", model)
    proc = cli_runner("export", bare, "-o", tmp_path / "b.onnx")
    assert proc.returncode == 1 and "--input-shape" in proc.stderr
    proc = cli_runner("export", bare, "-o", tmp_path / "b.onnx", "--input-shape", "input:1,63")
    assert proc.returncode == 1 and "torch could not export" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli_runner("export", bare, "-o", tmp_path / "b.onnx", "--input-shape", "input:1,x")
    assert proc.returncode == 2 and "NAME:D1,D2" in proc.stderr
    assert not (tmp_path / "b.onnx").exists()
