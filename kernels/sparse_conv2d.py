"""relu?(conv2d(x, W) + bias) with W in the tiled sparse format: the SpMM kernel as an implicit GEMM.

W is the (out_channels, kh * kw * in_channels) matrix of `conv_weight_matrix`, tap-major (channel fastest), so
one 32-column weight tile meets 32 consecutive channels of one input pixel: a contiguous read of a
channels-last image. The kernel (kernels.sparse_matmul, switch CONV) gathers each X tile straight from the
image, zero padding by masking; no im2col matrix is written. Output rows are output pixels, so Y comes back
as an NCHW-shaped view of channels-last memory, which the next layer reads without a copy.

Registered as the custom op ``kdexport::sparse_conv2d`` (with a fake implementation, for torch.compile), beside
``sparse_conv2d_ref``: decode W, then F.conv2d. Dispatch is sparse_matmul's (CUDA: compiled; CPU: the
reference, or the interpreted kernel under TRITON_INTERPRET=1). Groups must be 1; inference only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import sparse_matmul as _sm  # one launcher for both ops (and one place for tests to watch it)
from .sparse_format import TiledSparseWeight
from .sparse_matmul import ConvGeometry


def conv_weight_matrix(weight: Tensor) -> Tensor:
    """(O, C, kh, kw) conv weight -> the (O, kh * kw * C) matrix the kernel expects, channel fastest."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _geometry(kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int]) -> ConvGeometry:
    pairs = [tuple(v) for v in (kernel_size, stride, padding, dilation)]
    if any(len(p) != 2 for p in pairs):
        raise ValueError("kernel_size, stride, padding and dilation must each be two ints (h, w)")
    geometry = ConvGeometry(*pairs)  # type: ignore[arg-type]
    if min(*geometry.kernel_size, *geometry.stride, *geometry.dilation) < 1 or min(geometry.padding) < 0:
        raise ValueError(f"kernel_size, stride and dilation must be >= 1 and padding >= 0, got {geometry}")
    return geometry


def _output(x: Tensor, out_channels: int, geometry: ConvGeometry) -> Tensor:
    """An empty (N, O, OH, OW) output in channels-last memory, the layout the kernel writes."""
    return torch.empty((x.shape[0], out_channels, *geometry.output_size(*x.shape[2:])), dtype=x.dtype,
                       device=x.device, memory_format=torch.channels_last)


@torch.library.custom_op("kdexport::sparse_conv2d", mutates_args=())
def sparse_conv2d_op(x: Tensor, values: Tensor, offsets: Tensor, pattern: Tensor, columns: Tensor,
                     bias: Tensor | None, out_channels: int, in_features: int, block_n: int, block_k: int,
                     encoding: str, kernel_size: list[int], stride: list[int], padding: list[int],
                     dilation: list[int], relu: bool, backend: str) -> Tensor:
    """The registered op on the format's raw tensors (see `sparse_conv2d` for the friendly signature)."""
    weight = TiledSparseWeight((out_channels, in_features), block_n, block_k, encoding,  # type: ignore[arg-type]
                               values, offsets, pattern, columns)
    geometry = _geometry(kernel_size, stride, padding, dilation)
    _sm.check_inputs(x, weight, bias, backend, geometry)
    if x.shape[0] == 0:
        return _output(x, out_channels, geometry)
    if _sm._use_triton(x, backend):
        y = _sm._launch_triton(x, weight, bias, relu, conv=geometry)
        batch, (oh, ow) = x.shape[0], geometry.output_size(*x.shape[2:])
        return y.view(batch, oh, ow, out_channels).permute(0, 3, 1, 2)
    return sparse_conv2d_ref(x, weight, bias, geometry, relu).contiguous(memory_format=torch.channels_last)


@sparse_conv2d_op.register_fake
def _(x, values, offsets, pattern, columns, bias, out_channels, in_features, block_n, block_k, encoding,
      kernel_size, stride, padding, dilation, relu, backend):
    weight = TiledSparseWeight((out_channels, in_features), block_n, block_k, encoding,
                               values, offsets, pattern, columns)
    geometry = _geometry(kernel_size, stride, padding, dilation)
    _sm.check_inputs(x, weight, bias, backend, geometry)
    return _output(x, out_channels, geometry)


def sparse_conv2d(x: Tensor, weight: TiledSparseWeight, bias: Tensor | None = None, *,
                  kernel_size: tuple[int, int], stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                  dilation: tuple[int, int] = (1, 1), relu: bool = False, backend: str = "auto") -> Tensor:
    """relu?(conv2d(x, W) + bias) for x of shape (N, C, H, W); W from `conv_weight_matrix`, tiled.

    backend: as for `sparse_matmul` ("auto", "triton" or "torch").
    """
    if not isinstance(weight, TiledSparseWeight):
        raise TypeError(f"weight must be a TiledSparseWeight, got {type(weight).__name__}")
    return sparse_conv2d_op(x, *weight.tensors(), bias, weight.shape[0], weight.shape[1], weight.block_n,
                            weight.block_k, weight.encoding, list(kernel_size), list(stride), list(padding),
                            list(dilation), relu, backend)


def sparse_conv2d_ref(x: Tensor, weight: TiledSparseWeight, bias: Tensor | None, geometry: ConvGeometry,
                      relu: bool = False) -> Tensor:
    """Plain torch: decode W back to (O, C, kh, kw), then F.conv2d (+ ReLU). Oracle and CPU fallback."""
    (kh, kw), out_channels = geometry.kernel_size, weight.shape[0]
    dense = weight.to_dense().view(out_channels, kh, kw, -1).permute(0, 3, 1, 2)
    y = F.conv2d(x, dense, bias, geometry.stride, geometry.padding, geometry.dilation)
    return torch.relu(y) if relu else y


__all__ = ["conv_weight_matrix", "sparse_conv2d", "sparse_conv2d_op", "sparse_conv2d_ref"]
