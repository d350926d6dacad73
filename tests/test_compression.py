"""compress / finetune / the zoo: selection, ratio search, fitted replacement, checkpoints and export."""

import pytest
import torch
from torch import nn

from adntn_deploy import compress, finetune
from adntn_deploy.checkpoint import load_checkpoint, save_checkpoint
from adntn_deploy.compression import config_for_ratio, select_layers
from adntn_deploy.data import load_dataset
from adntn_deploy.errors import GeneratorError
from adntn_deploy.generators import GeneratorSpec, build_structure
from adntn_deploy.models.zoo import ZOO, build_model
from adntn_deploy.nn import ADNTNConv2d, ADNTNLinear
from adntn_deploy.training import evaluate, first_generated_index, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained_mlp(digits):
    model = build_model("mlp")
    train(model, digits, epochs=2, progress=False)
    return model


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_take_28x28_and_give_10_logits(name):
    model = build_model(name)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert len(linears) == 3


@pytest.mark.parametrize("selection, expected", [
    ("classifier", ["1", "3"]),
    ("Linear", ["1", "3", "5"]),
    ("5", ["5"]),
    ("1,5", ["1", "5"]),
    (["3"], ["3"]),
])
def test_select_layers(selection, expected):
    assert [n for n, _ in select_layers(build_model("mlp"), selection)] == expected


@pytest.mark.parametrize("selection, message", [
    ("zz*", r"matches no Linear or Conv2d layer; the model has: 1 \(Linear\)"),
    ("0", "matches 0 \\(Flatten\\): only Linear and Conv2d"),
    ("", "no layers selected"),
])
def test_select_layers_errors(selection, message):
    with pytest.raises(GeneratorError, match=message):
        select_layers(build_model("mlp"), selection)


@pytest.mark.parametrize("family", ["ttn", "attn", "mera"])
@pytest.mark.parametrize("ratio", [200, 2000])
def test_ratio_search_reaches_the_ratio_with_the_most_parameters(family, ratio):
    shape = (1024, 1024)
    spec = config_for_ratio(shape, ratio, GeneratorSpec(family=family))
    params = build_structure(spec, shape)[0].params
    assert 1024 * 1024 / params >= ratio
    # one bond more in the same tensorisation no longer fits the budget (or is the search's limit)
    bigger = build_structure(spec.with_options(bond_dim=spec.bond_dim + 1), shape)[0].params
    assert bigger > 1024 * 1024 / ratio or spec.bond_dim == 32


def test_unreachable_ratio_says_what_is_reachable():
    with pytest.raises(GeneratorError, match=r"no mera configuration reaches 1,000,000x .* reaches [\d,]+x"):
        config_for_ratio((1024, 784), 1e6, GeneratorSpec(family="mera"))


def test_compress_replaces_fits_and_keeps_the_original(trained_mlp, digits):
    before = [p.clone() for p in trained_mlp.parameters()]
    model, report = compress(trained_mlp, "classifier", "ttn", bond_dim=8, max_mode=8, fit_steps=20)
    assert all((a == b).all() for a, b in zip(before, trained_mlp.parameters()))  # not in place
    assert isinstance(model[1], ADNTNLinear) and isinstance(model[3], ADNTNLinear) and isinstance(model[5], nn.Linear)
    assert [r.name for r in report.layers] == ["1", "3"]
    for r in report.layers:
        assert r.init == "svd" and r.fit_error < r.fit_error_initial < 1.0  # fitted past the SVD start
    assert torch.equal(model[1].bias, trained_mlp[1].bias)
    assert report.model_params_after < report.model_params_before and report.model_ratio > 1
    assert model.adntn_architecture["layers"][1]["type"] == "adntn_linear"


def test_compressed_model_round_trips_through_a_checkpoint(trained_mlp, tmp_path):
    model, _ = compress(trained_mlp, "classifier", "mera", ratio=300, fit_steps=5)
    save_checkpoint(tmp_path / "c.ckpt", model)
    loaded = load_checkpoint(tmp_path / "c.ckpt")
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x))


def test_conv_layers_compress_too():
    model = build_model("alexnet")
    compressed, report = compress(model, "6", "ttn", bond_dim=4, fit_steps=3)  # conv 32->64 3x3
    assert isinstance(compressed[6], ADNTNConv2d) and report.layers[0].kind == "Conv2d"
    assert compressed(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def _installed_fit_error(model, layer_report, dense):
    """||G - W||_F / ||W||_F of a compressed layer as installed: its weight without the norm-matching factor."""
    generated = model[int(layer_report.name)].weight.detach().double() / layer_report.norm_rescale
    weight = dense[int(layer_report.name)].weight.detach().double()
    return float(torch.linalg.norm(generated - weight) / torch.linalg.norm(weight))


def test_shared_cores_start_random_and_still_fit(trained_mlp):
    options = {"bond_dim": 2, "max_mode": 2, "share": True}
    start_model, start = compress(trained_mlp, "3", "ttn", fit_steps=0, **options)  # the same seeded random start
    model, report = compress(trained_mlp, "3", "ttn", fit_steps=10, **options)
    assert report.layers[0].init == "random" and report.layers[0].spec["share"] is True
    # measured on the installed weights, not taken from the fit's own bookkeeping: the fit brings them closer
    before = _installed_fit_error(start_model, start.layers[0], trained_mlp)
    after = _installed_fit_error(model, report.layers[0], trained_mlp)
    assert before == pytest.approx(report.layers[0].fit_error_initial, rel=1e-4)
    assert after == pytest.approx(report.layers[0].fit_error, rel=1e-4)
    assert after < before


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of bond_dim= or ratio="),
    ({"bond_dim": 4, "ratio": 10}, "exactly one"),
    ({"bond_dim": 4, "family": "peps"}, "unknown generator family"),
    ({"ratio": 0.5}, "must be >= 1"),
])
def test_compress_bad_arguments(trained_mlp, kwargs, message):
    with pytest.raises(GeneratorError, match=message):
        compress(trained_mlp, "classifier", **kwargs)


