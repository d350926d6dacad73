"""A small model zoo for 28x28 single-channel images (Fashion-MNIST), described as JSON architectures.

Each model keeps the layout of the network it is named after, scaled to 28x28 inputs and a 2-core CPU
budget, with a three-layer classifier whose two hidden layers are big enough (2048 wide) for per-layer
compression ratios from 2,000x to 50,000x to mean something:

* ``vgg``: VGG-16's 13 3x3 convolutions in blocks of 2, 2, 3, 3, 3 (with batch norm, as VGG-16-BN), widths
  8-16-32-64-64; the first convolution pads by 3 (28 -> 32, like LeNet's padded input), max-pools follow
  blocks 1-3 (32 -> 4); classifier 1024 -> 2048 -> 2048 -> 10 with dropout, as VGG's.
* ``alexnet``: AlexNet's five convolutions (5x5, 5x5, then three 3x3), two max-pools, adaptive average
  pooling to 4x4, classifier 1024 -> 2048 -> 2048 -> 10 with dropout.
* ``mlp``: 784 -> 1024 -> 1024 -> 10 with ReLU.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from adntn_deploy.errors import GeneratorError
from adntn_deploy.models.sequential import build_sequential

HIDDEN = 2048


def _conv(cin: int, cout: int, k: int = 3, padding: int = 1) -> dict[str, Any]:
    return {"type": "conv2d", "in_channels": cin, "out_channels": cout, "kernel_size": k, "padding": padding}


def _classifier(features: int, num_classes: int, hidden: int = HIDDEN, dropout: float = 0.3) -> list[dict[str, Any]]:
    return [
        {"type": "flatten"},
        {"type": "dropout", "p": dropout},
        {"type": "linear", "in_features": features, "out_features": hidden},
        {"type": "relu"},
        {"type": "dropout", "p": dropout},
        {"type": "linear", "in_features": hidden, "out_features": hidden},
        {"type": "relu"},
        {"type": "linear", "in_features": hidden, "out_features": num_classes},
    ]


def vgg(num_classes: int = 10, in_channels: int = 1) -> dict[str, Any]:
    """VGG-16-BN layout scaled to 28x28 (see the module docstring)."""
    layers: list[dict[str, Any]] = []
    cin = in_channels
    for block, (convs, width) in enumerate(zip((2, 2, 3, 3, 3), (8, 16, 32, 64, 64))):
        for k in range(convs):
            pad = 3 if (block, k) == (0, 0) else 1
            layers += [_conv(cin, width, 3, pad), {"type": "batchnorm2d", "num_features": width}, {"type": "relu"}]
            cin = width
        if block < 3:
            layers.append({"type": "maxpool2d", "kernel_size": 2, "stride": 2})
    return {"type": "sequential", "layers": layers + _classifier(cin * 4 * 4, num_classes)}


def alexnet(num_classes: int = 10, in_channels: int = 1) -> dict[str, Any]:
    """AlexNet layout scaled to 28x28 (see the module docstring)."""
    layers = [
        _conv(in_channels, 16, 5, 2), {"type": "relu"}, {"type": "maxpool2d", "kernel_size": 2, "stride": 2},
        _conv(16, 32, 5, 2), {"type": "relu"}, {"type": "maxpool2d", "kernel_size": 2, "stride": 2},
        _conv(32, 64), {"type": "relu"}, _conv(64, 64), {"type": "relu"}, _conv(64, 64), {"type": "relu"},
        {"type": "adaptiveavgpool2d", "output_size": 4},
    ]
    return {"type": "sequential", "layers": layers + _classifier(64 * 4 * 4, num_classes)}


def mlp(num_classes: int = 10, in_channels: int = 1, hidden: int = 1024) -> dict[str, Any]:
    """784 -> hidden -> hidden -> classes MLP (hidden 1024)."""
    return {"type": "sequential", "layers": [
        {"type": "flatten"},
        {"type": "linear", "in_features": in_channels * 28 * 28, "out_features": hidden}, {"type": "relu"},
        {"type": "linear", "in_features": hidden, "out_features": hidden}, {"type": "relu"},
        {"type": "linear", "in_features": hidden, "out_features": num_classes},
    ]}


def mlp4096(num_classes: int = 10, in_channels: int = 1) -> dict[str, Any]:
    """784 -> 4096 -> 4096 -> classes MLP: a paper-sized 4096x4096 hidden layer (77,000x leaves ~218 parameters)."""
    return mlp(num_classes, in_channels, hidden=4096)


ZOO: dict[str, Callable[..., dict[str, Any]]] = {"vgg": vgg, "alexnet": alexnet, "mlp": mlp, "mlp4096": mlp4096}
INPUT_SHAPE = (1, 28, 28)


def build_model(name: str, num_classes: int = 10, seed: int = 0) -> torch.nn.Sequential:
    """A freshly initialised zoo model (seeded), with its architecture recorded for checkpoints.

    Raises:
        GeneratorError: unknown model name (the message lists the zoo).
    """
    if name not in ZOO:
        raise GeneratorError(f"unknown model {name!r}: the zoo has {', '.join(ZOO)} (or pass a checkpoint file)")
    torch.manual_seed(seed)
    model = build_sequential(ZOO[name](num_classes))
    model.adntn_architecture["zoo"] = name
    return model
