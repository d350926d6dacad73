"""The generator IR: a validated, JSON-serialisable contraction program that produces one weight tensor.

A program names its cores (the trainable tensors), then lists steps. Every step contracts exactly two
operands -- cores or results of earlier steps -- with a two-operand einsum, then applies an elementwise
activation. The last step's result is permuted by ``output_permutation``, reshaped to ``weight_shape`` and
multiplied by ``output_scale``. Exporters and compilers replay the steps in order; nothing is re-planned.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Mapping

from adntn_deploy.errors import AdntnError, GeneratorError
from adntn_deploy.ir.activations import get_activation

__all__ = ["Core", "GeneratorError", "GeneratorIR", "GeneratorReport", "Step"]

IR_FORMAT = "adntn-generator-ir"
IR_VERSION = 1
#: the compact form (:meth:`GeneratorIR.to_compact_json`, used in ONNX files): cores and steps as arrays
COMPACT_IR_VERSION = 2
CORE_ROLES = ("leaf", "node", "top", "disentangler", "isometry", "mixer")
_EQUATION = re.compile(r"^([a-zA-Z]*),([a-zA-Z]*)->([a-zA-Z]*)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
#: no tensor can have more elements (ONNX dimensions are int64); bounding them keeps every size and cost
#: computed from a program (bytes, FLOPs, ratios) a finite float
MAX_ELEMENTS = 2**62


@dataclass(frozen=True)
class Core:
    """A trainable tensor of the generator: ``shape`` in elements, ``role`` one of :data:`CORE_ROLES`."""

    name: str
    shape: tuple[int, ...]
    role: str

    @property
    def size(self) -> int:
        """Number of scalar parameters in this core."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Step:
    """One pairwise contraction ``output = activation(einsum(equation, lhs, rhs))``."""

    equation: str
    lhs: str
    rhs: str
    output: str
    activation: str = "identity"

    @property
    def subscripts(self) -> tuple[str, str, str]:
        """The (lhs, rhs, output) subscript strings of the equation."""
        m = _EQUATION.match(self.equation)
        if m is None:
            raise GeneratorError(f"step {self.output!r}: equation {self.equation!r} is not a two-operand einsum 'ab,bc->ac'")
        return m.group(1), m.group(2), m.group(3)


