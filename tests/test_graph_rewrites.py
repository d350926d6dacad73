"""ONNX graph rewrites before TVM import: each keeps the model's function (ORT before vs after) and fires
only where it may. Built with onnx.helper so every form (stored, computed and ConstantOfShape weights,
training-mode BN, shared outputs) is explicit."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tolerance import float32_rtol, relative_error
from adntn_deploy.compiler.graph_rewrites import REWRITES, rewrite_graph

RNG = np.random.default_rng(0)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _bn_stats(prefix, channels):
    return [_init(f"{prefix}_scale", RNG.uniform(0.5, 2, channels)), _init(f"{prefix}_shift", RNG.standard_normal(channels)),
            _init(f"{prefix}_mean", RNG.standard_normal(channels)), _init(f"{prefix}_var", RNG.uniform(0.1, 3, channels))]


def _bn(prefix, source, output, **attrs):
    names = [f"{prefix}_{s}" for s in ("scale", "shift", "mean", "var")]
    return helper.make_node("BatchNormalization", [source, *names], [output], name=prefix, epsilon=1e-3, **attrs)


def _model(nodes, inits, in_shape, out_shape):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def conv_bn(bias=True, groups=1, weight="stored"):
    """x (1, 8, 6, 6) -> Conv 3x3 (16 out) -> BN -> y. ``weight``: stored, computed (an Identity of a stored
    tensor, as generated weights are) or fill (a ConstantOfShape, as onnx's light test models write)."""
    w = RNG.standard_normal((16, 8 // groups, 3, 3))
    nodes, inits = [], _bn_stats("bn", 16) + [_init("w_src", w)]
    if weight == "stored":
        inits[-1] = _init("w", w)
    elif weight == "computed":
        nodes.append(helper.make_node("Identity", ["w_src"], ["w"]))
    else:
        inits[-1] = numpy_helper.from_array(np.array([16, 8 // groups, 3, 3], np.int64), "w_shape")
        nodes.append(helper.make_node("ConstantOfShape", ["w_shape"], ["w"], value=numpy_helper.from_array(np.array([0.05], np.float32))))
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(_init("b", RNG.standard_normal(16)))
        conv_inputs.append("b")
    nodes += [helper.make_node("Conv", conv_inputs, ["c"], group=groups, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
              _bn("bn", "c", "y")]
    return _model(nodes, inits, [1, 8, 6, 6], [1, 16, 6, 6])


def conv1d_bn():
    inits = _bn_stats("bn", 4) + [_init("w", RNG.standard_normal((4, 3, 5)))]
    return _model([helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[5]), _bn("bn", "c", "y")], inits, [2, 3, 9], [2, 4, 5])


def sum_of(count, broadcast=False):
    inputs = [_init(f"s{k}", RNG.standard_normal((1, 4, 1, 1) if broadcast and k else (1, 4, 3, 3))) for k in range(1, count)]
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Sum", ["r"] + [i.name for i in inputs], ["y"], name="join")]
    return _model(nodes, inputs, [1, 4, 3, 3], [1, 4, 3, 3])


def conv_scale_shift(ops=("Mul", "Add"), shapes=((16, 1, 1), (16, 1, 1)), bn=False, weight="stored", unsqueezed=False):
    """x (1, 8, 6, 6) -> Conv 3x3 (16 out) [-> BN] -> ``ops`` by constants of ``shapes`` -> y. ``unsqueezed``:
    each constant is a vector made (16, 1, 1) by an opset-13 Unsqueeze, as onnx's Inception v2 writes them."""
    model = conv_bn(weight=weight)
    nodes = [n for n in model.graph.node if n.op_type != "BatchNormalization"] if not bn else list(model.graph.node)
    current = "y" if bn else "c"
    inits = list(model.graph.initializer)
    if unsqueezed:
        inits.append(numpy_helper.from_array(np.array([1, 2], np.int64), "unsqueeze_axes"))
    for k, (op, shape) in enumerate(zip(ops, shapes)):
        value = RNG.uniform(0.5, 2, shape) if op == "Mul" else RNG.standard_normal(shape)
        name = f"k{k}"
        if unsqueezed:
            inits.append(_init(f"{name}_vector", value.reshape(-1)))
            nodes.append(helper.make_node("Unsqueeze", [f"{name}_vector", "unsqueeze_axes"], [name]))
        else:
            inits.append(_init(name, value))
        out = "out" if k == len(ops) - 1 else f"t{k}"
        nodes.append(helper.make_node(op, [current, name], [out], name=f"{op.lower()}{k}"))
        current = out
    del model.graph.node[:], model.graph.initializer[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    model.graph.output[0].name = "out"
    return model


def _run(model, shape):
    x = RNG.standard_normal(shape).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x}), x


def _ops(model):
    return [node.op_type for node in model.graph.node]


CASES = {
    # name: (model, input shape, {rewrite: times}, op types expected afterwards (in order))
    "conv-bn-stored-weight": (lambda: conv_bn(), [1, 8, 6, 6], {"fold-batchnorm-into-conv": 1}, ["Conv"]),
    "conv-bn-no-bias": (lambda: conv_bn(bias=False), [1, 8, 6, 6], {"fold-batchnorm-into-conv": 1}, ["Conv"]),
    "grouped-conv-bn": (lambda: conv_bn(groups=4), [1, 8, 6, 6], {"fold-batchnorm-into-conv": 1}, ["Conv"]),
    "conv-bn-computed-weight": (lambda: conv_bn(weight="computed"), [1, 8, 6, 6], {"fold-batchnorm-into-conv": 1},
                                ["Identity", "Mul", "Conv"]),
    "conv-bn-filled-weight": (lambda: conv_bn(weight="fill"), [1, 8, 6, 6], {"fold-batchnorm-into-conv": 1},
                              ["ConstantOfShape", "Mul", "Conv"]),
    "conv1d-bn": (conv1d_bn, [2, 3, 9], {"fold-batchnorm-into-conv": 1}, ["Conv"]),
    "conv-bn-mul-add-unsqueezed": (lambda: conv_scale_shift(bn=True, unsqueezed=True), [1, 8, 6, 6],
                                   {"fold-batchnorm-into-conv": 1, "fold-scale-shift-into-conv": 1}, ["Conv"]),
    "conv-bn-mul-add-filled-weight": (lambda: conv_scale_shift(bn=True, weight="fill"), [1, 8, 6, 6],
                                      {"fold-batchnorm-into-conv": 1, "fold-scale-shift-into-conv": 1},
                                      ["ConstantOfShape", "Mul", "Mul", "Conv"]),
    "conv-add-scalar-mul-sub": (lambda: conv_scale_shift(("Add", "Mul", "Sub"), ((1,), (1, 16, 1, 1), (16, 1, 1))),
                                [1, 8, 6, 6], {"fold-scale-shift-into-conv": 1}, ["Conv"]),
    "sum-of-two": (lambda: sum_of(2), [1, 4, 3, 3], {"sum-to-add": 1}, ["Relu", "Add"]),
    "sum-of-four-broadcast": (lambda: sum_of(4, broadcast=True), [1, 4, 3, 3], {"sum-to-add": 1}, ["Relu", "Add", "Add", "Add"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rewrite_keeps_the_function(case):
    make, shape, counts, ops = CASES[case]
    model = make()
    before, x = _run(model, shape)
    rewritten = copy.deepcopy(model)
    applied = rewrite_graph(rewritten)
    onnx.checker.check_model(rewritten)
    assert {name: n for name, n in applied.items() if n} == counts
    assert _ops(rewritten) == ops
    session = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    after = session.run(None, {"x": x})
    assert relative_error(after[0], before[0]) < float32_rtol(8 * 9)


def test_folding_drops_the_tensors_it_replaced():
    """The old weight, bias and statistics would otherwise stay initializers (parameters of the artifact)."""
    model = conv_bn()
    rewrite_graph(model)
    assert sorted(init.name for init in model.graph.initializer) == ["b_bn_bias", "w_bn"]


def test_folding_scale_and_shift_drops_their_constants_and_the_nodes_making_them():
    model = conv_scale_shift(bn=True, unsqueezed=True)
    rewrite_graph(model)
    assert _ops(model) == ["Conv"]
    assert sorted(init.name for init in model.graph.initializer) == ["b_bn_bias_affine_bias", "w_bn_affine"]


def _shared_conv_output():
    model = conv_bn()
    model.graph.node.append(helper.make_node("Relu", ["c"], ["z"]))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 16, 6, 6]))
    return model


def _training_mode_bn():
    model = conv_bn()
    bn = model.graph.node[-1]
    bn.output.extend(["running_mean", "running_var"])
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    model.opset_import[0].version = 15
    return model


def _computed_statistics():
    model = conv_bn()
    model.graph.node.insert(0, helper.make_node("Identity", ["bn_mean"], ["bn_mean_used"]))
    model.graph.node[-1].input[3] = "bn_mean_used"
    return model


def _weight_of_unknown_rank():
    model = conv_bn(weight="computed")
    conv = model.graph.node[-2]
    del conv.attribute[:]  # no kernel_shape: the rank of a computed weight is unknown here
    conv.attribute.append(helper.make_attribute("pads", [1, 1, 1, 1]))
    return model


def _if_reading(name, shape):
    """An If node whose branches read ``name`` from the enclosing graph, output ``z`` (Identity / Neg of it)."""
    def branch(op):
        out = helper.make_tensor_value_info(f"z_{op}", TensorProto.FLOAT, shape)
        return helper.make_graph([helper.make_node(op, [name], [f"z_{op}"])], f"branch_{op}", [], [out])
    flag = helper.make_node("Constant", [], ["flag"], value=helper.make_tensor("flag_value", TensorProto.BOOL, [], [True]))
    return [flag, helper.make_node("If", ["flag"], ["z"], then_branch=branch("Identity"), else_branch=branch("Neg"))]


def _conv_output_read_in_a_branch():
    model = conv_bn()
    model.graph.node.extend(_if_reading("c", [1, 16, 6, 6]))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 16, 6, 6]))
    return model


def test_a_weight_a_branch_reads_is_kept():
    """Folding replaces the conv's weight ``w``; an If branch that reads ``w`` from the enclosing graph
    must still find it (the subgraph is not rewritten, so nothing else would notice it is gone)."""
    model = conv_bn()
    model.graph.node.extend(_if_reading("w", [16, 8, 3, 3]))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [16, 8, 3, 3]))
    before, x = _run(model, [1, 8, 6, 6])
    assert rewrite_graph(model)["fold-batchnorm-into-conv"] == 1
    onnx.checker.check_model(model, full_check=True)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert relative_error(after[0], before[0]) < float32_rtol(8 * 9)
    np.testing.assert_array_equal(after[1], before[1])


