"""Torch layers whose weights come from TTN / aTTN / MERA generators.

The public names ``ADNTNLinear``, ``ADNTNConv2d`` and ``ADNTNMultiheadAttention`` are stable API. Every
layer exposes ``layer.generator`` (the IR, with ``.report()``) and ``layer.weight`` (the generated weight).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adntn_deploy.generators import GeneratorSpec
from adntn_deploy.ir.program import GeneratorError, GeneratorIR
from adntn_deploy.nn.generated import GeneratedWeight


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) for v in pair):
        raise GeneratorError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _spec(family: str, bond_dim: Any, activation: Any, spec_options: dict[str, Any]) -> GeneratorSpec:
    return GeneratorSpec(family=family, bond_dim=bond_dim, activation=activation, **spec_options)


class _GeneratedLayer(nn.Module):
    weight_generator: GeneratedWeight

    @property
    def generator(self) -> GeneratorIR:
        """The generator IR of this layer's weight (``.report()`` gives params, ratio, FLOPs)."""
        return self.weight_generator.ir

    @property
    def weight(self) -> torch.Tensor:
        """The generated weight (cached outside training while the cores do not change)."""
        return self.weight_generator()

    def _init_bias(self, bias: bool, fan_in: int, size: int) -> None:
        if bias:
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            self.bias = nn.Parameter(torch.empty(size).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)


class ADNTNLinear(_GeneratedLayer):
    """``y = x W^T + b`` with ``W`` (out_features, in_features) generated from small cores.

    Args:
        in_features, out_features: sizes as in ``torch.nn.Linear``.
        family: "ttn", "attn" or "mera".
        bond_dim: bond dimension (int, or per level from the leaves up).
        activation: activation after each level below the top.
        bias: add a dense bias (counted separately from the generator's parameters).
        generator: a prebuilt IR (e.g. from a checkpoint); the cores then start at zero until loaded.
        **spec_options: further :class:`GeneratorSpec` fields (out_modes, in_modes, share, mixing, seed, ...).

    Raises:
        GeneratorError: an invalid generator configuration, with the reason.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        family: str = "ttn",
        bond_dim: int | tuple[int, ...] = 4,
        activation: str | tuple[str, ...] = "tanh",
        bias: bool = True,
        generator: GeneratorIR | None = None,
        **spec_options: Any,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        shape = (self.out_features, self.in_features)
        if generator is not None:
            if generator.weight_shape != shape:
                raise GeneratorError(f"generator makes a {generator.weight_shape} weight, this layer needs {shape}")
            self.weight_generator = GeneratedWeight(generator)
        else:
            self.weight_generator = GeneratedWeight.from_spec(_spec(family, bond_dim, activation, spec_options), shape)
        self._init_bias(bias, self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` holding the generated weight (a copy; the cores are not touched)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(self.weight_generator.generate_precise())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class ADNTNConv2d(_GeneratedLayer):
    """A 2-D convolution whose (Cout, Cin/groups, kh, kw) weight is generated; arguments as ``torch.nn.Conv2d``.

    The input dimension that is tensorised is Cin/groups * kh * kw (kernel axes become their own modes).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        family: str = "ttn",
        bond_dim: int | tuple[int, ...] = 4,
        activation: str | tuple[str, ...] = "tanh",
        generator: GeneratorIR | None = None,
        **spec_options: Any,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise GeneratorError(f"in_channels {in_channels} and out_channels {out_channels} must divide by groups {groups}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = padding if isinstance(padding, str) else _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.groups = int(groups)
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if generator is not None:
            if generator.weight_shape != shape:
                raise GeneratorError(f"generator makes a {generator.weight_shape} weight, this layer needs {shape}")
            self.weight_generator = GeneratedWeight(generator)
        else:
            self.weight_generator = GeneratedWeight.from_spec(_spec(family, bond_dim, activation, spec_options), shape)
        self._init_bias(bias, math.prod(shape[1:]), self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` holding the generated weight (a copy; the cores are not touched)."""
        dense = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, bias=self.bias is not None,
        )
        with torch.no_grad():
            dense.weight.copy_(self.weight_generator.generate_precise())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}"
        )


class ADNTNMultiheadAttention(nn.Module):
    """Multi-head attention whose q, k, v and output projections are generated ``ADNTNLinear`` layers.

    ``forward(query, key=None, value=None, attn_mask=None, is_causal=False)`` takes (batch, seq, embed_dim)
    tensors (batch first) and returns (batch, seq, embed_dim). ``projections`` picks which of "q", "k",
    "v", "out" are generated (the others are dense ``nn.Linear``). Generator options go to every generated
    projection; each gets its own seed offset so they do not start equal.
    """

    PROJECTIONS = ("q", "k", "v", "out")

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        family: str = "ttn",
        bond_dim: int | tuple[int, ...] = 4,
        activation: str | tuple[str, ...] = "tanh",
        bias: bool = True,
        projections: tuple[str, ...] = PROJECTIONS,
        dropout: float = 0.0,
        **spec_options: Any,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise GeneratorError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        unknown = set(projections) - set(self.PROJECTIONS)
        if unknown:
            raise GeneratorError(f"unknown projection(s) {sorted(unknown)}: choose from {self.PROJECTIONS}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        seed = spec_options.pop("seed", None)  # None: each projection draws from torch's global RNG
        for k, name in enumerate(self.PROJECTIONS):
            if name in projections:
                layer: nn.Module = ADNTNLinear(
                    embed_dim, embed_dim, family, bond_dim, activation, bias,
                    seed=None if seed is None else int(seed) + k, **spec_options
                )
            else:
                layer = nn.Linear(embed_dim, embed_dim, bias=bias)
            setattr(self, f"{name}_proj", layer)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.embed_dim // self.num_heads).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        key = query if key is None else key
        value = key if value is None else value
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        b, _, s, _ = attn.shape
        return self.out_proj(attn.transpose(1, 2).reshape(b, s, self.embed_dim))
