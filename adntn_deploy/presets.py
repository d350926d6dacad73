"""Paper-scale presets: generators for the classifier layers of AlexNet and VGG-16.

Names read ``{model}-{layer}-{family}-{tier}`` (split layout) or ``{model}-{layer}-{family}-operator-{tier}``
(operator layout: full-rank weights; tiers 2k, 50k and 77k), where the tier is the per-layer compression the preset
reaches at least (2k = 2,000x, 50k = 50,000x). Every layer and family has a 2k preset; 50k presets exist
wherever our definitions reach 50,000x with bonds >= 2. On the 4096x1000 output layer (a budget of 81
parameters) only TTN does; aTTN and MERA get their most compressed configuration instead (tiers 10k and
35k), because one aTTN disentangler or MERA level alone exceeds that budget (docs/generators.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adntn_deploy.generators import GeneratorSpec
from adntn_deploy.ir.program import GeneratorError

#: Classifier layers as weight shapes (out, in).
LAYERS: dict[str, dict[str, tuple[int, int]]] = {
    "alexnet": {"fc6": (4096, 9216), "fc7": (4096, 4096), "fc8": (1000, 4096)},
    "vgg16": {"fc6": (4096, 25088), "fc7": (4096, 4096), "fc8": (1000, 4096)},
}

# (layer shape, family, tier) -> spec options. Found by a search over max_mode, bond_dim and sharing that
# keeps the most parameters under each tier's budget (more parameters fit the data better).
_CONFIGS: dict[tuple[tuple[int, int], str, str], dict[str, Any]] = {
    ((4096, 25088), "ttn", "2k"): {"bond_dim": 16, "max_mode": 4},
    ((4096, 25088), "ttn", "50k"): {"bond_dim": 6, "max_mode": 2},
    ((4096, 25088), "attn", "2k"): {"bond_dim": 16, "max_mode": 8},
    ((4096, 25088), "attn", "50k"): {"bond_dim": 2, "max_mode": 4},
    ((4096, 25088), "mera", "2k"): {"bond_dim": 12, "max_mode": 16},
    ((4096, 25088), "mera", "50k"): {"bond_dim": 4, "max_mode": 8},
    ((4096, 9216), "ttn", "2k"): {"bond_dim": 16, "max_mode": 2},
    ((4096, 9216), "ttn", "50k"): {"bond_dim": 4, "max_mode": 8},
    ((4096, 9216), "attn", "2k"): {"bond_dim": 15, "max_mode": 8},
    ((4096, 9216), "attn", "50k"): {"bond_dim": 3, "max_mode": 2},
    ((4096, 9216), "mera", "2k"): {"bond_dim": 9, "max_mode": 4},
    ((4096, 9216), "mera", "50k"): {"bond_dim": 3, "max_mode": 8},
    ((4096, 4096), "ttn", "2k"): {"bond_dim": 12, "max_mode": 16},
    ((4096, 4096), "ttn", "50k"): {"bond_dim": 2, "max_mode": 32},
    ((4096, 4096), "attn", "2k"): {"bond_dim": 2, "max_mode": 8},
    ((4096, 4096), "attn", "50k"): {"bond_dim": 3, "max_mode": 2, "share": True},
    ((4096, 4096), "mera", "2k"): {"bond_dim": 7, "max_mode": 4},
    ((4096, 4096), "mera", "50k"): {"bond_dim": 2, "max_mode": 4},
    ((1000, 4096), "ttn", "2k"): {"bond_dim": 7, "max_mode": 4},
    ((1000, 4096), "ttn", "50k"): {"bond_dim": 2, "out_modes": (10, 10, 10), "in_modes": (8, 8, 8, 8), "share": True},
    ((1000, 4096), "attn", "2k"): {"bond_dim": 4, "max_mode": 4},
    ((1000, 4096), "attn", "10k"): {"bond_dim": 2, "out_modes": (40, 25), "in_modes": (2,) * 12},
    ((1000, 4096), "mera", "2k"): {"bond_dim": 4, "max_mode": 4},
    ((1000, 4096), "mera", "35k"): {"bond_dim": 2, "out_modes": (10, 10, 10), "in_modes": (8, 8, 8, 8), "share": True},
}

# The operator layout (docs/generators.md): same search (compression.config_for_ratio, which also tries
# bond 1 there: a Kronecker product is still full rank). Names read {model}-{layer}-{family}-operator-{tier}.
# On fc8 the aTTN's gates on the output legs cost more than 50,000x leaves: its most compressed is 25k.
_OPERATOR_CONFIGS: dict[tuple[tuple[int, int], str, str], dict[str, Any]] = {
    ((1000, 4096), "ttn", "2k"): {"bond_dim": 7, "max_mode": 2},
    ((1000, 4096), "ttn", "50k"): {"bond_dim": 1, "max_mode": 2},
    ((1000, 4096), "ttn", "77k"): {"bond_dim": 1, "max_mode": 4, "share": True},
    ((1000, 4096), "attn", "2k"): {"bond_dim": 7, "max_mode": 8},
    ((1000, 4096), "attn", "25k"): {"bond_dim": 1, "max_mode": 8, "share": True},
    ((1000, 4096), "mera", "2k"): {"bond_dim": 7, "max_mode": 8},
    ((1000, 4096), "mera", "50k"): {"bond_dim": 1, "max_mode": 2},
    ((1000, 4096), "mera", "77k"): {"bond_dim": 1, "max_mode": 2, "share": True},
    ((4096, 4096), "ttn", "2k"): {"bond_dim": 4, "max_mode": 32},
    ((4096, 4096), "ttn", "50k"): {"bond_dim": 2, "max_mode": 8, "share": True},
    ((4096, 4096), "ttn", "77k"): {"bond_dim": 3, "max_mode": 4, "share": True},
    ((4096, 4096), "attn", "2k"): {"bond_dim": 4, "max_mode": 32},
    ((4096, 4096), "attn", "50k"): {"bond_dim": 2, "max_mode": 8, "share": True},
    ((4096, 4096), "attn", "77k"): {"bond_dim": 1, "max_mode": 8, "share": True},
    ((4096, 4096), "mera", "2k"): {"bond_dim": 4, "max_mode": 32},
    ((4096, 4096), "mera", "50k"): {"bond_dim": 2, "max_mode": 2},
    ((4096, 4096), "mera", "77k"): {"bond_dim": 2, "max_mode": 2, "share": True},
    ((4096, 9216), "ttn", "2k"): {"bond_dim": 16, "max_mode": 2},
    ((4096, 9216), "ttn", "50k"): {"bond_dim": 5, "max_mode": 4, "share": True},
    ((4096, 9216), "ttn", "77k"): {"bond_dim": 2, "max_mode": 8},
    ((4096, 9216), "attn", "2k"): {"bond_dim": 16, "max_mode": 2},
    ((4096, 9216), "attn", "50k"): {"bond_dim": 4, "max_mode": 4, "share": True},
    ((4096, 9216), "attn", "77k"): {"bond_dim": 4, "max_mode": 2, "share": True},
    ((4096, 9216), "mera", "2k"): {"bond_dim": 9, "max_mode": 2, "share": True},
    ((4096, 9216), "mera", "50k"): {"bond_dim": 3, "max_mode": 8, "share": True},
    ((4096, 9216), "mera", "77k"): {"bond_dim": 3, "max_mode": 4, "share": True},
    ((4096, 25088), "ttn", "2k"): {"bond_dim": 30, "max_mode": 2, "share": True},
    ((4096, 25088), "ttn", "50k"): {"bond_dim": 1, "max_mode": 32},
    ((4096, 25088), "ttn", "77k"): {"bond_dim": 5, "max_mode": 2},
    ((4096, 25088), "attn", "2k"): {"bond_dim": 30, "max_mode": 2, "share": True},
    ((4096, 25088), "attn", "50k"): {"bond_dim": 1, "max_mode": 32},
    ((4096, 25088), "attn", "77k"): {"bond_dim": 4, "max_mode": 4},
    ((4096, 25088), "mera", "2k"): {"bond_dim": 7, "max_mode": 64},
    ((4096, 25088), "mera", "50k"): {"bond_dim": 1, "max_mode": 32},
    ((4096, 25088), "mera", "77k"): {"bond_dim": 4, "max_mode": 4},
}

TIER_RATIOS = {"2k": 2_000, "10k": 10_000, "25k": 25_000, "35k": 35_000, "50k": 50_000, "77k": 77_000}


@dataclass(frozen=True)
class Preset:
    """A named generator configuration for one real layer shape."""

    name: str
    model: str
    layer: str
    weight_shape: tuple[int, int]
    tier: str
    spec: GeneratorSpec

    @property
    def min_ratio(self) -> int:
        """The per-layer compression ratio this preset is guaranteed to reach."""
        return TIER_RATIOS[self.tier]


def _build_presets() -> dict[str, Preset]:
    presets = {}
    for model, layers in LAYERS.items():
        for layer, shape in layers.items():
            for layout, configs in (("split", _CONFIGS), ("operator", _OPERATOR_CONFIGS)):
                for (cfg_shape, family, tier), options in configs.items():
                    if cfg_shape == shape:
                        name = f"{model}-{layer}-{family}-{'operator-' if layout == 'operator' else ''}{tier}"
                        spec = GeneratorSpec(family=family, layout=layout, seed=0, **options)
                        presets[name] = Preset(name, model, layer, shape, tier, spec)
    return presets


PRESETS: dict[str, Preset] = _build_presets()


def get_preset(name: str) -> Preset:
    """Return the preset called ``name``.

    Raises:
        GeneratorError: unknown name; the message points at ``adntn-deploy presets``.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise GeneratorError(f"unknown preset {name!r}: run 'adntn-deploy presets' to list them") from None
