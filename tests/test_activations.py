"""The activation registry: every activation has a lowering in every backend, and they all agree.

Each lowering (numpy, torch, ONNX run by ONNX Runtime, TIR built by TVM for llvm) is evaluated on one
fixed grid and compared with the numpy reference evaluated in float64 on the same inputs. Agreement
means ``|got - want| <= 1e-6 * max(1, |want|)``: absolute near zero, relative where values are large.
"""

import importlib

import numpy as np
import pytest

from adntn_deploy.errors import GeneratorError
from adntn_deploy.ir import activations
from adntn_deploy.ir.activations import (
    ACTIVATIONS,
    BACKENDS,
    Activation,
    get_lowering,
    missing_lowerings,
    register_activation,
    register_lowering,
)

#: agreement bound: absolute for |want| <= 1, relative above. Measured worst cases on this grid (x86-64,
#: torch 2.13, onnxruntime 1.32, TVM 0.27), float32: numpy 8.6e-8 (sigmoid), torch 2.6e-7 (gelu), onnx
#: 2.1e-7 (tanh), tir 2.4e-7 (tanh: TVM's fast rational tanh); float64: onnx 8.2e-8 (gelu, whose Erf runs
#: in float32), the others below 1e-15 but onnx leaky_relu 4.5e-9 (LeakyRelu's alpha is a float32 attribute)
TOLERANCE = 1e-6


def _input_grid() -> np.ndarray:
    """Fixed inputs: a dense sweep of [-20, 20], values near zero (both signed zeros), and the places
    where the fast tanh clamps (|x| = 9) or approximations switch regime."""
    sweep = np.linspace(-20.0, 20.0, 8001)
    small = np.array([0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 1e-3, -1e-3])
    edges = np.array([-20.0, 20.0, -9.0, 9.0, -8.999, 8.999, -9.001, 9.001, -18.0, 18.0, -0.5, 0.5, -1.0, 1.0])
    grid = np.concatenate([sweep, small, edges]).astype(np.float32)
    return np.concatenate([grid, np.zeros(-len(grid) % 16, np.float32)])  # a whole number of 16-lane vectors


GRID = _input_grid()


def _import_backends() -> None:
    """Import every backend's module: that is what registers its lowerings."""
    for backend in BACKENDS.values():
        importlib.import_module(backend.module)


_import_backends()


def _run_numpy(name: str, x: np.ndarray) -> np.ndarray:
    return get_lowering("numpy", name)(x.copy())


def _run_torch(name: str, x: np.ndarray) -> np.ndarray:
    import torch

    return get_lowering("torch", name)(torch.from_numpy(x.copy())).numpy()


