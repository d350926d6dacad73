"""Export a small torch model to ONNX for a test: seeded, in eval mode, with non-trivial batch-norm statistics."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adntn_deploy.onnx_export import export_onnx


def export_seeded(make, shape: tuple[int, ...], path: Path) -> Path:
    """Build ``make()`` under seed 0, give its BatchNorm2d layers non-trivial running statistics (so that
    folding them is checked too), and export it to ``path`` with one input named "input" of ``shape``."""
    torch.manual_seed(0)
    module = make().eval()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    export_onnx(module, [torch.randn(*shape)], path, input_names=["input"])
    return path