@dataclass(frozen=True)
class GeneratorReport:
    """Costs of one generator. Bytes assume float32; FLOPs count a multiply-add as 2."""

    family: str
    weight_shape: tuple[int, ...]
    params: int
    dense_params: int
    compression_ratio: float
    generation_flops: int
    peak_intermediate_bytes: int
    dense_weight_bytes: int
    steps: int

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class GeneratorIR:
    """A complete weight generator. Construction validates it; invalid programs raise GeneratorError."""

    family: str
    weight_shape: tuple[int, ...]
    cores: tuple[Core, ...]
    steps: tuple[Step, ...]
    output_permutation: tuple[int, ...]
    output_scale: float = 1.0
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_shape", tuple(int(d) for d in self.weight_shape))
        object.__setattr__(self, "output_permutation", tuple(int(p) for p in self.output_permutation))
        self._validate()

    # ----------------------------------------------------------------------------------------- validation
    def _validate(self) -> None:
        if not self.steps:
            raise GeneratorError("a generator needs at least one contraction step")
        if any(d <= 0 for d in self.weight_shape):
            raise GeneratorError(f"weight shape {self.weight_shape} has a non-positive dimension")
        if math.prod(self.weight_shape) > MAX_ELEMENTS:
            raise GeneratorError(f"weight shape {str(self.weight_shape)[:80]} has more than 2^62 elements")
        if not math.isfinite(self.output_scale) or self.output_scale == 0:
            raise GeneratorError(f"output_scale must be finite and non-zero, got {self.output_scale}")
        shapes: dict[str, tuple[int, ...]] = {}
        for core in self.cores:
            if not _NAME.match(core.name):
                raise GeneratorError(f"core name {core.name!r} is not an identifier (letters, digits, '_', '.')")
            if core.name in shapes:
                raise GeneratorError(f"core {core.name!r} is declared twice")
            if core.role not in CORE_ROLES:
                raise GeneratorError(f"core {core.name!r} has unknown role {core.role!r}: use one of {CORE_ROLES}")
            if not core.shape or any(int(d) <= 0 for d in core.shape):
                raise GeneratorError(f"core {core.name!r} has shape {core.shape}: every dimension (bond) must be >= 1")
            if math.prod(core.shape) > MAX_ELEMENTS:
                raise GeneratorError(f"core {core.name!r} has shape {str(core.shape)[:80]}: more than 2^62 elements")
            shapes[core.name] = tuple(int(d) for d in core.shape)
        for step in self.steps:
            get_activation(step.activation)
            if step.output in shapes:
                raise GeneratorError(f"step output {step.output!r} reuses an existing tensor name")
            if not _NAME.match(step.output):
                raise GeneratorError(f"step output name {step.output!r} is not an identifier")
            lhs, rhs, out = step.subscripts
            sizes: dict[str, int] = {}
            for operand, subs in ((step.lhs, lhs), (step.rhs, rhs)):
                if operand not in shapes:
                    raise GeneratorError(f"step {step.output!r} reads {operand!r} before it is defined")
                shape = shapes[operand]
                if len(shape) != len(subs) or len(set(subs)) != len(subs):
                    raise GeneratorError(
                        f"step {step.output!r}: subscripts {subs!r} do not fit {operand!r} of shape {shape}"
                    )
                for s, d in zip(subs, shape):
                    if sizes.setdefault(s, d) != d:
                        raise GeneratorError(f"step {step.output!r}: index {s!r} has sizes {sizes[s]} and {d}")
            if len(set(out)) != len(out) or any(s not in sizes for s in out):
                raise GeneratorError(f"step {step.output!r}: output subscripts {out!r} are not a subset of the inputs'")
            shapes[step.output] = tuple(sizes[s] for s in out)
            if math.prod(shapes[step.output]) > MAX_ELEMENTS:
                raise GeneratorError(f"step {step.output!r} produces more than 2^62 elements")
        result_shape = shapes[self.steps[-1].output]
        if sorted(self.output_permutation) != list(range(len(result_shape))):
            raise GeneratorError(
                f"output_permutation {self.output_permutation} is not a permutation of {len(result_shape)} axes"
            )
        if math.prod(result_shape) != math.prod(self.weight_shape):
            raise GeneratorError(
                f"the program produces {math.prod(result_shape)} elements {result_shape} but the weight "
                f"{self.weight_shape} needs {math.prod(self.weight_shape)}"
            )
        object.__setattr__(self, "_shapes", shapes)

    # ----------------------------------------------------------------------------------------- accessors
    @property
    def result(self) -> str:
        """Name of the tensor the last step produces (before permutation, reshape and scale)."""
        return self.steps[-1].output

    def shape_of(self, name: str) -> tuple[int, ...]:
        """Shape of a core or step result called ``name``; KeyError if there is none."""
        return self._shapes[name]  # type: ignore[attr-defined]

    @cached_property
    def core_names(self) -> tuple[str, ...]:
        """Core names in declaration order (the order of parameters in exporters)."""
        return tuple(c.name for c in self.cores)

    @cached_property
    def last_use(self) -> dict[str, int]:
        """For every tensor, the index of the last step that reads it (executors free it after that)."""
        last: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            last[step.lhs] = i
            last[step.rhs] = i
        return last

    @property
    def params(self) -> int:
        """Trainable parameters: the sum of core sizes (shared cores counted once)."""
        return sum(c.size for c in self.cores)

    @property
    def dense_params(self) -> int:
        """Parameters of the dense weight this generator replaces (bias not included)."""
        return math.prod(self.weight_shape)

    def step_flops(self, step: Step) -> int:
        """FLOPs of one step: 2 per multiply-add of the contraction plus 1 per output element for the activation."""
        lhs, rhs, out = step.subscripts
        sizes = dict(zip(lhs, self.shape_of(step.lhs)))
        sizes.update(zip(rhs, self.shape_of(step.rhs)))
        out_size = math.prod(sizes[s] for s in out)
        summed = set(lhs) | set(rhs)
        loop = math.prod(sizes[s] for s in summed)
        contraction = 2 * loop if summed - set(out) else loop
        return contraction + (out_size if step.activation != "identity" else 0)

    def report(self) -> GeneratorReport:
        """Parameter counts, compression ratio, FLOPs to generate the weight once, and peak intermediate bytes.

        The peak sums every intermediate alive at once (freed after its last use) plus the dense weight,
        at 4 bytes per element.
        """
        live: dict[str, int] = {}
        peak = 0
        flops = 0
        for i, step in enumerate(self.steps):
            live[step.output] = math.prod(self.shape_of(step.output))
            peak = max(peak, sum(live.values()))
            flops += self.step_flops(step)
            for name in (step.lhs, step.rhs):
                if name in live and self.last_use[name] == i:
                    del live[name]
        flops += self.dense_params  # the output scale
        return GeneratorReport(
            family=self.family,
            weight_shape=self.weight_shape,
            params=self.params,
            dense_params=self.dense_params,
            compression_ratio=self.dense_params / self.params,
            generation_flops=flops,
            peak_intermediate_bytes=4 * peak,
            dense_weight_bytes=4 * self.dense_params,
            steps=len(self.steps),
        )

    # ----------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` rebuilds an equal IR."""
        return {
            "format": IR_FORMAT,
            "version": IR_VERSION,
            "family": self.family,
            "weight_shape": list(self.weight_shape),
            "cores": [{"name": c.name, "shape": list(c.shape), "role": c.role} for c in self.cores],
            "steps": [asdict(s) for s in self.steps],
            "output_permutation": list(self.output_permutation),
            "output_scale": self.output_scale,
            "metadata": dict(self.metadata),
        }

    def to_json(self, indent: int | None = None) -> str:
        """The IR as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    def to_compact_json(self) -> str:
        """The IR as compact JSON (version 2): cores as ``[name, shape, role]``, steps as ``[equation, lhs,
        rhs, output, activation]``, no spaces. About half the bytes of :meth:`to_json`; what ONNX files
        store in their ``program`` attribute. :meth:`from_json` reads both forms."""
        data = self.to_dict()
        data["version"] = COMPACT_IR_VERSION
        data["cores"] = [[c.name, list(c.shape), c.role] for c in self.cores]
        data["steps"] = [[s.equation, s.lhs, s.rhs, s.output, s.activation] for s in self.steps]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GeneratorIR":
        """Rebuild an IR from :meth:`to_dict` output.

        Raises:
            GeneratorError: wrong format tag, a newer version than this package reads, missing fields, or
                a program that fails validation.
        """
        if not isinstance(data, Mapping) or data.get("format") != IR_FORMAT:
            raise GeneratorError(f"not an ADNTN generator IR (expected format {IR_FORMAT!r})")
        version = data.get("version")
        if type(version) is not int:
            raise GeneratorError(f"generator IR version must be an integer, got {str(version)[:20]}")
        if not 1 <= version <= COMPACT_IR_VERSION:
            raise GeneratorError(
                f"generator IR version {str(version)[:20]} is not supported (this adntn-deploy reads "
                f"1..{COMPACT_IR_VERSION}); upgrade adntn-deploy"
            )
        try:
            cores, steps, metadata = data["cores"], data["steps"], data.get("metadata", {})
            if version == COMPACT_IR_VERSION:
                cores, steps = _expand_compact(cores, steps)
            if not isinstance(cores, list) or not isinstance(steps, list) or not isinstance(metadata, Mapping):
                raise TypeError("'cores' and 'steps' must be lists, 'metadata' an object")
            if not all(isinstance(c, Mapping) for c in cores) or not all(isinstance(s, Mapping) for s in steps):
                raise TypeError("every core and step must be an object")
            return cls(
                family=str(data["family"]),
                weight_shape=_int_tuple(data["weight_shape"], "weight_shape"),
                cores=tuple(Core(str(c["name"]), _int_tuple(c["shape"], "core shape"), str(c["role"])) for c in cores),
                steps=tuple(Step(**{str(k): str(v) for k, v in s.items()}) for s in steps),
                output_permutation=_int_tuple(data["output_permutation"], "output_permutation"),
                output_scale=_finite_float(data["output_scale"]),
                metadata=dict(metadata),
            )
        except GeneratorError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise GeneratorError(f"generator IR is missing or has a malformed field: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> "GeneratorIR":
        """Parse :meth:`to_json` output (str or UTF-8 bytes).

        Raises:
            GeneratorError: not UTF-8, malformed JSON, JSON nested deeper than 64 levels, or an invalid IR
                (see :meth:`from_dict`).
        """
        from adntn_deploy.safejson import loads_bounded

        try:
            data = loads_bounded(text, what="generator IR")
        except GeneratorError:
            raise
        except AdntnError as exc:  # safejson's JsonLimitError: reported as the IR's own error, same message
            raise GeneratorError(str(exc)) from None
        except ValueError as exc:  # json's own limits, e.g. an integer of more than 4,300 digits
            raise GeneratorError(f"generator IR is not valid JSON: {str(exc)[:120]}") from None
        return cls.from_dict(data)


def _expand_compact(cores: Any, steps: Any) -> tuple[list, list]:
    """Cores and steps of the compact form (arrays) as the objects of version 1.

    Raises:
        TypeError: an entry that is not an array of the right length.
    """
    if not isinstance(cores, list) or not isinstance(steps, list):
        raise TypeError("'cores' and 'steps' must be lists")
    if not all(isinstance(c, list) and len(c) == 3 for c in cores):
        raise TypeError("every compact core must be [name, shape, role]")
    if not all(isinstance(s, list) and len(s) == 5 for s in steps):
        raise TypeError("every compact step must be [equation, lhs, rhs, output, activation]")
    fields = ("equation", "lhs", "rhs", "output", "activation")
    return ([{"name": c[0], "shape": c[1], "role": c[2]} for c in cores], [dict(zip(fields, s)) for s in steps])


def _int_tuple(value: Any, field: str) -> tuple[int, ...]:
    """``value`` as a tuple of ints: a JSON list of integers (not booleans, floats or strings)."""
    if not isinstance(value, (list, tuple)) or not all(type(d) is int for d in value):
        raise TypeError(f"{field} must be a list of integers, got {str(value)[:60]}")
    return tuple(value)


def _finite_float(value: Any) -> float:
    """A JSON number as float (validation rejects non-finite values later); strings and booleans refused."""
    if type(value) not in (int, float):
        raise TypeError(f"output_scale must be a number, got {str(value)[:60]}")
    return float(value)
