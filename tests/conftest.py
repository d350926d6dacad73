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
