"""ONNX -> Relax: validate the file, inline the ai.adntn functions, import, rewrite our kernels, lift or fold.

Steps of :func:`import_model`: validate the ONNX file -> (``weights="stream"``, or ``"auto"`` for the
layers the cost model picks) rewrite generated layers to run from their factors -> inline the ai.adntn function bodies (the TVM importer dispatches on op type only)
-> graph rewrites (:mod:`adntn_deploy.compiler.graph_rewrites`: BatchNormalization folded into its Conv,
Sum as Add) -> Relax import with parameters kept as inputs, with our ``StreamedDense`` converter added to the importer
-> on CPU targets, rewrite matmuls and convolutions into our packed kernels
(:func:`adntn_deploy.compiler.schedules.prepack`) -> ``--weights load`` / ``stream``: LiftTransformParams
moves everything that depends only on parameters (the generators, the weight packing) into
``main_transform_params``, run once on the device at load; ``--weights fold``: parameters are bound and
constant-folded at compile time. The result is one :class:`ImportedModel`, which both end points --
:func:`adntn_deploy.compiler.build.compile_model` and :func:`adntn_deploy.compiler.tuning.tune_model` -- take.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from adntn_deploy.compiler.artifact import LIFTED_MODES
from adntn_deploy.compiler.errors import CompileError, StreamCompileError
from adntn_deploy.errors import AdntnError


def _sanitize_initializer_names(model) -> None:
    """Prefix initializer names that do not start with a letter (torch names them "0.bias").

    TVM turns parameter names into C identifiers in generated GPU source without fixing a leading digit,
    which nvcc rejects; renaming here (in the inlined copy, not the user's file) avoids that.
    """
    renames = {i.name: f"w_{i.name}" for i in model.graph.initializer if not i.name[:1].isalpha()}
    if not renames:
        return
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]
    for inp in model.graph.input:
        if inp.name in renames:
            inp.name = renames[inp.name]


def _constants_as_tensors(model) -> None:
    """Rewrite Constant nodes given as ``value_ints`` / ``value_floats`` / ``value_int`` / ``value_float``
    into the ``value`` tensor form: TVM 0.27's ONNX importer reads only ``value`` ("no value in Constant"),
    and our files write shapes as ``value_ints`` (a third of the bytes)."""
    from onnx import helper, numpy_helper

    kinds = {"value_ints": np.int64, "value_floats": np.float32, "value_int": np.int64, "value_float": np.float32}
    for node in model.graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
            continue
        attr = node.attribute[0]
        if attr.name not in kinds:
            continue
        value = np.array(helper.get_attribute_value(attr), dtype=kinds[attr.name])
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))


def _drop_initializer_inputs(model) -> None:
    """Remove graph inputs that are initializers (in place, in the inlined copy).

    ONNX files from before IR version 4 (and some converters) list every initializer among the graph's
    inputs too. TVM's importer then made a parameter of each twice, so ``main_transform_params`` wanted
    562 tensors where the artifact stored 281 (ShuffleNet from onnx's model tests failed at load).
    """
    inits = {i.name for i in model.graph.initializer}
    kept = [inp for inp in model.graph.input if inp.name not in inits]
    if len(kept) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(kept)


def _graph_inputs(model, overrides: Mapping[str, tuple[int, ...]]) -> dict[str, list[int]]:
    """{input name: fixed shape}: the model's shapes with ``overrides`` applied and symbolic axes set to 1.

    Raises:
        CompileError: an override that does not fit the model or names no input.
        LimitError: an input larger than the memory limit (:mod:`adntn_deploy.limits`).
    """
    from adntn_deploy.limits import check_tensor

    inits = {i.name for i in model.graph.initializer}
    shapes = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        if inp.name in overrides:
            given = list(overrides[inp.name])
            if len(given) != len(dims) or any(d is not None and d != g for d, g in zip(dims, given)):
                raise CompileError(f"input_shapes= {inp.name}:{given} does not fit the model's input shape {dims}")
            dims = given
        shapes[inp.name] = [d if d is not None else 1 for d in dims]  # symbolic axes (batch) default to 1
        itemsize = np.dtype(_ONNX_DTYPES.get(inp.type.tensor_type.elem_type, "float32")).itemsize
        check_tensor(f"input {inp.name!r}", shapes[inp.name], itemsize)  # before TVM plans buffers for it
    unknown = sorted(set(overrides) - set(shapes))
    if unknown:
        raise CompileError(f"input_shapes= names {unknown}, but the model's inputs are {sorted(shapes)}")
    return shapes


_ONNX_DTYPES = {1: "float32", 11: "float64", 10: "float16", 7: "int64", 6: "int32", 9: "bool", 3: "int8", 2: "uint8"}


def _fix_input_shapes(model, shapes: Mapping[str, list[int]]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Set the inputs' shapes in ``model`` (in place); returns ({input name: dtype}, the outputs' inferred
    names, shapes and dtypes)."""
    import onnx

    dtypes = {}
    for inp in model.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, value in zip(dims, shapes[inp.name]):
                d.ClearField("dim_param")
                d.dim_value = value
            dtypes[inp.name] = _ONNX_DTYPES.get(inp.type.tensor_type.elem_type, "float32")
    inferred = onnx.shape_inference.infer_shapes(model)
    outputs = []
    for out in inferred.graph.output:
        tensor = out.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        outputs.append({"name": out.name, "shape": dims, "dtype": _ONNX_DTYPES.get(tensor.elem_type, "float32")})
    return dtypes, outputs


@dataclass
class ImportedModel:
    """An ONNX model imported into Relax: lifted (weights "load" / "stream") or folded, with its I/O,
    parameters, and what :func:`~adntn_deploy.compiler.schedules.prepack` rewrote (``prepacked``: {rule
    name: operators}; ``notes``: one line per operator left to the generic schedule, and why; ``rewritten``:
    the ONNX graph rewrites applied before import)."""

    mod: Any
    params: list[np.ndarray]
    param_names: list[str]
    shapes: dict[str, list[int]]
    outputs: list[dict[str, Any]]
    generators: dict[str, Any]
    streamed: list[dict[str, Any]]
    prepacked: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: {graph rewrite name: times applied} (:mod:`adntn_deploy.compiler.graph_rewrites`), applied ones only
    rewritten: dict[str, int] = field(default_factory=dict)
    #: {input name: dtype} (numpy names), in the order of ``shapes``
    input_dtypes: dict[str, str] = field(default_factory=dict)


def import_model(
    onnx_path: str | os.PathLike,
    weights: str = "load",
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    opt_level: int = 3,
    dump_ir: str | os.PathLike | None = None,
    prepack_target: Any = None,
) -> ImportedModel:
    """Validate an ONNX file, inline its ai.adntn functions and import it into Relax.

    With ``weights="load"`` parameters stay inputs and every weight-only computation is lifted into
    ``main_transform_params``; with ``"fold"`` they are constants and folded; with ``"stream"`` every
    generated layer is first rewritten to run from its two factors (:mod:`adntn_deploy.onnx_export.streaming`)
    and then lifted as in "load" (the factors, not the weights, are generated at load); ``"auto"`` streams
    only the layers the cost model finds cheaper (the batch is the first input's). With a CPU
    ``prepack_target`` (a tvm Target), matmuls and convolutions on weights are rewritten to read the weight
    packed into that target's vector panels (:mod:`adntn_deploy.compiler.schedules`; the packing is
    weight-only work).

    Raises:
        OnnxModelError: an invalid ONNX file. CompileError: TVM cannot import it (an unsupported op...).
        StreamError: a generated layer cannot be streamed (``weights="stream"``; "auto" keeps such layers).
        LimitError: generated weights or an input larger than the memory limit (:mod:`adntn_deploy.limits`).
    """
    import onnx.inliner
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from adntn_deploy.compiler.graph_rewrites import rewrite_graph
    from adntn_deploy.limits import check_generators
    from adntn_deploy.onnx_export.reader import find_generators, generator_summary, load_onnx

    model = load_onnx(onnx_path)
    generators = find_generators(model)
    check_generators({g.layer: g.ir for g in generators}, what=f"the generated weights of {onnx_path}")
    summary = generator_summary(model) or {g.weight: {"layer": g.layer, "family": g.ir.family} for g in generators}
    shapes = _graph_inputs(model, dict(input_shapes or {}))
    streamed: list[dict[str, Any]] = []
    if weights in ("stream", "auto"):
        from adntn_deploy.onnx_export.streaming import stream_weights

        batch = next((s[0] for s in shapes.values() if s), 1)
        model, layers = stream_weights(model, policy="all" if weights == "stream" else "auto", batch=batch)
        streamed = [layer.as_dict() for layer in layers]
    inlined = onnx.inliner.inline_local_functions(model)
    _drop_initializer_inputs(inlined)
    _constants_as_tensors(inlined)  # before the rewrites: they read Constant nodes in their tensor form
    rewritten = rewrite_graph(inlined)
    _sanitize_initializer_names(inlined)
    input_dtypes, outputs = _fix_input_shapes(inlined, shapes)
    lifted = weights in LIFTED_MODES
    mod = _convert(from_onnx, inlined, shapes, lifted)
    params: list[np.ndarray] = []
    param_names: list[str] = []
    if lifted:
        mod, detached = relax.frontend.detach_params(mod)
        main_params = list(mod["main"].params)
        param_names = [str(v.name_hint) if hasattr(v, "name_hint") else str(v) for v in main_params[len(shapes):]]
        params = [np.asarray(t.numpy()) for t in detached.get("main", [])]
    dump = Path(dump_ir) if dump_ir else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / "01_imported.py").write_text(mod.script())
    prepacked: dict[str, int] = {}
    notes: list[str] = []
    if prepack_target is not None:
        from adntn_deploy.compiler.schedules import prepack

        mod, prepacked, notes = prepack(mod, prepack_target)
    with tvm.transform.PassContext(opt_level=opt_level):
        if lifted:
            mod = relax.transform.LiftTransformParams()(mod)
        else:
            mod = relax.transform.FoldConstant()(mod)
    if dump:
        (dump / ("02_lifted.py" if lifted else "02_folded.py")).write_text(mod.script())
    return ImportedModel(mod, params, param_names, shapes, outputs, summary, streamed, prepacked, notes,
                         {name: count for name, count in rewritten.items() if count}, input_dtypes)


def _converter_class():
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    from adntn_deploy.compiler.schedules import streamed_dense

    class StreamedDense(OnnxOpConverter):
        """ai.adntn::StreamedDense(x, L, R[, bias]) -> one fused call_tir kernel."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, left, right = inputs[0], inputs[1], inputs[2]
            bias = inputs[3] if len(inputs) > 3 else None
            activation = attr.get("activation", "identity")
            activation = activation.decode() if isinstance(activation, bytes) else str(activation)
            scale = float(attr.get("scale", 1.0))
            shape = [int(d) for d in x.ty.shape]
            out_dim = int(left.ty.shape[0])
            in_dim = int(right.ty.shape[0])
            flat = x if len(shape) == 2 else bb.emit(relax.op.reshape(x, (-1, in_dim)))
            left_t = bb.emit(relax.op.permute_dims(left, [1, 0]))
            if bias is None:
                bias = relax.const(np.zeros(out_dim, dtype="float32"))
            call = bb.emit_te(streamed_dense.streamed_dense_te, flat, left_t, right, bias, activation, scale,
                              primfunc_name_hint="adntn_streamed_dense")
            gvar = call.args[0] if hasattr(call, "args") else bb.lookup_binding(call).args[0]
            bb.update_func(gvar, streamed_dense.mark_kernel(bb.get()[gvar]))
            if len(shape) != 2:
                call = bb.emit(relax.op.reshape(call, shape[:-1] + [out_dim]))
            return call

    return StreamedDense


def _convert(from_onnx, model, shapes: dict, lifted: bool):
    """Run TVM's ONNX importer; returns the Relax module.

    Raises:
        CompileError: TVM cannot import the model (one line, naming the operator it was converting); our own
        converters' errors (StreamCompileError, ...) as they are.

    Why the error is raised after the handler: TVM prints "Error converting operator ..." to stdout (which
    would corrupt ``--json`` output), and the failed import's BlockBuilder prints a warning to stderr when it
    is destroyed, which happens whenever the traceback holding it dies. Both are kept out of the user's
    terminal: stdout is captured here (the operator it names goes into the error), and the builder is
    destroyed before the raise, inside the caller's capture of native messages
    (:class:`~adntn_deploy.compiler.native_log.NativeLog`)."""
    printed = io.StringIO()
    failure: Exception | None = None
    try:
        with onnx_streamed_ops(), contextlib.redirect_stdout(printed):
            return from_onnx(model, shape_dict=shapes, keep_params_in_input=lifted)
    except AdntnError as exc:  # our own converters' errors (StreamCompileError, ...) pass through as they are
        failure = exc.with_traceback(None)
    except Exception as exc:
        failure = CompileError(_import_failure(exc, printed.getvalue()))
    failure.__context__ = None
    gc.collect()  # the traceback is gone: the failed import's BlockBuilder dies here, its warning captured
    raise failure


def _import_failure(exc: Exception, printed: str) -> str:
    """The one-line message for a TVM import failure ``exc``; ``printed`` is what the importer printed, which
    names the operator it was converting."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    operator = re.search(r"Error converting operator (\S+?),", printed)
    where = f" (converting {operator.group(1)})" if operator else ""
    hint = "; run it with ONNX Runtime (--backend ort) or re-export without that op" if "not supported" in first else ""
    return f"TVM cannot import the model{where}: {type(exc).__name__}: {first}{hint}"


@contextlib.contextmanager
def onnx_streamed_ops() -> Iterator[None]:
    """While active, TVM's ONNX importer converts ``StreamedDense`` nodes (its map has no extension hook)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    original = getattr(onnx_frontend, "_get_convert_map", None)
    if original is None:
        raise StreamCompileError("this TVM's ONNX importer has no converter map to extend; use the pinned apache-tvm")
    from adntn_deploy.onnx_export.streaming import STREAMED_OP

    extra = _converter_class()

    def patched():
        table = dict(original())
        table[STREAMED_OP] = extra
        return table

    onnx_frontend._get_convert_map = patched
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original