@pytest.mark.parametrize("scope", ["head", "all"])
def test_finetune_recovers_accuracy(trained_mlp, digits, scope):
    dense_acc = evaluate(trained_mlp, digits.test_x, digits.test_y)
    model, _ = compress(trained_mlp, "classifier", "ttn", ratio=200, fit_steps=0)
    fitted = evaluate(model, digits.test_x, digits.test_y)
    result = finetune(model, digits, epochs=6, scope=scope, batch_size=32, progress=False)
    tuned = evaluate(model, digits.test_x, digits.test_y)
    assert result.scope == scope and len(result.val_accuracy) == 6
    # 200x on 1,259 images: the fit alone is at chance level, six short epochs bring most of it back
    assert fitted < 0.3 < 0.6 * dense_acc < tuned


def test_head_scope_needs_a_generated_layer_and_a_sequential(digits):
    with pytest.raises(GeneratorError, match="compress it first"):
        first_generated_index(build_model("mlp"))
    with pytest.raises(GeneratorError, match="unknown fine-tuning scope"):
        finetune(build_model("mlp"), digits, scope="tail")


def test_calibration_fits_the_weight_where_the_inputs_are(trained_mlp, digits):
    plain = compress(trained_mlp, "3", "ttn", bond_dim=4, fit_steps=0)[1].layers[0]
    calibrated = compress(trained_mlp, "3", "ttn", bond_dim=4, fit_steps=0, calibration=digits.train_x[:500])[1].layers[0]
    assert plain.target == "W" and calibrated.target == "W P (calibrated)"
    assert calibrated.fit_error < plain.fit_error


def test_calibration_keeps_each_units_mean_pre_activation(trained_mlp, digits):
    x = digits.train_x[:400]
    model, report = compress(trained_mlp, "classifier", "ttn", ratio=500, fit_steps=5, calibration=x)
    with torch.no_grad():
        dense_pre = trained_mlp[1](trained_mlp[0](x)).mean(0)
        small_pre = model[1](model[0](x)).mean(0)
    torch.testing.assert_close(small_pre, dense_pre, rtol=1e-3, atol=1e-3 * float(dense_pre.abs().max()))


def test_generated_weight_keeps_the_dense_weights_norm(trained_mlp):
    model, report = compress(trained_mlp, "classifier", "ttn", ratio=500, fit_steps=5)
    for r in report.layers:
        assert r.norm_rescale > 1  # a 500x generator captures a small part of a trained weight
        torch.testing.assert_close(model[int(r.name)].weight.norm(), trained_mlp[int(r.name)].weight.norm(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("layout", ["operator", "split", "auto"])
def test_compress_layouts(trained_mlp, layout):
    model, report = compress(trained_mlp, "classifier", "ttn", ratio=300, fit_steps=5, layout=layout)
    layouts = [r.spec["layout"] for r in report.layers]
    assert all(lo == layout for lo in layouts) if layout != "auto" else set(layouts) <= {"split", "operator"}
    assert all(r.ratio >= 300 for r in report.layers)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_auto_layout_keeps_the_lower_fit_error(trained_mlp):
    errors = {lo: compress(trained_mlp, "3", "ttn", ratio=300, fit_steps=5, layout=lo)[1].layers[0].fit_error
              for lo in ("operator", "split", "auto")}
    assert errors["auto"] == min(errors["operator"], errors["split"])


def test_distillation_fine_tunes_towards_the_teacher(trained_mlp, digits):
    from adntn_deploy.training import Distillation

    model, _ = compress(trained_mlp, "classifier", "ttn", ratio=200, fit_steps=0)
    result = finetune(model, digits, epochs=4, scope="head", batch_size=32, progress=False,
                      distill=Distillation(trained_mlp, temperature=2.0, weight=0.5, match_layers=0.1))
    assert result.train_loss[-1] < result.train_loss[0]
    assert evaluate(model, digits.test_x, digits.test_y) > 0.6 * evaluate(trained_mlp, digits.test_x, digits.test_y)
    # hooks are removed afterwards: the teacher runs as before
    assert not trained_mlp[1]._forward_hooks


@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"weight": 1.5}, {"match_layers": -1}])
def test_distillation_bad_arguments(trained_mlp, kwargs):
    from adntn_deploy.training import Distillation

    with pytest.raises(GeneratorError, match="distillation needs"):
        Distillation(trained_mlp, **kwargs)


def test_generated_layers_train_from_scratch(digits):
    from adntn_deploy.compression import generated_from_scratch

    torch.manual_seed(0)
    model, report = generated_from_scratch(build_model("mlp"), "classifier", "mera", ratio=500, layout="operator")
    assert [r.init for r in report.layers] == ["random", "random"] and all(r.ratio >= 500 for r in report.layers)
    assert not torch.equal(model[1].weight[:16, :16], model[3].weight[:16, :16])
    train(model, digits, epochs=4, batch_size=32, progress=False)
    assert evaluate(model, digits.test_x, digits.test_y) > 0.5  # chance is 0.1
