"""Distributed training: train / compress / finetune under torchrun (2 CPU processes, gloo) against one process.

Why the runs agree: every rank draws the same shuffled order, takes a contiguous shard of each global
batch, and weights its shard's mean loss by its share of the batch, so DDP's gradient average is exactly
the global batch's mean gradient; parameters start equal (same seed, then DDP's broadcast from rank 0).
What is left is float32 reduction order (half-batch sums added, instead of one sum over the batch),
about 1e-7 relative per gradient, which Adam can amplify only for parameters whose gradient is at noise
level: such a parameter moves at most about one Adam step (lr = 1e-3) in a different direction. Hence the
stated tolerance: every tensor within PARAM_ATOL = 1e-4 (a tenth of one dense step) plus PARAM_RTOL = 1e-5
of its largest magnitude (generator cores step relative to their own scale and span 1e-2 to 1e5) of the
single-process run, losses within LOSS_RTOL = 1e-5, the same accuracies. Measured: 2.3e-6 after one epoch (20 steps) of
the mlp on digits at global batch 64, while a different global batch (128) ends 1.3e-2 away. (Dropping
the shard weighting changes only the last, uneven batch of an epoch, 22 + 21 examples here, and stays
within the tolerance: the weighting matters when shards are far from equal, e.g. a rank with none.)
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from adntn_deploy import distributed
from adntn_deploy.workflows import train_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PARAM_ATOL = 1e-4
PARAM_RTOL = 1e-5
LOSS_RTOL = 1e-5
#: no test here may hang: every launch is killed after this many seconds
LAUNCH_TIMEOUT_S = 240

#: Runs the CLI in a torchrun worker and logs each checkpoint save as "RANK path"; DIE="rank:where" makes
#: that rank exit with code 3 mid-training ("train": at its third optimizer step) or in the fit ("fit"), or
#: sleep in the fit for ten minutes ("hang").
WRAPPER = textwrap.dedent('''
    import os, sys, time
    import torch
    import adntn_deploy.checkpoint as checkpoint
    import adntn_deploy.compression as compression
    from adntn_deploy.cli.main import main

    rank = os.environ.get("RANK", "-")
    save = checkpoint.save_checkpoint

    def logged_save(path, *args, **kwargs):
        with open(os.environ["SAVES_LOG"], "a") as log:
            log.write(f"{rank} {path}\\n")
        return save(path, *args, **kwargs)

    checkpoint.save_checkpoint = logged_save
    die_rank, _, where = os.environ.get("DIE", "").partition(":")
    if die_rank == rank and where == "train":
        step, calls = torch.optim.Adam.step, []

        def dying_step(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                os._exit(3)
            return step(self, *args, **kwargs)

        torch.optim.Adam.step = dying_step
    if die_rank == rank and where == "fit":
        compression.compress = lambda *args, **kwargs: os._exit(3)
    if die_rank == rank and where == "hang":  # alive but silent: only the process-group timeout can end the wait
        compression.compress = lambda *args, **kwargs: time.sleep(600)
    sys.argv[0] = "adntn-deploy"
    main()
''')


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep), **extra}


def torchrun(tmp_path, *args, **env):
    """``torchrun --standalone --nproc_per_node 2 WRAPPER args`` -> (completed process, [(rank, path) saved])."""
    wrapper, log = tmp_path / "worker.py", tmp_path / "saves.log"
    wrapper.write_text(WRAPPER)
    log.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(wrapper), *args], capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=tmp_path, check=False,
                          env=_env(SAVES_LOG=str(log), **env))
    saves = [tuple(line.split(" ", 1)) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, saves


def assert_same_parameters(a: Path, b: Path) -> None:
    """Every tensor of checkpoint ``a`` within PARAM_ATOL + PARAM_RTOL * (its largest magnitude) of ``b``'s."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    off = {k: float((ta[k].double() - tb[k].double()).abs().max()) for k in ta}
    bad = {k: d for k, d in off.items() if not d <= PARAM_ATOL + PARAM_RTOL * float(tb[k].abs().max())}
    assert bad == {}, bad


