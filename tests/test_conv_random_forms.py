"""Seeded random convolution forms, compiled for the host and compared with ONNX Runtime.

The hand-written tables (tests/test_conv.py, tests/test_pointwise_conv.py) check the forms we thought of.
These draw the rest: channels, groups, filter shape, stride, dilation, padding, batch and plane size at
random (fixed seeds, so a failure reproduces), covering the rewrites' branches together: the packed and
pointwise kernels, padded groups and channels, subsampled strided 1x1 convolutions, K-blocking and plane
buffers, and the generic fallback (depthwise). A compile that fails, or an output that differs from ORT's
by more than float32 rounding allows, is a bug (of the kind fixed on 2026-12-03: a 3x3 conv to 1,000
channels at 13x13 packed 63 weight panels for a kernel reading 64, and failed to compile for AVX-512).
Each form is also compiled, without running, for the other CPU profiles whose kernels differ (AVX-512 or
AVX2, whichever the host is not, and aarch64 where its cross g++ is installed). The first forms run in
the default suite, the rest with the slow tests.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]' (scripts/bootstrap.sh does)")

from tolerance import float32_rtol, relative_error  # noqa: E402

DEFAULT_FORMS = 12
SLOW_FORMS = 48


def random_form(seed: int) -> dict | None:
    """One convolution form drawn with ``seed``, or None when the draw has no output pixel."""
    rng = random.Random(seed)
    groups = rng.choice([1, 1, 1, 2, 3, 4])
    form = {
        "groups": groups,
        "in_channels": groups * rng.choice([1, 3, 8, 16, 33, 64, 128, 200]),
        "out_channels": groups * rng.choice([1, 4, 6, 16, 24, 34, 64, 70, 128, 200, 1000]),
        "kernel": rng.choice([(1, 1), (1, 1), (3, 3), (5, 5), (1, 3), (3, 1), (7, 7), (2, 2)]),
        "strides": rng.choice([(1, 1), (1, 1), (2, 2), (2, 1), (3, 3)]),
        "dilations": rng.choice([(1, 1), (1, 1), (1, 1), (2, 2)]),
        "batch": rng.choice([1, 1, 2, 3]),
        "bias": rng.random() < 0.7,
    }
    kh, kw = form["kernel"]
    form["pads"] = rng.choice([[0, 0, 0, 0], [0, 0, 0, 0], [kh // 2, kw // 2, kh // 2, kw // 2], [1, 0, 0, 1]])
    height = rng.choice([rng.randint(1, 40), 14, 16, 28, 32])
    form["plane"] = (height, rng.choice([height, rng.randint(1, 40)]))
    form["out_plane"] = tuple(
        (size + form["pads"][axis] + form["pads"][axis + 2] - form["dilations"][axis] * (k - 1) - 1) // form["strides"][axis] + 1
        for axis, (size, k) in enumerate(zip(form["plane"], form["kernel"])))
    return form if min(form["out_plane"]) >= 1 else None


def _forms(first: int, count: int) -> list[tuple[int, dict]]:
    forms, seed = [], first
    while len(forms) < count:
        form = random_form(seed)
        if form is not None:
            forms.append((seed, form))
        seed += 1
    return forms


def _describe(form: dict) -> str:
    return (f"b{form['batch']}-{form['in_channels']}to{form['out_channels']}-g{form['groups']}-k{form['kernel'][0]}x"
            f"{form['kernel'][1]}-s{form['strides'][0]}{form['strides'][1]}-d{form['dilations'][0]}-"
            f"p{''.join(map(str, form['pads']))}-{form['plane'][0]}x{form['plane'][1]}")


def _conv_relu(form: dict, seed: int):
    """The form as a Conv(+bias)+Relu ONNX model with weights drawn from ``seed``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight_shape = (form["out_channels"], form["in_channels"] // form["groups"], *form["kernel"])
    inits = [numpy_helper.from_array((rng.standard_normal(weight_shape) * 0.2).astype(np.float32), "w")]
    if form["bias"]:
        inits.append(numpy_helper.from_array(rng.standard_normal(form["out_channels"]).astype(np.float32), "b"))
    conv = helper.make_node("Conv", ["x", "w"] + (["b"] if form["bias"] else []), ["c"], group=form["groups"],
                            kernel_shape=list(form["kernel"]), strides=list(form["strides"]),
                            dilations=list(form["dilations"]), pads=form["pads"])
    graph = helper.make_graph(
        [conv, helper.make_node("Relu", ["c"], ["y"])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [form["batch"], form["in_channels"], *form["plane"]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [form["batch"], form["out_channels"], *form["out_plane"]])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _other_profiles() -> list[str]:
    """The CPU profiles whose kernels differ from the host's and that compile here (see the module doc)."""
    import shutil

    from adntn_deploy.compiler.profiles import host_arch, resolve_target
    from test_records import host_isa

    profiles = []
    if host_arch() == "x86_64":
        profiles.append("x86-64-avx2" if host_isa() == "x86-64-avx512" else "x86-64-avx512")
    if shutil.which(resolve_target("aarch64").cross_compiler):
        profiles.append("aarch64")
    return profiles


def _check(tmp_path, seed: int, form: dict) -> None:
    import onnx

    from adntn_deploy.compiler.build import compile_model
    from adntn_deploy.runtime import load

    path = tmp_path / "conv.onnx"
    onnx.save(_conv_relu(form, seed), path)
    for profile in _other_profiles():
        compile_model(path, profile, tmp_path / f"art-{profile}")
    artifact = compile_model(path, "host", tmp_path / "art")
    x = {"x": np.random.default_rng(seed + 1).standard_normal((form["batch"], form["in_channels"], *form["plane"]))
         .astype(np.float32)}
    want = load(path).run(x)["y"]
    reduction = form["in_channels"] // form["groups"] * form["kernel"][0] * form["kernel"][1]
    assert relative_error(load(artifact.path).run(x)["y"], want) < float32_rtol(reduction), _describe(form)


@pytest.mark.parametrize("seed, form", [pytest.param(s, f, id=_describe(f)) for s, f in _forms(0, DEFAULT_FORMS)])
def test_random_conv_form_equals_ort(tmp_path, seed, form):
    _check(tmp_path, seed, form)


@pytest.mark.slow
@pytest.mark.parametrize("seed, form", [pytest.param(s, f, id=_describe(f)) for s, f in _forms(1000, SLOW_FORMS)])
def test_more_random_conv_forms_equal_ort(tmp_path, seed, form):
    _check(tmp_path, seed, form)


def test_the_forms_cover_the_kernels_and_the_rewrites():
    """The drawn forms reach every path the conv rewrite takes (else the draw needs widening)."""
    forms = [form for _, form in _forms(0, DEFAULT_FORMS) + _forms(1000, SLOW_FORMS)]
    pointwise = [f for f in forms if f["kernel"] == (1, 1)]
    assert any(f["strides"] != (1, 1) and not any(f["pads"]) for f in pointwise)  # subsampled first
    assert any(f["groups"] == 1 and f["strides"] == (1, 1) and not any(f["pads"]) for f in pointwise)
    assert any(f["groups"] > 1 and f["out_channels"] == f["groups"] for f in forms)  # depthwise-like: generic
    assert any(f["out_channels"] // f["groups"] in (34, 70, 200, 1000) for f in forms)  # padded channels
    assert any(f["dilations"] != (1, 1) for f in forms) and any(f["batch"] > 1 for f in forms)
