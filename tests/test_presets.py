"""Paper-scale presets: ratios, exact parameter counts (computed by hand here), numpy == torch."""

import numpy as np
import pytest
import torch

from tolerance import float32_rtol
from adntn_deploy.generators import build_generator, build_structure
from adntn_deploy.ir import GeneratorError, generate_numpy, generate_torch
from adntn_deploy.presets import LAYERS, PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_reaches_its_tier(name):
    preset = PRESETS[name]
    ir, _ = build_structure(preset.spec, preset.weight_shape)
    assert ir.weight_shape == preset.weight_shape
    assert ir.report().compression_ratio >= preset.min_ratio


def test_every_layer_and_family_has_a_2k_and_a_most_compressed_preset():
    for model, layers in LAYERS.items():
        for layer, shape in layers.items():
            for family in ("ttn", "attn", "mera"):
                tiers = {p.tier for p in PRESETS.values() if (p.model, p.layer, p.spec.family, p.spec.layout) == (model, layer, family, "split")}
                assert "2k" in tiers
                assert tiers & {"50k", "35k", "10k"}
                if (layer != "fc8") or family == "ttn":
                    assert "50k" in tiers
                operator = {p.tier for p in PRESETS.values() if (p.model, p.layer, p.spec.family, p.spec.layout) == (model, layer, family, "operator")}
                assert "2k" in operator and (operator & {"77k", "25k"})
                if (layer, family) != ("fc8", "attn"):
                    assert {"50k", "77k"} <= operator


# Hand counts. A TTN leaf is (mode, bond); a binary node (bond, bond, bond); the join (bond, bond).
# MERA: isometries (parent, child, child) or (parent, child); disentanglers (b, b, b, b); leaves (mode, bond).
HAND_COUNTS = {
    # out (10,10,10), in (8,8,8,8), bond 2, shared per level: leaf 10*2, two node levels 8 each;
    # in: leaf 8*2, two node levels 8 each; join 2*2
    "vgg16-fc8-ttn-50k": (10 * 2 + 8 + 8) + (8 * 2 + 8 + 8) + 2 * 2,
    # modes (32,32,4) per side, bond 2: leaves 32*2+32*2+4*2, nodes 2 (one per level); join 4
    "alexnet-fc7-ttn-50k": 2 * (32 * 2 + 32 * 2 + 4 * 2 + 8 + 8) + 4,
    # modes (4,)*6 per side, bond 2: sites 6 -> 3 -> 2 -> 1. top isometry 8; level 1: isometry 8 + (2,2)
    # single-child isometry 4 + one disentangler 16; level 0: three isometries 24 + two disentanglers 32;
    # six leaves (4,2) 48; join 4
    "vgg16-fc7-mera-50k": 2 * (8 + 8 + 4 + 16 + 24 + 32 + 48) + 4,
    # operator layout, sites (4, 4) x 6 (16 elements), bond 3, shared per (half, level, shape): per half one
    # leaf 16*3, a level-1 node 27 (the third site is carried up), a level-2 node 27; join 3*3
    "vgg16-fc7-ttn-operator-77k": 2 * (16 * 3 + 27 + 27) + 9,
}


@pytest.mark.parametrize("name, expected", sorted(HAND_COUNTS.items()))
def test_parameter_counts_match_hand_counts(name, expected):
    preset = PRESETS[name]
    ir, _ = build_structure(preset.spec, preset.weight_shape)
    assert ir.params == expected


def _relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if (n.startswith("vgg16-") or "fc6" in n) and "operator" not in n)
                         + sorted(n for n in PRESETS if n.startswith("vgg16-fc7") and "operator" in n))
def test_preset_weight_is_the_same_in_numpy_and_torch(name):
    # alexnet fc7/fc8 presets share their configuration with vgg16's, so they are covered by those
    preset = PRESETS[name]
    gen = build_generator(preset.spec, preset.weight_shape)
    cores32 = {k: v.astype(np.float32) for k, v in gen.cores.items()}
    reference = generate_numpy(gen.ir, cores32)
    with torch.no_grad():
        ours = generate_torch(gen.ir, {k: torch.from_numpy(v) for k, v in cores32.items()}).numpy()
    assert _relative(ours, reference) < float32_rtol()  # the generator's own small contractions only
    del reference, ours


def test_unknown_preset():
    with pytest.raises(GeneratorError, match="adntn-deploy presets"):
        get_preset("vgg17-fc6-ttn-2k")