def _constant_first_sub():
    model = conv_scale_shift(("Sub",), ((16, 1, 1),))
    sub = model.graph.node[-1]
    sub.input[0], sub.input[1] = sub.input[1], sub.input[0]  # k0 - conv: the conv's sign flips, not folded here
    return model


def _scale_read_at_run_time():
    model = conv_scale_shift(("Mul",), ((16, 1, 1),))
    model.graph.node.insert(0, helper.make_node("Identity", ["x"], ["x_copy"]))
    model.graph.node.insert(1, helper.make_node("ReduceMean", ["x_copy"], ["k0_live"], axes=[0, 1, 2, 3], keepdims=1))
    model.graph.node[-1].input[1] = "k0_live"
    return model


@pytest.mark.parametrize("rewrite, make, why", [
    ("fold-batchnorm-into-conv", _shared_conv_output, "the conv's output is read by another node too"),
    ("fold-batchnorm-into-conv", _conv_output_read_in_a_branch, "the conv's output is read inside an If branch too"),
    ("fold-batchnorm-into-conv", _training_mode_bn, "BN in training mode"),
    ("fold-batchnorm-into-conv", _computed_statistics, "statistics computed at run time"),
    ("fold-batchnorm-into-conv", _weight_of_unknown_rank, "a computed weight without kernel_shape"),
    ("fold-scale-shift-into-conv", lambda: conv_scale_shift(("Mul",), ((1, 1, 6, 6),)), "the scale varies along the pixels"),
    ("fold-scale-shift-into-conv", lambda: conv_scale_shift(("Add",), ((2, 16, 1, 1),)),
     "the constant broadcasts the output to a batch of 2"),
    ("fold-scale-shift-into-conv", lambda: conv_scale_shift(("Add",), ((1, 1, 16, 1, 1),)), "the constant adds a dimension"),
    ("fold-scale-shift-into-conv", _constant_first_sub, "a Sub with the conv's output second"),
    ("fold-scale-shift-into-conv", _scale_read_at_run_time, "a scale computed from the input"),
])
def test_fold_left_alone(rewrite, make, why):
    model = make()
    before = copy.deepcopy(model)
    assert rewrite_graph(model)[rewrite] == 0, why
    assert model == before


