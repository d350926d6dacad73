"""Compress a trained model: replace selected Linear / Conv2d layers by generated layers fitted to their weights.

Pipeline per layer: pick a generator configuration (given bond dimension, or the most expressive one that
still reaches a requested per-layer ratio), start the cores from the hierarchical SVD of the trained
weight (or from the calibrated random start where that is not possible: shared cores, activations that
are not linear at zero), fit them to the weight with Adam, and swap the layer for an ``ADNTNLinear`` /
``ADNTNConv2d`` carrying the fitted cores and the original bias. Fine-tuning on data is a separate step
(:func:`adntn_deploy.training.finetune`).
"""

from __future__ import annotations

import copy
import fnmatch
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from adntn_deploy.errors import GeneratorError
from adntn_deploy.fit import fit, relative_error
from adntn_deploy.generators import GeneratorSpec, build_generator, build_structure
from adntn_deploy.generators.spec import LAYOUTS
from adntn_deploy.generators.linear_init import LINEAR_GAINS
from adntn_deploy.nn.layers import ADNTNConv2d, ADNTNLinear

#: Tensorisations and bonds the ratio search tries. Bond 1 is excluded in the split layout (a rank-1
#: weight) and allowed in the operator layout, where it still makes a full-rank (Kronecker) weight.
SEARCH_MAX_MODES = (2, 4, 8, 16, 32, 64)
SEARCH_BONDS = tuple(range(2, 33))
OPERATOR_SEARCH_BONDS = tuple(range(1, 33))
COMPRESSIBLE = (nn.Linear, nn.Conv2d)


@dataclass
class LayerReport:
    """One replaced layer: its generator configuration, sizes, and how well the cores fit the dense weight."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    spec: dict[str, Any]
    params: int
    dense_params: int
    ratio: float
    init: str
    target: str
    fit_error_initial: float
    fit_error: float
    fit_seconds: float
    norm_rescale: float = 1.0


@dataclass
class CompressionReport:
    """All replaced layers and whole-model parameter counts (generator cores + every remaining dense tensor)."""

    layers: list[LayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def model_ratio(self) -> float:
        """Whole-model parameter ratio, dense / compressed."""
        return self.model_params_before / max(self.model_params_after, 1)

    @property
    def layers_ratio(self) -> float:
        """Replaced layers' dense weight parameters / their generators' parameters."""
        return sum(r.dense_params for r in self.layers) / max(sum(r.params for r in self.layers), 1)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the ratios."""
        return {"layers": [asdict(r) for r in self.layers], "model_params_before": self.model_params_before,
                "model_params_after": self.model_params_after, "model_ratio": self.model_ratio,
                "layers_ratio": self.layers_ratio}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressionReport":
        """Rebuild a report from :meth:`as_dict` output (the ratios are recomputed)."""
        layers = [LayerReport(**{**r, "weight_shape": tuple(r["weight_shape"])}) for r in data["layers"]]
        return cls(layers, int(data["model_params_before"]), int(data["model_params_after"]))


def count_params(model: nn.Module) -> int:
    """Trainable-parameter count of ``model`` (generator cores count, generated weights do not exist)."""
    return sum(p.numel() for p in model.parameters())


