"""What the SpMM kernel accepts: the backends, the convolution geometry it lowers, and the input checks that
turn anything else into a real exception before a kernel launches."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .sparse_format import TiledSparseWeight

BACKENDS = ("auto", "triton", "torch")


class ConvGeometry(NamedTuple):
    """A 2-D convolution run by the kernel as an implicit GEMM (its CONV switch); all pairs are (h, w)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1  # type: ignore[return-value]
                     for size, k, s, p, d in zip((height, width), *self, strict=True))


def rows(x: Tensor, conv: ConvGeometry | None) -> int:
    """M: rows of X, i.e. output pixels (batch x OH x OW) for a convolution."""
    if conv is None:
        return x.shape[0]
    oh, ow = conv.output_size(*x.shape[2:])
    return x.shape[0] * oh * ow


def check_inputs(x: Tensor, weight: TiledSparseWeight, bias: Tensor | None, backend: str,
                  conv: ConvGeometry | None = None) -> None:
    """Raise ValueError/TypeError for inputs the kernel cannot take (shape, dtype, device, backend)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if conv is None and (x.dim() != 2 or x.shape[1] != weight.shape[1]):
        raise ValueError(f"x must be (M, {weight.shape[1]}) for a {weight.shape} weight, got {tuple(x.shape)}")
    if conv is not None:
        taps = conv.kernel_size[0] * conv.kernel_size[1]
        if x.dim() != 4 or x.shape[1] * taps != weight.shape[1]:
            raise ValueError(f"x must be (N, {weight.shape[1] // taps}, H, W) for a {weight.shape} weight and a "
                             f"{conv.kernel_size} kernel, got {tuple(x.shape)}")
        if min(conv.output_size(*x.shape[2:])) < 1:
            raise ValueError(f"a {tuple(x.shape[2:])} input is smaller than the {conv.kernel_size} kernel's window")
    if x.dtype != weight.dtype:
        raise TypeError(f"x dtype {x.dtype} differs from the weight's {weight.dtype}; cast one of them")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from x's {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    if backend == "triton" and x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"backend='triton' runs on CUDA (compiled) or CPU (interpreted), not {x.device.type}")
    if backend == "triton" and x.device.type == "cpu" and not interpretable(x.dtype):
        raise ValueError("Triton's CPU interpreter computes bfloat16 tl.dot wrongly: use float16/float32 on CPU, "
                         "or backend='torch'")


def interpretable(dtype: torch.dtype) -> bool:
    """Triton's interpreter (3.8) multiplies bfloat16 dot operands as raw integers."""
    return dtype != torch.bfloat16