def _run_onnx(name: str, x: np.ndarray) -> np.ndarray:
    """Build a one-input model from exactly the nodes the ONNX lowering emits; run it with ONNX Runtime."""
    onnx = pytest.importorskip("onnx", reason="the onnx backend needs onnx")
    ort = pytest.importorskip("onnxruntime", reason="the onnx backend needs onnxruntime")
    from onnx import TensorProto, helper

    from adntn_deploy.onnx_export.exporter import DEFAULT_OPSET
    from adntn_deploy.onnx_export.lowering import NodeEmitter

    element = {np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE}[x.dtype.type]
    emitter = NodeEmitter("act_")
    result = get_lowering("onnx", name)(emitter, "x", x.dtype.type)
    nodes = list(emitter.nodes)
    if result == "x":  # a graph output may not be its input: name the result through an Identity
        nodes.append(helper.make_node("Identity", ["x"], ["y"]))
        result = "y"
    graph = helper.make_graph(nodes, f"activation_{name}", [helper.make_tensor_value_info("x", element, [len(x)])],
                              [helper.make_tensor_value_info(result, element, [len(x)])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _run_tir(name: str, x: np.ndarray) -> np.ndarray:
    """A TE compute ``y[i] = lowering(x[i])``, vectorised 16 wide as in the streamed kernel, built for llvm."""
    tvm = pytest.importorskip("tvm", reason="the tir backend needs Apache TVM (pip install adntn-deploy[tvm])")
    from tvm import s_tir, te

    dtype = str(x.dtype)
    placeholder = te.placeholder((len(x),), dtype, name="x")
    lowering = get_lowering("tir", name)
    output = te.compute((len(x),), lambda i: lowering(placeholder[i], dtype), name="y")
    schedule = s_tir.Schedule(te.create_prim_func([placeholder, output]))
    (loop,) = schedule.get_loops(schedule.get_sblock("y"))
    schedule.vectorize(schedule.split(loop, [None, 16])[1])
    executable = tvm.compile(schedule.mod, target="llvm")
    result = tvm.runtime.tensor(np.zeros_like(x))
    executable["main"](tvm.runtime.tensor(x), result)
    return result.numpy()


RUNNERS = {"numpy": _run_numpy, "torch": _run_torch, "onnx": _run_onnx, "tir": _run_tir}
#: dtypes each backend computes activations in (the streamed TIR kernel is float32 only; the others also
#: run float64, the ONNX and torch generators' inner steps)
DTYPES = {"numpy": (np.float32, np.float64), "torch": (np.float32, np.float64), "onnx": (np.float32, np.float64),
          "tir": (np.float32,)}


def max_scaled_error(name: str, backend: str, dtype: type = np.float32) -> float:
    """max over the grid of ``|got - want| / max(1, |want|)`` for ``backend``'s lowering of ``name`` (want:
    the numpy reference in float64 on the same inputs). Raises GeneratorError when the lowering is missing."""
    x = GRID.astype(dtype)
    want = get_lowering("numpy", name)(x.astype(np.float64))
    got = RUNNERS[backend](name, x)
    assert got.shape == x.shape and got.dtype == x.dtype, (got.shape, got.dtype)
    return float(np.max(np.abs(got.astype(np.float64) - want) / np.maximum(1.0, np.abs(want))))


def test_every_backend_has_a_runner_here():
    assert set(RUNNERS) == set(BACKENDS) == set(DTYPES)


def test_every_activation_has_a_lowering_in_every_backend():
    missing = missing_lowerings()
    assert missing == [], "activations without a lowering (add one with register_lowering in the backend's module): " \
        + ", ".join(f"{name} in {backend} ({BACKENDS[backend].module})" for backend, name in missing)


@pytest.mark.parametrize("backend, dtype", [(b, d) for b in BACKENDS for d in DTYPES[b]],
                         ids=lambda v: v if isinstance(v, str) else np.dtype(v).name)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_lowering_agrees_with_the_numpy_reference(name, backend, dtype):
    """Fails (GeneratorError) when ``backend`` has no lowering for ``name``; else within TOLERANCE."""
    error = max_scaled_error(name, backend, dtype)
    assert error <= TOLERANCE, f"{backend} {name} ({np.dtype(dtype).name}): max error {error:.3g} > {TOLERANCE}"


@pytest.fixture
def scratch_registry(monkeypatch):
    """Copies of the registry's tables, so a test may register names; the originals come back after it."""
    monkeypatch.setattr(activations, "ACTIVATIONS", dict(activations.ACTIVATIONS))
    monkeypatch.setattr(activations, "_LOWERINGS", {b: dict(t) for b, t in activations._LOWERINGS.items()})


def _softsign(x: np.ndarray) -> np.ndarray:
    return (x / (1 + np.abs(x))).astype(x.dtype, copy=False)


def test_an_activation_only_in_the_numpy_table_is_missing_everywhere_else(monkeypatch):
    monkeypatch.setitem(ACTIVATIONS, "softsign", Activation("softsign", _softsign, "x / (1 + |x|)"))
    assert missing_lowerings() == [("torch", "softsign"), ("onnx", "softsign"), ("tir", "softsign")]
    assert missing_lowerings(("numpy",)) == []
    for backend in ("torch", "onnx", "tir"):
        with pytest.raises(GeneratorError, match=rf"'softsign' has no {backend} lowering.*register_lowering\("
                                                 rf"'{backend}', 'softsign', f\) to {BACKENDS[backend].module}"):
            get_lowering(backend, "softsign")
    with pytest.raises(GeneratorError, match="softsign"):
        max_scaled_error("softsign", "onnx")  # the agreement test fails, not skips, on a missing lowering


def test_the_streamed_kernel_reports_a_missing_tir_lowering_as_a_compile_error(monkeypatch):
    from adntn_deploy.compiler.errors import StreamCompileError
    from adntn_deploy.compiler.schedules.streamed_dense import activation_expr

    monkeypatch.setitem(ACTIVATIONS, "softsign", Activation("softsign", _softsign, "x / (1 + |x|)"))
    with pytest.raises(StreamCompileError, match="no 'softsign' activation; compile with --weights load"):
        activation_expr("softsign", None)


def test_registering_lowerings_completes_a_new_activation(scratch_registry):
    register_activation(Activation("softsign", _softsign, "x / (1 + |x|)"))
    assert [n for _, n in missing_lowerings()] == ["softsign"] * 3
    register_lowering("torch", "softsign", lambda x: x / (1 + x.abs()))
    assert missing_lowerings() == [("onnx", "softsign"), ("tir", "softsign")]
    assert max_scaled_error("softsign", "torch") <= TOLERANCE
    with pytest.raises(GeneratorError, match="already has a torch lowering: pass replace=True"):
        register_lowering("torch", "softsign", lambda x: x)
    register_lowering("torch", "softsign", lambda x: x / (1 + x.abs()), replace=True)
    with pytest.raises(GeneratorError, match="already registered"):
        register_activation(Activation("softsign", _softsign, "again"))


@pytest.mark.parametrize("backend, name, lowering, match", [
    ("numpy", "tanh", np.tanh, "numpy lowering is the activation's reference"),
    ("cuda", "tanh", np.tanh, "unknown activation backend 'cuda': use one of numpy, torch, onnx, tir"),
    ("torch", "softplus", np.tanh, "unknown activation 'softplus'.*add an Activation"),
    ("torch", "tanh", "tanh", "must be callable"),
    ("torch", "tanh", np.tanh, "already has a torch lowering"),
])
def test_bad_registrations_are_clear_errors(scratch_registry, backend, name, lowering, match):
    with pytest.raises(GeneratorError, match=match):
        register_lowering(backend, name, lowering)


def test_lookups_of_unknown_names_are_clear_errors():
    with pytest.raises(GeneratorError, match="unknown activation 'swish': use one of"):
        get_lowering("torch", "swish")
    with pytest.raises(GeneratorError, match="unknown activation backend 'jax'"):
        get_lowering("jax", "tanh")
    with pytest.raises(GeneratorError, match="unknown activation backend 'jax'"):
        missing_lowerings(("jax",))


def test_an_unimported_backend_says_to_import_its_module(scratch_registry):
    activations._LOWERINGS["tir"].clear()
    with pytest.raises(GeneratorError, match="no tir lowering is registered at all: is "
                                             "adntn_deploy.compiler.schedules.streamed_dense imported"):
        get_lowering("tir", "tanh")