def select_layers(model: nn.Module, selection: str | Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The Linear / Conv2d layers of ``model`` named by ``selection``, in module order.

    ``selection`` is a comma-separated string or a list of tokens; a token is ``classifier`` (every Linear
    but the last, i.e. the hidden classifier layers; the small output layer stays dense), a layer type
    (``Linear``, ``Conv2d``), or a glob over module names as ``model.named_modules()`` gives them
    (``13``, ``classifier.*``, ``fc?``).

    Raises:
        GeneratorError: a token matches no compressible layer (the message lists the layers there are),
            or names a module that is neither Linear nor Conv2d.
    """
    tokens = [t.strip() for t in (selection.split(",") if isinstance(selection, str) else selection) if t.strip()]
    if not tokens:
        raise GeneratorError("no layers selected: pass layers= (e.g. classifier, Linear, or a name glob like '1?')")
    named = [(n, m) for n, m in model.named_modules() if n]
    compressible = [(n, m) for n, m in named if type(m) in COMPRESSIBLE]
    listing = ", ".join(f"{n} ({type(m).__name__})" for n, m in compressible) or "none"
    chosen: dict[str, nn.Module] = {}
    for token in tokens:
        if token == "classifier":
            linears = [(n, m) for n, m in compressible if isinstance(m, nn.Linear)]
            hits = linears[:-1]
        elif token.lower() in {"linear", "conv2d"}:
            hits = [(n, m) for n, m in compressible if type(m).__name__.lower() == token.lower()]
        else:
            matches = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, token)]
            wrong = [f"{n} ({type(m).__name__})" for n, m in matches if type(m) not in COMPRESSIBLE and not isinstance(m, (ADNTNLinear, ADNTNConv2d))]
            if wrong and len(wrong) == len(matches):
                raise GeneratorError(f"layer pattern {token!r} matches {', '.join(wrong[:3])}: only Linear and Conv2d layers can be compressed")
            hits = [(n, m) for n, m in matches if type(m) in COMPRESSIBLE]
        if not hits:
            raise GeneratorError(f"layer selection {token!r} matches no Linear or Conv2d layer; the model has: {listing}")
        chosen.update(hits)
    return [(n, chosen[n]) for n, _ in compressible if n in chosen]


@torch.no_grad()
def layer_inputs(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], x: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Inputs that each of ``layers`` (Linear only) receives when ``model`` (in eval mode) runs on ``x``, as (N, in)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name, layer in layers if isinstance(layer, nn.Linear)}
    hooks = [layer.register_forward_pre_hook(lambda mod, args, n=name: seen[n].append(args[0].reshape(-1, args[0].shape[-1]).detach()))
             for name, layer in layers if name in seen]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: torch.cat(chunks) for name, chunks in seen.items() if chunks}


def input_projection(inputs: torch.Tensor, energy: float) -> np.ndarray:
    """Projection (in x in) onto the smallest principal subspace of ``inputs`` (N, in) holding ``energy`` (0..1]
    of their second moment: ``W @ P`` gives nearly the same outputs as ``W`` on such inputs, at a lower rank."""
    x = inputs.double()
    vals, vecs = torch.linalg.eigh(x.T @ x)
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    k = int(torch.searchsorted(torch.cumsum(vals, 0) / vals.sum().clamp_min(1e-300), torch.tensor([energy], dtype=vals.dtype))[0]) + 1
    basis = vecs[:, :min(k, len(vals))]
    return (basis @ basis.T).numpy()


def _weight_shape(layer: nn.Module) -> tuple[int, ...]:
    return tuple(int(d) for d in layer.weight.shape)


def config_for_ratio(weight_shape: Sequence[int], ratio: float, base: GeneratorSpec) -> GeneratorSpec:
    """The most expressive configuration of ``base.family`` (most parameters) that reaches ``ratio``.

    Searches tensorisations (modes of at most 2..64), bond dimensions 2..32 and unshared / shared cores;
    on equal parameter counts unshared wins (it can start from the weight's SVD). Other ``base`` fields
    (activation, mixing, arity, seed, ...) are kept.

    Raises:
        GeneratorError: ``ratio`` < 1, or no configuration reaches it (the message gives the best reachable).
    """
    if not ratio >= 1:
        raise GeneratorError(f"ratio= must be >= 1, got {ratio}")
    dense = math.prod(int(d) for d in weight_shape)
    budget = dense / ratio
    best: tuple[tuple[int, bool], GeneratorSpec] | None = None
    fewest = None
    for share in (False, True):
        for max_mode in SEARCH_MAX_MODES:
            for bond in (OPERATOR_SEARCH_BONDS if base.layout == "operator" else SEARCH_BONDS):
                try:
                    spec = base.with_options(bond_dim=bond, max_mode=max_mode, share=share, out_modes=None, in_modes=None)
                    params = build_structure(spec, weight_shape)[0].params
                except GeneratorError:
                    break  # e.g. unequal modes cannot share cores; larger bonds fail alike
                fewest = params if fewest is None else min(fewest, params)
                if params > budget:
                    break  # parameters grow with the bond
                key = (params, not share)
                if best is None or key > best[0]:
                    best = (key, spec)
    if best is None:
        reach = f"; the most compressed {base.family} configuration reaches {dense / fewest:,.0f}x" if fewest else ""
        raise GeneratorError(f"no {base.family} configuration reaches {ratio:,.0f}x on a {tuple(weight_shape)} weight{reach}: lower ratio= or pick another family")
    return best[1]


def _fit_layer(spec: GeneratorSpec, weight: np.ndarray, fit_steps: int, seed: int, name: str,
               progress: Callable[[str, int, int], None] | None):
    """(generator, fitted float32 cores, initial and final relative errors, whether the SVD start was used)."""
    linear_start = not spec.share and all(a in LINEAR_GAINS for a in spec.activations)
    generator = build_generator(spec, weight.shape, target=weight if linear_start else None)
    cores = {k: np.asarray(v, dtype=np.float32) for k, v in generator.cores.items()}
    if fit_steps > 0:
        result = fit(generator.ir, cores, weight, steps=fit_steps, seed=seed,
                     callback=(lambda step, err: progress(name, step + 1, fit_steps)) if progress else None)
        return generator, result.cores, result.initial_relative_error, result.relative_error, linear_start
    err = relative_error(generator.ir, cores, weight)
    return generator, cores, err, err, linear_start


def _replacement(layer: nn.Module, ir, cores: dict[str, np.ndarray]) -> nn.Module:
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        new = ADNTNLinear(layer.in_features, layer.out_features, bias=bias, generator=ir)
    else:
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise GeneratorError("only zero-padded Conv2d layers with numeric padding can be compressed")
        new = ADNTNConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, layer.groups, bias=bias, generator=ir)
    with torch.no_grad():
        for name, tensor in new.weight_generator.core_tensors().items():
            tensor.copy_(torch.as_tensor(cores[name], dtype=tensor.dtype))
        if bias:
            new.bias.copy_(layer.bias.detach())
    return new.to(layer.weight.device)


def _architecture_entry(layer: nn.Module, spec: GeneratorSpec) -> dict[str, Any]:
    if isinstance(layer, nn.Linear):
        return {"type": "adntn_linear", "in_features": layer.in_features, "out_features": layer.out_features,
                "bias": layer.bias is not None, "generator": spec.to_dict()}
    return {"type": "adntn_conv2d", "in_channels": layer.in_channels, "out_channels": layer.out_channels,
            "kernel_size": list(layer.kernel_size), "stride": list(layer.stride), "padding": list(layer.padding),
            "dilation": list(layer.dilation), "groups": layer.groups, "bias": layer.bias is not None,
            "generator": spec.to_dict()}


def _match_norm(ir, cores: dict[str, np.ndarray], weight: np.ndarray):
    """(ir with its output scale multiplied so ||G(cores)||_F = ||weight||_F, the factor, the new weight)."""
    from dataclasses import replace

    from adntn_deploy.ir.executors import generate_numpy

    generated = generate_numpy(ir, {k: np.asarray(v, dtype=np.float64) for k, v in cores.items()})
    target = np.linalg.norm(weight)
    if not np.linalg.norm(generated) > 0 or not np.isfinite(generated).all():
        raise GeneratorError("the fitted generator makes an all-zero weight; raise bond_dim= or lower ratio=")
    factor = float(target / np.linalg.norm(generated))
    return replace(ir, output_scale=ir.output_scale * factor), factor, generated * factor


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _install(model: nn.Module, name: str, layer: nn.Module, new: nn.Module, spec: GeneratorSpec) -> None:
    """Swap ``layer`` for ``new`` and record it in a JSON-built model's architecture, so it saves and reloads."""
    _set_submodule(model, name, new)
    architecture = getattr(model, "adntn_architecture", None)
    if architecture is not None and isinstance(model, nn.Sequential) and name.isdigit():
        architecture["layers"][int(name)] = _architecture_entry(layer, spec)


def compress(
    model: nn.Module,
    layers: str | Sequence[str] = "classifier",
    family: str = "ttn",
    *,
    bond_dim: int | tuple[int, ...] | None = None,
    ratio: float | None = None,
    layout: str = "operator",
    activation: str = "tanh",
    fit_steps: int = 200,
    seed: int = 0,
    calibration: torch.Tensor | None = None,
    calibration_energy: float = 0.999,
    inplace: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    **spec_options: Any,
) -> tuple[nn.Module, CompressionReport]:
    """Replace the selected layers of ``model`` by generated layers fitted to their trained weights.

    Args:
        layers: selection, see :func:`select_layers` (default: the hidden classifier Linear layers).
        family: "ttn", "attn" or "mera".
        bond_dim / ratio: exactly one: a fixed bond dimension (with ``spec_options`` such as max_mode,
            out_modes, in_modes, share, mixing), or a per-layer ratio that every selected layer must reach
            (the configuration is searched per layer, see :func:`config_for_ratio`).
        layout: "operator" (paired output/input sites: full-rank weights, the default), "split" (low-rank
            weights, needed by ``compile --weights stream``) or "auto" (per layer, both are fitted and the one
            with the lower fit error on the calibrated target is kept).
        activation: activation after each tree level (see adntn_deploy.ir.activations).
        fit_steps: Adam steps fitting the cores to the dense weight (0: keep the SVD / random start).
        calibration: example model inputs (a few thousand training images). With them each Linear layer's
            cores fit ``W @ P`` instead of ``W``, P projecting onto the principal subspace holding
            ``calibration_energy`` of the layer's actual inputs: same outputs on the data, much lower rank,
            so the tiny generator spends its parameters where the data is (Conv2d layers fit ``W``); and
            each such layer's bias is corrected so every unit keeps its mean pre-activation on the data.
        inplace: modify ``model`` itself instead of a deep copy.
        progress: called as ``progress(layer_name, step, fit_steps)`` while fitting.

    Returns:
        (the model with the layers replaced, in eval mode; a :class:`CompressionReport`). A model built from
        a JSON architecture (zoo, checkpoints) gets its architecture updated, so it saves and reloads.

    Raises:
        GeneratorError: both or neither of bond_dim / ratio, a bad selection or configuration, or a ratio
            that some selected layer cannot reach.
    """
    if (bond_dim is None) == (ratio is None):
        raise GeneratorError("give exactly one of bond_dim= or ratio=")
    target = model if inplace else copy.deepcopy(model)
    chosen = select_layers(target, layers)
    if layout not in LAYOUTS + ("auto",):
        raise GeneratorError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS + ('auto',))}")
    base = GeneratorSpec(family=family, bond_dim=bond_dim if bond_dim is not None else 2, activation=activation, seed=seed, **spec_options)
    layouts = LAYOUTS if layout == "auto" else (layout,)
    specs: dict[str, list[GeneratorSpec]] = {}
    for name, layer in chosen:
        options, unreachable = [], []
        for candidate in layouts:
            base_layout = base.with_options(layout=candidate)
            try:
                options.append(base_layout if ratio is None else config_for_ratio(_weight_shape(layer), ratio, base_layout))
            except GeneratorError as exc:
                unreachable.append(exc)
        if not options:  # with "auto", the operator layout's message (the last tried) says what is reachable
            raise unreachable[-1]
        specs[name] = options
    report = CompressionReport(model_params_before=count_params(target))
    inputs = layer_inputs(target, chosen, calibration) if calibration is not None else {}
    for name, layer in chosen:
        weight = dense_weight = layer.weight.detach().double().cpu().numpy()
        if name in inputs:
            weight = weight @ input_projection(inputs[name], calibration_energy)
        start = time.perf_counter()
        candidates = []
        for spec in specs[name]:
            candidates.append((spec, *_fit_layer(spec, weight, fit_steps, seed, name, progress)))
        # layout "auto": the candidate with the lower fit error on the (calibrated) target wins
        spec, generator, cores, err0, err, linear_start = min(candidates, key=lambda c: c[4])
        # A generator hundreds of times smaller than the weight captures a few percent of a trained
        # layer's energy, so its weight comes out far smaller than the layer's: the next ReLUs see only
        # their biases, gradients through the near-zero cores fall below Adam's epsilon and fine-tuning
        # stalls at chance (measured on the zoo's VGG at 2,000x). Matching the dense weight's norm keeps
        # the activations' scale and the direction the fit found.
        ir, rescale, generated = _match_norm(generator.ir, cores, weight)
        new = _replacement(layer, ir, cores)
        if name in inputs and new.bias is not None:
            # bias correction: keep every unit's mean pre-activation on the data. Inputs after a ReLU are
            # non-negative with a large mean, and a low-rank weight can push every unit negative on it,
            # killing the whole layer (seen on the zoo's VGG at 2,000x: loss stuck at ln 10).
            mean_input = inputs[name].double().mean(0).numpy()
            shift = (dense_weight.reshape(len(generated), -1) - generated.reshape(len(generated), -1)) @ mean_input
            with torch.no_grad():
                new.bias.add_(torch.as_tensor(shift, dtype=new.bias.dtype))
        _install(target, name, layer, new, spec)
        r = ir.report()
        report.layers.append(LayerReport(
            name=name, kind=type(layer).__name__, weight_shape=tuple(weight.shape), spec=spec.to_dict(),
            params=r.params, dense_params=r.dense_params, ratio=r.compression_ratio,
            init="svd" if linear_start else "random", target="W P (calibrated)" if name in inputs else "W", fit_error_initial=err0, fit_error=err,
            fit_seconds=time.perf_counter() - start, norm_rescale=rescale,
        ))
    report.model_params_after = count_params(target)
    target.eval()
    return target, report