def test_two_gloo_processes_train_like_one_process_and_rank_0_alone_writes(tmp_path):
    args = ["train", "--model", "mlp", "--data", "digits", "--epochs", "1", "--batch-size", "64", "--json"]
    proc, saves = torchrun(tmp_path, *args, "-o", str(tmp_path / "ddp.ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads(proc.stdout)  # one JSON document: rank 1 printed nothing
    assert saves == [("0", str(tmp_path / "ddp.ckpt"))]
    # the same train call in one plain process (this one: what `adntn-deploy train` runs, without a second start-up)
    one = train_checkpoint("mlp", tmp_path / "one.ckpt", "digits", epochs=1, batch_size=64).summary()
    assert_same_parameters(tmp_path / "ddp.ckpt", tmp_path / "one.ckpt")
    assert ddp["training"]["train_loss"] == pytest.approx(one["training"]["train_loss"], rel=LOSS_RTOL)
    assert ddp["training"]["val_accuracy"] == one["training"]["val_accuracy"]
    assert ddp["test_accuracy"] == one["test_accuracy"] > 0.7


# 40-70 s on 2 cores; the default suite keeps the rebuild of rank 0's compressed model (in one process), a rank
# waiting on rank 0's fit, and DDP training through train
@pytest.mark.slow
def test_compress_and_finetune_under_torchrun_match_one_process(tmp_path):
    """compress: rank 0 calibrates and fits, the others rebuild its model, then DDP fine-tunes (with
    distillation); finetune: the head scope (cached features) with a teacher. Each against one process."""
    from adntn_deploy.workflows import compress_checkpoint, finetune_checkpoint

    dense = train_checkpoint("mlp", tmp_path / "dense.ckpt", "digits", epochs=1).checkpoint
    options = {"layers": "1", "bond_dim": 3, "fit_steps": 5, "calibrate": 200, "epochs": 1, "warmup": 5, "batch_size": 64}
    proc, saves = torchrun(tmp_path, "compress", "--model", str(dense), "--data", "digits", "--layers", "1", "--bond-dim", "3",
                           "--fit-steps", "5", "--calibrate", "200", "--epochs", "1", "--warmup", "5", "--batch-size", "64",
                           "-o", str(tmp_path / "c_ddp.ckpt"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert saves == [("0", str(tmp_path / "c_ddp.ckpt"))]
    ddp = json.loads(proc.stdout)
    one = compress_checkpoint(dense, tmp_path / "c_one.ckpt", "digits", **options).summary()
    assert_same_parameters(tmp_path / "c_ddp.ckpt", tmp_path / "c_one.ckpt")
    assert ddp["compression"] == one["compression"] | {"layers": ddp["compression"]["layers"]}
    layers = [(r["spec"], r["params"], r["fit_error"]) for r in ddp["compression"]["layers"]]
    assert layers == [(r["spec"], r["params"], pytest.approx(r["fit_error"], rel=1e-6)) for r in one["compression"]["layers"]]
    assert ddp["finetune"]["train_loss"] == pytest.approx(one["finetune"]["train_loss"], rel=LOSS_RTOL)
    assert ddp["accuracy"] == one["accuracy"]

    proc, saves = torchrun(tmp_path, "finetune", "--model", str(tmp_path / "c_one.ckpt"), "--teacher", str(dense), "--scope", "head",
                           "--data", "digits", "--epochs", "1", "--warmup", "5", "--batch-size", "64", "-o", str(tmp_path / "f_ddp.ckpt"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert saves == [("0", str(tmp_path / "f_ddp.ckpt"))]
    ddp = json.loads(proc.stdout)
    one = finetune_checkpoint(tmp_path / "c_one.ckpt", tmp_path / "f_one.ckpt", "digits", teacher=dense, scope="head", epochs=1,
                              warmup=5, batch_size=64).summary()
    assert_same_parameters(tmp_path / "f_ddp.ckpt", tmp_path / "f_one.ckpt")
    assert ddp["finetune"]["train_loss"] == pytest.approx(one["finetune"]["train_loss"], rel=LOSS_RTOL)
    assert ddp["test_accuracy"] == one["test_accuracy"] and ddp["finetune"]["scope"] == "head"


# 15-20 s; the default suite keeps DDP training (above) and the environment checks (below)
@pytest.mark.slow
def test_a_worker_that_dies_mid_training_fails_the_run_without_a_hang(tmp_path):
    proc, saves = torchrun(tmp_path, "train", "--model", "mlp", "--data", "digits", "--epochs", "1", "--batch-size", "64",
                           "-o", str(tmp_path / "never.ckpt"), DIE="1:train")
    assert proc.returncode != 0 and "exitcode" in proc.stderr and ": 3" in proc.stderr, proc.stderr[-3000:]
    assert saves == [] and not (tmp_path / "never.ckpt").exists()


# the default suite covers a dying worker with test_a_worker_that_dies_mid_training_fails_the_run_without_a_hang
@pytest.mark.slow
@pytest.mark.parametrize("fault, timeout_s", [
    ("fit", 60),  # about 18 s
    ("hang", 8),  # waits out the timeout: about 25 s
])
def test_a_rank_waiting_for_rank_0_ends_with_an_error(tmp_path, fault, timeout_s):
    """Without torchrun's supervision (two plain processes), rank 1 waits on the broadcast of rank 0's fit.
    Rank 0 dies there ("fit": rank 1 sees the closed connection) or stays silent ("hang": the process-group
    timeout ends the wait); either way rank 1 exits with code 1 on its own and nothing is written."""
    from processes import free_port

    wrapper, log = tmp_path / "worker.py", tmp_path / "saves.log"
    wrapper.write_text(WRAPPER)
    port = str(free_port())
    args = [sys.executable, str(wrapper), "compress", "--model", "mlp", "--dense-epochs", "0", "--data", "digits",
            "--layers", "1", "--bond-dim", "2", "--fit-steps", "1", "--epochs", "0", "-o", str(tmp_path / "never.ckpt")]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env=_env(WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                       OMP_NUM_THREADS="1", ADNTN_DIST_TIMEOUT=str(timeout_s), DIE=f"0:{fault}",
                                       SAVES_LOG=str(log)))
             for r in range(2)]
    try:
        _, rank1_err = procs[1].communicate(timeout=LAUNCH_TIMEOUT_S)
        if fault == "fit":
            procs[0].communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[1].returncode == 1 and "lost rank 0 while waiting for its result" in rank1_err, rank1_err[-2000:]
    assert procs[0].returncode == (3 if fault == "fit" else -9)
    assert not log.exists() and not (tmp_path / "never.ckpt").exists()


# ---- the helpers in one process: a plain run initialises nothing and every helper is the identity -------------


def test_a_plain_run_is_not_distributed(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with distributed.session() as ctx:
        assert ctx is None and not distributed.active()
        assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
        batch = torch.arange(5)
        assert distributed.shard(batch) is batch
        assert distributed.broadcast_json({"a": 1}) == {"a": 1} and distributed.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
        module = torch.nn.Linear(2, 2)
        assert distributed.wrap(module) is module and distributed.broadcast_module(module) is module
        assert distributed.run_on_main(lambda: 7, str, int) == 7
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: still a plain run
    assert distributed.init_from_env() is None


def test_rank_0s_compressed_model_rebuilds_from_what_it_broadcasts():
    """What compress sends the other ranks (JSON) rebuilds the model that rank 0's tensors then fill."""
    from adntn_deploy.compression import compress
    from adntn_deploy.models.zoo import build_model
    from adntn_deploy.workflows import _receive_compressed, _share_compressed

    fitted = compress(build_model("mlp", 10, 0), "3", "ttn", bond_dim=2, fit_steps=1)
    model, report = _receive_compressed(json.loads(json.dumps(_share_compressed(fitted))))
    model.load_state_dict(fitted[0].state_dict())  # what broadcast_module copies in
    assert report.as_dict() == fitted[1].as_dict() and not model.training
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), fitted[0](x))


def test_shards_cover_each_global_batch_in_order():
    batch = torch.arange(7)
    shards = [distributed.shard(batch, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 2, 2] and torch.equal(torch.cat(shards), batch)
    assert [len(distributed.shard(torch.arange(1), r, 2)) for r in range(2)] == [1, 0]
    with pytest.raises(distributed.DistributedError):
        distributed.shard(batch, 3, 3)


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK"),
    ({"WORLD_SIZE": "2", "RANK": "0", "ADNTN_DIST_TIMEOUT": "-1"}, "ADNTN_DIST_TIMEOUT"),
    ({"WORLD_SIZE": "2", "RANK": "0", "ADNTN_DIST_BACKEND": "mpi"}, "gloo"),
])
def test_a_malformed_environment_is_refused_before_joining(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.init_from_env()
    assert not distributed.active()
