"""GeneratedWeight: a torch module holding a generator's cores and producing its weight."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from adntn_deploy.generators import GeneratorSpec, build_generator
from adntn_deploy.ir.executors import generate_torch
from adntn_deploy.ir.program import GeneratorError, GeneratorIR, GeneratorReport


def _param_key(core_name: str) -> str:
    # ParameterDict keys may not contain '.', core names do
    return core_name.replace(".", "__")


class GeneratedWeight(nn.Module):
    """Cores of one generator as parameters; calling the module returns the generated weight.

    In training mode the weight is generated on every call (so gradients reach the cores). Otherwise,
    when no gradient is needed, the weight is generated once and cached until a core changes (tracked
    through the cores' in-place version counters, device and dtype).
    """

    def __init__(self, ir: GeneratorIR, cores: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.ir = ir
        self.cores = nn.ParameterDict()
        for core in ir.cores:
            value = cores[core.name] if cores is not None else np.zeros(core.shape)
            tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
            self.cores[_param_key(core.name)] = nn.Parameter(tensor.to(dtype).clone())
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple | None = None

    @classmethod
    def from_spec(cls, spec: GeneratorSpec, weight_shape: Sequence[int]) -> "GeneratedWeight":
        """Build and initialise a generator for ``weight_shape`` (see :func:`build_generator`).

        ``spec.seed=None`` draws the seed from torch's global RNG (``torch.manual_seed`` decides, and two
        layers of one shape start different); the drawn seed is recorded in the IR's spec.
        """
        if spec.seed is None:
            spec = spec.with_options(seed=int(torch.randint(0, 2**31 - 1, ()).item()))
        generator = build_generator(spec, weight_shape)
        return cls(generator.ir, generator.cores)

    def core_tensors(self) -> dict[str, torch.Tensor]:
        """Cores keyed by their IR names."""
        return {name: self.cores[_param_key(name)] for name in self.ir.core_names}

    def _key(self) -> tuple:
        return tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in self.cores.values())

    def forward(self) -> torch.Tensor:
        """The weight, shape ``ir.weight_shape``, in the cores' dtype and device."""
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.cores.values())
        if self.training and needs_grad:
            self._cache = None
            return generate_torch(self.ir, self.core_tensors())
        if needs_grad:  # eval mode but someone differentiates: never hand out a detached cache
            return generate_torch(self.ir, self.core_tensors())
        key = self._key()
        if self._cache is None or self._cache_key != key:
            # inference_mode(False): a cache made inside inference mode could not be used by autograd later
            with torch.inference_mode(False), torch.no_grad():
                self._cache = self.generate_precise()
            self._cache_key = key
        return self._cache

    def generate_precise(self) -> torch.Tensor:
        """The weight generated with float64 intermediates (no autograd): what inference and export use."""
        with torch.no_grad():
            return generate_torch(self.ir, self.core_tensors(), precise=True)

    def use_program(self, ir: GeneratorIR) -> None:
        """Adopt ``ir`` (same cores, e.g. a stored program with its own output scale) and drop the cached weight.

        Raises:
            GeneratorError: ``ir`` names other cores or other core shapes than this module holds.
        """
        if {c.name: c.shape for c in ir.cores} != {c.name: c.shape for c in self.ir.cores}:
            raise GeneratorError("the new generator program has other cores than this layer")
        self.ir, self._cache, self._cache_key = ir, None, None

    def report(self) -> GeneratorReport:
        """Parameter counts, compression ratio and generation costs of this generator."""
        return self.ir.report()

    def extra_repr(self) -> str:
        r = self.ir.report()
        return f"family={r.family}, weight_shape={r.weight_shape}, params={r.params}, ratio={r.compression_ratio:.1f}x"
