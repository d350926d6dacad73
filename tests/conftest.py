"""Shared fixtures: ``rng``, ``onnx_model`` (a small served classifier), ``tiny_onnx`` (a tiny ONNX model per
family and layer kind), ``free_port`` and ``cli_runner`` (the CLI in this process).

Helpers that code outside a test calls live in modules of this folder (on sys.path): ``tolerance``
(float32_rtol, relative_error, assert_rel_close, assert_float32_close) and ``processes`` (free_port, stop_group).
"""

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    """A small served classifier (MERA and TTN layers, dynamic batch): input (N, 16) -> logits (N, 3)."""
    from torch import nn

    from adntn_deploy.nn import ADNTNLinear
    from adntn_deploy.onnx_export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(ADNTNLinear(16, 8, family="mera"), nn.ReLU(), ADNTNLinear(8, 3, family="ttn")).eval()
    path = tmp_path_factory.mktemp("serve") / "clf.onnx"
    export_onnx(model, [torch.randn(2, 16)], path, input_names=["input"], output_names=["logits"], dynamic_batch=True)
    return path


@pytest.fixture
def free_port():
    """``free_port()`` -> a TCP port on 127.0.0.1 that nothing listens on now, a new one each call
    (``processes.free_port``, which code outside a test, such as a server class, imports)."""
    from processes import free_port as pick

    return pick


TINY_FAMILIES = ("ttn", "attn", "mera")
#: input shape (batch 1) of each kind of ``tiny_onnx`` model
TINY_SHAPES = {"linear": (1, 16), "conv": (1, 3, 6, 6)}


def _tiny_module(family, kind):
    from torch import nn

    from adntn_deploy.nn import ADNTNConv2d, ADNTNLinear

    layer = (ADNTNLinear(16, 8, family=family, bond_dim=2) if kind == "linear"
             else ADNTNConv2d(3, 4, 3, padding=1, family=family, bond_dim=2))
    return nn.Sequential(layer, nn.ReLU()).eval()


class TinyOnnx:
    """``tiny_onnx(family, kind)``: the path of a tiny ONNX model (input "input", static batch 1), exported once
    per session and shared: copy it before changing it. ``tiny_onnx.module(family, kind)`` is the torch module
    it was exported from (eval mode, seeded: the same weights every session); ``tiny_onnx.shape(kind)`` its
    input shape.

    linear: ADNTNLinear(16 -> 8, bond 2) + ReLU; conv: ADNTNConv2d(3 -> 4, 3x3, padding 1, bond 2) + ReLU on 6x6.
    """

    def __init__(self, folder):
        self.folder = folder
        self._modules = {}
        self._paths = {}

    @staticmethod
    def _check(family, kind):
        if family not in TINY_FAMILIES or kind not in TINY_SHAPES:
            raise ValueError(f"tiny_onnx knows families {TINY_FAMILIES} and kinds {tuple(TINY_SHAPES)}, "
                             f"not ({family!r}, {kind!r})")

    @staticmethod
    def shape(kind):
        return TINY_SHAPES[kind]

    def module(self, family, kind):
        self._check(family, kind)
        if (family, kind) not in self._modules:
            with torch.random.fork_rng():  # seeded without moving the global generator other tests draw from
                torch.manual_seed(0)
                self._modules[family, kind] = _tiny_module(family, kind)
        return self._modules[family, kind]

    def __call__(self, family, kind):
        self._check(family, kind)
        if (family, kind) not in self._paths:
            from adntn_deploy.onnx_export import export_onnx

            path = self.folder / f"tiny-{family}-{kind}.onnx"
            with torch.random.fork_rng():
                export_onnx(self.module(family, kind), [torch.randn(*self.shape(kind))], path, input_names=["input"])
            self._paths[family, kind] = path
        return self._paths[family, kind]


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    """Factory of tiny ONNX models per family (ttn, attn, mera) and layer kind (linear, conv); see :class:`TinyOnnx`."""
    return TinyOnnx(tmp_path_factory.mktemp("tiny_onnx"))


@pytest.fixture
def cli_runner():
    """Run ``adntn-deploy ARGS...`` in this process: ``cli_runner(*args, env=None)`` -> CliResult
    (:func:`inprocess.invoke_cli`, which module-scoped fixtures import directly)."""
    from inprocess import invoke_cli

    return invoke_cli


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the cases marked here must be seen by it
def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` the cases of the big end-to-end grids that the default suite leaves out (default_subset.py)."""
    from default_subset import is_default

    for item in items:
        if not is_default(item.nodeid):
            item.add_marker(pytest.mark.slow)
