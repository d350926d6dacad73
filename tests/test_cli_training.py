"""train, compress and finetune through the CLI (in process; one test as a real process): checkpoints on disk,
JSON output, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from adntn_deploy.checkpoint import read_checkpoint
from inprocess import invoke_cli


def run(*args, env=None, check=True):
    """The CLI in this process (the binary's own exit path is checked by test_train_unknown_model_is_one_line)."""
    return invoke_cli(*args, env=env, check=check)


def run_process(*args):
    return subprocess.run([sys.executable, "-m", "adntn_deploy.cli.main", *args], capture_output=True, text=True,
                          timeout=600, env=os.environ)


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "dense.ckpt"
    out = json.loads(run("train", "--model", "mlp", "--data", "digits", "--epochs", "2", "-o", str(path), "--json").stdout)
    assert out["test_accuracy"] > 0.7 and out["data"]["name"] == "digits"
    return path


def test_train_writes_a_checkpoint_that_records_inputs_and_accuracy(dense_ckpt):
    info = read_checkpoint(dense_ckpt)
    assert info.extra["inputs"] == [{"name": "input", "shape": [1, 1, 28, 28]}]
    assert info.extra["zoo"] == "mlp" and info.architecture["zoo"] == "mlp"


# export of a compressed checkpoint stays in the default suite as tests/test_workflows.py::test_export_checkpoint_*
@pytest.mark.slow
def test_compress_then_export(dense_ckpt, tmp_path):
    out = tmp_path / "small.adntn"
    result = json.loads(run("compress", "--model", str(dense_ckpt), "--data", "digits", "--family", "mera", "--ratio", "300",
                            "--fit-steps", "10", "--epochs", "1", "--scope", "head", "--calibrate", "300", "-o", str(out), "--json").stdout)
    layers = result["compression"]["layers"]
    assert [r["name"] for r in layers] == ["1", "3"] and all(r["ratio"] >= 300 for r in layers)
    assert result["finetune"]["scope"] == "head" and 0 <= result["accuracy"] <= 1
    info = read_checkpoint(out)
    assert set(info.generators) == {"1", "3"} and info.extra["dense_accuracy"] == result["dense_accuracy"]
    run("export", str(out), "-o", str(tmp_path / "small.onnx"))
    assert (tmp_path / "small.onnx").stat().st_size < 200_000


def test_compress_prints_a_table(dense_ckpt, tmp_path):
    out = run("compress", "--model", str(dense_ckpt), "--data", "digits", "--layers", "3", "--bond-dim", "3",
              "--fit-steps", "5", "--epochs", "0", "-o", str(tmp_path / "c.ckpt")).stdout
    assert "operator, bond 3, max_mode 4" in out and "test accuracy: dense" in out and "whole model" in out


def test_compress_split_layout_and_distillation_flags(dense_ckpt, tmp_path):
    result = json.loads(run("compress", "--model", str(dense_ckpt), "--data", "digits", "--layers", "3", "--ratio", "300",
                            "--layout", "split", "--fit-steps", "5", "--epochs", "1", "--scope", "head", "--calibrate", "0",
                            "--distill-weight", "0.5", "--match-layers", "0.1", "-o", str(tmp_path / "s.ckpt"), "--json").stdout)
    assert result["compression"]["layers"][0]["spec"]["layout"] == "split"


def test_train_with_generated_layers_from_scratch(tmp_path):
    path = tmp_path / "scratch.ckpt"
    out = json.loads(run("train", "--model", "mlp", "--data", "digits", "--epochs", "3", "--family", "ttn", "--ratio", "500",
                         "-o", str(path), "--json").stdout)
    assert out["generated"]["layout"] == "operator" and out["test_accuracy"] > 0.3
    info = read_checkpoint(path)
    assert set(info.generators) == {"1", "3"}
    assert all(ir.report().compression_ratio >= 500 for ir in info.generators.values())
    bad = run("train", "--model", "mlp", "--data", "digits", "--family", "ttn", "-o", str(tmp_path / "x.ckpt"), check=False)
    assert bad.returncode == 2 and "--family and --ratio together" in bad.stderr


@pytest.mark.parametrize("args, env, message", [
    (["--model", "resnet"], {}, "neither a checkpoint file nor a zoo model"),
    (["--model", "{ckpt}", "--layers", "conv*"], {}, "matches no Linear or Conv2d layer"),
    (["--model", "{ckpt}", "--ratio", "1e7"], {}, "no ttn configuration reaches 10,000,000x"),
    (["--model", "{garbage}"], {}, "not a readable safetensors checkpoint"),
    (["--model", "{ckpt}", "-o", "{ckpt}"], {}, "would overwrite the input checkpoint"),
    (["--model", "{ckpt}", "--data", "fashion-mnist"], {"ADNTN_DATA_DIR": "{empty}"}, "apt-get install dataset-fashion-mnist"),
    (["--model", "{ckpt}", "--bond-dim", "2"], {}, "exactly one of --bond-dim N or --ratio R"),
])
def test_compress_bad_input_is_one_line(dense_ckpt, tmp_path, args, env, message):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    (tmp_path / "empty").mkdir()
    fill = {"ckpt": str(dense_ckpt), "garbage": str(garbage), "empty": str(tmp_path / "empty")}
    args = [a.format(**fill) for a in args]
    if "--ratio" not in args and "--bond-dim" not in args:
        args += ["--ratio", "100"]
    elif "--bond-dim" in args:
        args += ["--ratio", "100"]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.ckpt")]
    if "--data" not in args:
        args += ["--data", "digits"]
    before = dense_ckpt.read_bytes()
    proc = run("compress", *args, env={k: v.format(**fill) for k, v in env.items()}, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and sum(line.startswith("Error:") for line in lines) == 1
    assert dense_ckpt.read_bytes() == before and not (tmp_path / "out.ckpt").exists()


def test_train_unknown_model_is_one_line(tmp_path):
    proc = run_process("train", "--model", "resnet", "--data", "digits", "-o", str(tmp_path / "x.ckpt"))
    assert proc.returncode == 1 and "unknown model 'resnet': the zoo has vgg, alexnet, mlp, mlp4096" in proc.stderr


def test_finetune_tunes_a_checkpoint_and_keeps_its_records(dense_ckpt, tmp_path, cli_runner):
    out = tmp_path / "tuned.ckpt"
    result = cli_runner("finetune", "--model", dense_ckpt, "--data", "digits", "--epochs", "1", "--warmup", "5", "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["finetune"]["epochs"] == 1 and summary["test_accuracy"] > 0.7
    info = read_checkpoint(out)
    assert info.extra["zoo"] == "mlp" and info.extra["test_accuracy"] == summary["test_accuracy"]
    assert info.extra["finetune"]["scope"] == "all" and info.extra["inputs"] == [{"name": "input", "shape": [1, 1, 28, 28]}]
    same = cli_runner("finetune", "--model", dense_ckpt, "--data", "digits", "-o", dense_ckpt)
    assert same.returncode == 1 and "would overwrite the input checkpoint" in same.stderr