def generated_from_scratch(
    model: nn.Module,
    layers: str | Sequence[str] = "classifier",
    family: str = "ttn",
    *,
    ratio: float,
    layout: str = "operator",
    activation: str = "tanh",
    seed: int = 0,
    **spec_options: Any,
) -> tuple[nn.Module, CompressionReport]:
    """Replace the selected layers of ``model`` (in place) by generated layers with random, variance-calibrated
    cores, to train end to end from the start (as the ADNTN paper does) instead of compressing a trained net.

    Each layer gets the most expressive configuration reaching ``ratio`` (:func:`config_for_ratio`) and the
    dense layer's bias init. Returns the model and a report (fit errors are NaN: nothing was fitted).

    Raises:
        GeneratorError: a bad selection, layout or configuration, or a ratio some layer cannot reach.
    """
    base = GeneratorSpec(family=family, activation=activation, layout=layout, **spec_options)  # validates layout
    chosen = select_layers(model, layers)
    report = CompressionReport(model_params_before=count_params(model))
    for k, (name, layer) in enumerate(chosen):
        spec = config_for_ratio(_weight_shape(layer), ratio, base).with_options(seed=seed + k)
        generator = build_generator(spec, _weight_shape(layer))
        _install(model, name, layer, _replacement(layer, generator.ir, generator.cores), spec)
        r = generator.ir.report()
        report.layers.append(LayerReport(
            name=name, kind=type(layer).__name__, weight_shape=_weight_shape(layer), spec=spec.to_dict(), params=r.params,
            dense_params=r.dense_params, ratio=r.compression_ratio, init="random", target="-",
            fit_error_initial=float("nan"), fit_error=float("nan"), fit_seconds=0.0,
        ))
    report.model_params_after = count_params(model)
    return model, report
