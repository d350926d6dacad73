"""Adaptive average pools exported as one matrix product instead of torch's decomposition.

torch's ONNX exporter writes ``nn.AdaptiveAvgPool2d`` as an AveragePool when the input size divides by the
output size, and otherwise as ~30 nodes: a Transpose, a GatherND of every window, Wheres that mask the
short windows, one Gather and Add per window tap and a Div. The zoo's alexnet (7x7 -> 4x4) spent 10% of
its TVM time there (1.4 ms of 14 ms at batch 32; ONNX Runtime pays for the same nodes).

An adaptive average pool is linear in its input: ``y[n, c, :] = x[n, c, :] @ P`` over the flattened
spatial axes, where ``P[(r, s), (i, j)]`` is 1 / (window size) when input pixel (r, s) lies in output
pixel (i, j)'s window (torch's windows: rows ``floor(i * H / OH)`` to ``ceil((i + 1) * H / OH)``). The
export therefore swaps such pools for :class:`AdaptiveAvgPoolAsMatMul`: Reshape, one MatMul by the
constant ``P`` (an initializer), Reshape. ONNX Runtime runs it as one GEMM; TVM runs the (batched)
MatMul on its generic schedule (0.08 ms for the zoo alexnet at batch 32). Pools whose sizes divide, and those whose ``P`` would exceed
:data:`MAX_POOL_MATRIX_BYTES`, export as before.
"""

from __future__ import annotations

import numpy as np

#: the largest pooling matrix (bytes of float32) exported; a bigger one keeps torch's decomposition
MAX_POOL_MATRIX_BYTES = 4 << 20


def _windows(size: int, out: int) -> list[tuple[int, int]]:
    """torch's adaptive pooling windows [start, stop) of an axis of ``size`` pooled to ``out``."""
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def pool_matrix(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """The (H * W, OH * OW) float32 matrix ``P`` with ``flatten(x) @ P == adaptive_avg_pool2d(x, out_hw)``."""
    (h, w), (oh, ow) = in_hw, out_hw
    matrix = np.zeros((h, w, oh, ow), np.float32)
    for i, (r0, r1) in enumerate(_windows(h, oh)):
        for j, (s0, s1) in enumerate(_windows(w, ow)):
            matrix[r0:r1, s0:s1, i, j] = 1.0 / ((r1 - r0) * (s1 - s0))
    return matrix.reshape(h * w, oh * ow)


def _output_size(pool, in_hw: tuple[int, int]) -> tuple[int, int]:
    size = pool.output_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return tuple(in_hw[k] if size[k] is None else int(size[k]) for k in range(2))


def _make_module_class():
    import torch
    from torch import nn

    class AdaptiveAvgPoolAsMatMul(nn.Module):
        """``nn.AdaptiveAvgPool2d`` computed as ``flatten(x) @ P`` when the input size does not divide by
        the output size (see the module doc); otherwise, or for a ``P`` over the size limit, the pool."""

        def __init__(self, pool: nn.AdaptiveAvgPool2d):
            super().__init__()
            self.pool = pool

        def forward(self, x):
            in_hw = (int(x.shape[-2]), int(x.shape[-1]))
            out_hw = _output_size(self.pool, in_hw)
            divides = in_hw[0] % out_hw[0] == 0 and in_hw[1] % out_hw[1] == 0
            if divides or in_hw[0] * in_hw[1] * out_hw[0] * out_hw[1] * 4 > MAX_POOL_MATRIX_BYTES:
                return self.pool(x)
            matrix = torch.from_numpy(pool_matrix(in_hw, out_hw)).to(x.dtype)
            return (x.flatten(-2) @ matrix).unflatten(-1, out_hw)

    return AdaptiveAvgPoolAsMatMul


def swap_adaptive_pools(model) -> int:
    """Wrap every ``nn.AdaptiveAvgPool2d`` of ``model`` (changed in place: pass the export's copy) so that it
    exports as a matrix product when its sizes do not divide. Returns how many pools were wrapped."""
    from torch import nn

    wrapper = _make_module_class()
    pools = [(name, module) for name, module in model.named_modules() if name and type(module) is nn.AdaptiveAvgPool2d]
    for name, pool in pools:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper(pool))
    return len(pools)