def test_batchnorm_of_the_wrong_length_is_a_clear_error(tmp_path):
    """A BN with 5 values per statistic after a conv of 16 channels: one line naming the node, from the
    library and from compile's CLI (exit 1), instead of TVM's importer dump."""
    import subprocess
    import sys

    from adntn_deploy.onnx_export.reader import OnnxModelError

    model = conv_bn()
    for init in model.graph.initializer:
        if init.name.startswith("bn_"):
            init.CopyFrom(_init(init.name, np.ones(5)))
    with pytest.raises(OnnxModelError, match="'bn' has 5 values per statistic, but the Conv before it makes 16"):
        rewrite_graph(copy.deepcopy(model))
    pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]' (scripts/bootstrap.sh does)")
    onnx.save(model, tmp_path / "bad.onnx")
    done = subprocess.run([sys.executable, "-m", "adntn_deploy.cli.main", "compile", str(tmp_path / "bad.onnx"),
                           "--target", "host", "-o", str(tmp_path / "art")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "values per statistic" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "art").exists()


def test_every_rewrite_has_a_name_and_a_case():
    names = {rewrite.name for rewrite in REWRITES}
    assert names == {name for case in CASES.values() for name in case[2]}


def test_compile_folds_batchnorm_and_matches_ort(tmp_path):
    """End to end: the artifact's manifest says what was rewritten, the output equals ORT's on the file,
    and the file itself is not changed."""
    pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]' (scripts/bootstrap.sh does)")
    from adntn_deploy.compiler.build import compile_model
    from adntn_deploy.runtime import load

    model = conv_bn()
    model.graph.node.append(helper.make_node("Relu", ["y"], ["r"]))
    model.graph.node.append(helper.make_node("Sum", ["r", "y"], ["out"]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16, 6, 6]))
    path = tmp_path / "conv_bn.onnx"
    onnx.save(model, path)
    saved = path.read_bytes()
    artifact = compile_model(path, "host", tmp_path / "art")
    assert artifact.manifest["tuning"]["graph_rewrites"] == {"fold-batchnorm-into-conv": 1, "sum-to-add": 1}
    assert artifact.manifest["tuning"]["packed_conv2d"] == 1
    x = {"x": RNG.standard_normal((1, 8, 6, 6)).astype(np.float32)}
    want = load(path).run(x)["out"]
    assert relative_error(load(artifact.path).run(x)["out"], want) < float32_rtol(8 * 9)
    assert path.read_bytes() == saved
