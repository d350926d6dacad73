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
        if not isinstance(kind, str) or kind not in LAYER_TYPES:
            raise GeneratorError(f"layer {k}: unknown type {str(kind)[:40]!r}; known types are {', '.join(LAYER_TYPES)}")
        try:
            layers.append(LAYER_TYPES[kind](dict(cfg), generators.get(str(k))))
        except (TypeError, ValueError, RuntimeError) as exc:  # torch's own checks (a negative size, p > 1)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GeneratorError(f"layer {k} ({kind}): {first}") from None
    model = nn.Sequential(*layers)
    model.adntn_architecture = {"type": "sequential", "layers": [dict(c) for c in architecture["layers"]]}
    return model


_BATCHNORM_STATE = ("weight", "bias", "running_mean", "running_var")


def _size(cfg: Mapping[str, Any], key: str, k: int, kind: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if type(value) is not int or value < 1:
        raise GeneratorError(f"layer {k} ({kind}): {key} must be a positive integer, got {str(value)[:40]}")
    return value


def _flag(cfg: Mapping[str, Any], key: str, k: int, kind: str) -> bool:
    value = cfg.get(key, True)
    if not isinstance(value, bool):
        raise GeneratorError(f"layer {k} ({kind}): {key} must be true or false, got {str(value)[:40]}")
    return value


def _kernel(cfg: Mapping[str, Any], k: int, kind: str) -> tuple[int, int]:
    value = cfg.get("kernel_size")
    pair = [value, value] if type(value) is int else value
    if not isinstance(pair, list) or len(pair) != 2 or any(type(v) is not int or v < 1 for v in pair):
        raise GeneratorError(f"layer {k} ({kind}): kernel_size must be a positive integer or a pair, got {str(value)[:40]}")
    return pair[0], pair[1]


def declared_state_shapes(architecture: Any, generators: Mapping[str, GeneratorIR]) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes ``build_sequential(architecture, generators)`` would create, without building it.

    Lets a loader compare an untrusted architecture with the tensors a file really holds before any
    module is allocated: a few bytes of JSON can declare a 20000 x 20000 layer. Every generated layer
    must have its IR in ``generators`` (its cores' shapes come from it), as in a checkpoint.

    Raises:
        GeneratorError: not a sequential architecture, an unknown layer type, a size that is not a positive
            integer, a flag that is not a boolean, channels that do not divide by groups, or a generated
            layer without a stored generator.
    """
    if not isinstance(architecture, Mapping) or architecture.get("type") != "sequential" \
            or not isinstance(architecture.get("layers"), list):
        raise GeneratorError("architecture must be {'type': 'sequential', 'layers': [...]}")
    shapes: dict[str, tuple[int, ...]] = {}
    for k, cfg in enumerate(architecture["layers"]):
        kind = cfg.get("type") if isinstance(cfg, Mapping) else None
        if not isinstance(kind, str) or kind not in LAYER_TYPES:
            raise GeneratorError(f"layer {k}: unknown type {str(kind)[:40]!r}; known types are {', '.join(LAYER_TYPES)}")
        if kind in ("linear", "adntn_linear"):
            rows, cols = _size(cfg, "out_features", k, kind), _size(cfg, "in_features", k, kind)
            weight: tuple[int, ...] = (rows, cols)
        elif kind in ("conv2d", "adntn_conv2d"):
            rows, cin = _size(cfg, "out_channels", k, kind), _size(cfg, "in_channels", k, kind)
            groups = _size(cfg, "groups", k, kind, 1)
            if cin % groups or rows % groups:
                raise GeneratorError(f"layer {k} ({kind}): in_channels {cin} and out_channels {rows} must divide by groups {groups}")
            weight = (rows, cin // groups, *_kernel(cfg, k, kind))
        elif kind in ("batchnorm1d", "batchnorm2d"):
            features = _size(cfg, "num_features", k, kind)
            shapes.update({f"{k}.{name}": (features,) for name in _BATCHNORM_STATE})
            shapes[f"{k}.num_batches_tracked"] = ()
            continue
        else:
            continue
        if kind.startswith("adntn_"):
            ir = generators.get(str(k))
            if ir is None:
                raise GeneratorError(f"layer {k} ({kind}) is generated but no generator is stored for it")
            if ir.weight_shape != weight:
                raise GeneratorError(f"layer {k} ({kind}): its generator makes a {ir.weight_shape} weight, the layer needs {weight}")
            shapes.update({f"{k}.weight_generator.cores.{c.name.replace('.', '__')}": c.shape for c in ir.cores})
        else:
            shapes[f"{k}.weight"] = weight
        if _flag(cfg, "bias", k, kind):
            shapes[f"{k}.bias"] = (rows,)
    return shapes
