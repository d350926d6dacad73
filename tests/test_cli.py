"""The command line: as a real process where the binary is the point (--version, one-line errors, the
default demo), in process otherwise."""

import json
import subprocess
import sys

import pytest

from inprocess import invoke_cli
from tolerance import float32_rtol
from adntn_deploy import __version__
from adntn_deploy.checkpoint import save_checkpoint
from adntn_deploy.models import build_sequential
from adntn_deploy.presets import PRESETS


def run(*args, check=True, timeout=300):
    proc = subprocess.run(
        [sys.executable, "-m", "adntn_deploy.cli.main", *args], capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_version():
    assert __version__ in run("--version").stdout


def test_presets_json_lists_every_preset_with_its_ratio():
    rows = json.loads(invoke_cli("presets", "--json", check=True).stdout)
    assert {r["name"] for r in rows} == set(PRESETS)
    for r in rows:
        assert r["ratio"] >= PRESETS[r["name"]].min_ratio
        assert r["params"] * r["ratio"] == pytest.approx(r["dense_params"])


def test_inspect_presets_by_pattern_prints_a_table():
    out = invoke_cli("inspect", "vgg16-fc6-*", check=True).stdout
    assert out.count("vgg16-fc6-") == len([n for n in PRESETS if n.startswith("vgg16-fc6-")])  # 6 split + 9 operator
    assert "50,872x" in out  # vgg16-fc6-ttn-50k
    assert "operator" in out and "79,168x" in out  # vgg16-fc6-ttn-operator-77k


def test_inspect_checkpoint(tmp_path):
    model = build_sequential({"type": "sequential", "layers": [
        {"type": "adntn_linear", "in_features": 64, "out_features": 32, "generator": {"family": "mera", "bond_dim": 2}},
    ]})
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    rows = json.loads(invoke_cli("inspect", str(path), "--json", check=True).stdout)
    assert rows[0]["name"] == "0" and rows[0]["family"] == "mera"
    assert rows[0]["params"] == model[0].generator.params


@pytest.mark.parametrize(
    "args, message",
    [
        (("inspect", "no-such-preset"), "neither a file nor a preset"),
        (("inspect", "{bad}"), "neither a file nor a preset"),
    ],
)
def test_bad_arguments_give_one_line_errors(args, message):
    proc = run(*args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_inspect_corrupt_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 3)
    proc = invoke_cli("inspect", str(bad))
    assert proc.returncode == 1
    assert "not a readable safetensors checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_runs_the_pipeline_and_reports_json(tmp_path):
    """The main job on the built-in digits with a tiny budget: every stage runs, every backend agrees."""
    out = tmp_path / "demo"
    result = json.loads(invoke_cli("demo", "--json", "--data", "digits", "--model", "mlp", "--epochs", "1", "--finetune-epochs", "1",
                            "--ratio", "200", "--fit-steps", "5", "-o", str(out), check=True).stdout)
    rows = {r["stage"]: r for r in result["rows"]}
    assert list(rows) == ["dense model", "compressed", "ONNX", "TVM host", "TVM rpi4", "server"]
    assert all(r["ratio"] >= 200 for r in result["compression"]["layers"])
    for stage in ("ONNX", "TVM host", "server"):
        assert rows[stage]["max_rel_diff"] < float32_rtol(784, 1024, 1024), stage
    assert rows["ONNX"]["accuracy"] == pytest.approx(rows["compressed"]["accuracy"], abs=2e-3)
    assert rows["server"]["latency_ms"] > 0 and rows["server"]["note"].startswith("median of 20 requests")
    assert rows["compressed"]["bytes"] < rows["dense model"]["bytes"] / 20
    for name in ("dense.ckpt", "compressed.ckpt", "model.onnx", "model-host/manifest.json", "model-rpi4/manifest.json"):
        assert (out / name).exists(), name


@pytest.mark.slow
def test_demo_with_its_defaults_prints_one_table():
    proc = run("demo", timeout=1200)  # 4 minutes on a 2-core AVX-512 host, over 5 on an AVX2 EPYC under CI load
    assert "fashion-mnist test acc" in proc.stdout or "digits test acc" in proc.stdout
    assert proc.stdout.count("\n") == 8  # header, rule, six rows
