"""Models described as JSON: a list of layer dicts built into ``nn.Sequential``.

This is how checkpoints record an architecture without pickling code: ``{"type": "sequential",
"layers": [{"type": "conv2d", ...}, {"type": "relu"}, ...]}``. Generated layers ("adntn_linear",
"adntn_conv2d") carry a ``generator`` spec dict; when a checkpoint is loaded, the stored IR replaces it
so nothing is re-initialised.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from adntn_deploy.generators import GeneratorSpec
from adntn_deploy.ir.program import GeneratorError, GeneratorIR
from adntn_deploy.nn.layers import ADNTNConv2d, ADNTNLinear


def _generated(cls: type, keys: tuple[str, ...]) -> Callable[..., nn.Module]:
    def make(cfg: dict[str, Any], ir: GeneratorIR | None) -> nn.Module:
        args = {k: cfg[k] for k in keys if k in cfg}
        if ir is not None:
            return cls(**args, generator=ir)
        spec = GeneratorSpec.from_dict(cfg.get("generator", {}))
        options = {k: v for k, v in spec.to_dict().items() if k not in ("family", "bond_dim", "activation")}
        return cls(**args, family=spec.family, bond_dim=spec.bond_dim, activation=spec.activation, **options)

    return make


def _plain(factory: Callable[..., nn.Module], keys: tuple[str, ...] = ()) -> Callable[..., nn.Module]:
    return lambda cfg, ir: factory(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in keys})


_CONV_KEYS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias")
LAYER_TYPES: dict[str, Callable[[dict[str, Any], GeneratorIR | None], nn.Module]] = {
    "linear": _plain(nn.Linear, ("in_features", "out_features", "bias")),
    "conv2d": _plain(nn.Conv2d, _CONV_KEYS),
    "adntn_linear": _generated(ADNTNLinear, ("in_features", "out_features", "bias")),
    "adntn_conv2d": _generated(ADNTNConv2d, _CONV_KEYS),
    "relu": _plain(nn.ReLU),
    "gelu": _plain(nn.GELU),
    "tanh": _plain(nn.Tanh),
    "flatten": _plain(nn.Flatten, ("start_dim", "end_dim")),
    "dropout": _plain(nn.Dropout, ("p",)),
    "maxpool2d": _plain(nn.MaxPool2d, ("kernel_size", "stride", "padding")),
    "avgpool2d": _plain(nn.AvgPool2d, ("kernel_size", "stride", "padding")),
    "adaptiveavgpool2d": _plain(nn.AdaptiveAvgPool2d, ("output_size",)),
    "batchnorm1d": _plain(nn.BatchNorm1d, ("num_features",)),
    "batchnorm2d": _plain(nn.BatchNorm2d, ("num_features",)),
}


def build_sequential(architecture: Mapping[str, Any], generators: Mapping[str, GeneratorIR] | None = None) -> nn.Sequential:
    """Build the ``nn.Sequential`` described by ``architecture``; ``generators`` maps layer index names
    ("0", "3", ...) to stored IRs that replace the layers' generator specs.

    The returned module remembers its description in ``model.adntn_architecture`` (used by checkpoints).

    Raises:
        GeneratorError: unknown layer type, missing fields, or a stored IR that does not fit the layer.
    """
    if architecture.get("type") != "sequential" or not isinstance(architecture.get("layers"), list):
        raise GeneratorError("architecture must be {'type': 'sequential', 'layers': [...]}")
    generators = generators or {}
    layers = []
    for k, cfg in enumerate(architecture["layers"]):
        kind = cfg.get("type") if isinstance(cfg, Mapping) else None
        if kind not in LAYER_TYPES:
            raise GeneratorError(f"layer {k}: unknown type {kind!r}; known types are {', '.join(LAYER_TYPES)}")
        try:
            layers.append(LAYER_TYPES[kind](dict(cfg), generators.get(str(k))))
        except TypeError as exc:
            raise GeneratorError(f"layer {k} ({kind}): {exc}") from None
    model = nn.Sequential(*layers)
    model.adntn_architecture = {"type": "sequential", "layers": [dict(c) for c in architecture["layers"]]}
    return model
