"""The command line, run as a real process."""

import json
import subprocess
import sys

import pytest

from adntn_deploy import __version__
from adntn_deploy.checkpoint import save_checkpoint
from adntn_deploy.models import build_sequential
from adntn_deploy.presets import PRESETS


def run(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "adntn_deploy.cli.main", *args], capture_output=True, text=True, timeout=300
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_version():
    assert __version__ in run("--version").stdout


def test_presets_json_lists_every_preset_with_its_ratio():
    rows = json.loads(run("presets", "--json").stdout)
    assert {r["name"] for r in rows} == set(PRESETS)
    for r in rows:
        assert r["ratio"] >= PRESETS[r["name"]].min_ratio
        assert r["params"] * r["ratio"] == pytest.approx(r["dense_params"])


def test_inspect_presets_by_pattern_prints_a_table():
    out = run("inspect", "vgg16-fc6-*").stdout
    assert out.count("vgg16-fc6-") == 6
    assert "50,872x" in out  # vgg16-fc6-ttn-50k


def test_inspect_checkpoint(tmp_path):
    model = build_sequential({"type": "sequential", "layers": [
        {"type": "adntn_linear", "in_features": 64, "out_features": 32, "generator": {"family": "mera", "bond_dim": 2}},
    ]})
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    rows = json.loads(run("inspect", str(path), "--json").stdout)
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
    proc = run("inspect", str(bad), check=False)
    assert proc.returncode == 1
    assert "not a readable safetensors checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_runs_and_reports_json(tmp_path):
    out = tmp_path / "fitted.safetensors"
    result = json.loads(run("demo", "--json", "--fit-steps", "20", "-o", str(out)).stdout)
    assert result["checkpoint"]["round_trip_identical"] is True
    assert result["fit"]["relative_error"] <= result["fit"]["initial_relative_error"] < 0.5
    assert result["generate_vgg16_fc6"]["params"] == 2020
    assert out.exists()
