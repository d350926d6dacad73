"""Checkpoints: exact round trips, and clear errors for corrupt or mismatched files."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from adntn_deploy.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from adntn_deploy.models import build_sequential
from adntn_deploy.nn import ADNTNLinear

ARCH = {
    "type": "sequential",
    "layers": [
        {"type": "adntn_conv2d", "in_channels": 1, "out_channels": 8, "kernel_size": 3, "padding": 1,
         "generator": {"family": "mera", "bond_dim": 2}},
        {"type": "batchnorm2d", "num_features": 8},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "adntn_linear", "in_features": 8 * 14 * 14, "out_features": 32, "generator": {"family": "attn"}},
        {"type": "gelu"},
        {"type": "linear", "in_features": 32, "out_features": 10},
    ],
}


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = build_sequential(ARCH)
    m.train()
    m(torch.randn(4, 1, 28, 28))  # move batch-norm statistics away from their defaults
    return m.eval()


def test_round_trip_is_exact(tmp_path, model):
    path = save_checkpoint(tmp_path / "m.safetensors", model, extra={"accuracy": 0.5})
    again = load_checkpoint(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    info = read_checkpoint(path)
    assert info.extra == {"accuracy": 0.5}
    assert set(info.generators) == {"0", "5"}
    assert info.generators["0"] == model[0].generator


def test_user_models_load_into_a_given_instance(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = ADNTNLinear(16, 16, family="ttn", seed=1)

        def forward(self, x):
            return self.body(x)

    net = Net()
    path = save_checkpoint(tmp_path / "net.safetensors", net)
    with pytest.raises(CheckpointError, match="pass the model"):
        load_checkpoint(path)
    fresh = Net()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_checkpoint(path, fresh)
    assert torch.equal(fresh.body.weight, net.eval().body.weight)


def test_interrupted_save_keeps_the_old_file(tmp_path, model, monkeypatch):
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def _corrupt(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00\x01not a checkpoint" * 10)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "bad-metadata":
        header_len = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + header_len])
        header["__metadata__"]["adntn.generators"] = '{"0": {"format": "nope"}}'
        raw = json.dumps(header).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + header_len :])


@pytest.mark.parametrize(
    "how, message",
    [("truncated", "not a readable safetensors"), ("garbage", "not a readable safetensors"),
     ("empty", "not a readable safetensors"), ("bad-metadata", "malformed metadata")],
)
def test_corrupt_files_give_clear_errors(tmp_path, model, how, message):
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    _corrupt(path, how)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_mismatches_give_clear_errors(tmp_path, model):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not an adntn-deploy checkpoint"):
        load_checkpoint(plain)
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    other = build_sequential({**ARCH, "layers": ARCH["layers"][:-1] + [{"type": "linear", "in_features": 32, "out_features": 7}]})
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(path, other)
    reseeded = build_sequential({**ARCH, "layers": [dict(ARCH["layers"][0], generator={"family": "ttn"})] + ARCH["layers"][1:]})
    with pytest.raises(CheckpointError, match="generator differs"):
        load_checkpoint(path, reseeded)


def test_files_written_before_layouts_existed_still_load(tmp_path):
    """A checkpoint whose generator specs carry no 'layout' (and a fixed seed 0) loads, alone or into a new model."""
    import json

    from safetensors import safe_open

    torch.manual_seed(0)
    model = build_sequential(ARCH).eval()
    path = save_checkpoint(tmp_path / "new.ckpt", model)
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    generators = json.loads(meta["adntn.generators"])
    for ir in generators.values():
        del ir["metadata"]["spec"]["layout"]
    meta["adntn.generators"] = json.dumps(generators)
    old = tmp_path / "old.ckpt"
    save_file(tensors, str(old), metadata=meta)
    x = torch.randn(2, 1, 28, 28)
    alone = load_checkpoint(old)
    fresh = load_checkpoint(old, build_sequential(ARCH))  # a new model: another random seed and output scale
    torch.testing.assert_close(alone(x), model(x))
    torch.testing.assert_close(fresh(x), model(x))
