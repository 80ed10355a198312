"""Sparse-kernel layers and `sparsify_`, which swaps them in for weight-pruned nn.Linear / nn.Conv2d.

Lowering onto the SpMM kernel (kernels.sparse_matmul), Y = X @ W^T:
- Linear: X is the input with its leading dims flattened.
- 1x1 conv (stride 1, no padding): X is the (batch * H * W, C) pixel matrix, a view of a channels-last input.
- any other conv: implicit GEMM (kernels.sparse_conv2d), the kernel gathering each patch tile from the input
  image itself; no im2col matrix in memory.
Convolution outputs come back as an NCHW-shaped view of channels-last memory, so the next conv reads them
without a copy. Grouped and depthwise convolutions stay dense.

On CPU the layers run the torch reference (or the interpreted kernel under TRITON_INTERPRET=1): they
reproduce the dense pruned model's outputs but are not faster there.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import KernelConfigError
from .sparse_conv2d import conv_weight_matrix, sparse_conv2d_op
from .sparse_format import BLOCK_NS, ENCODINGS, TILE_K, VALUE_DTYPES, TiledSparseWeight
from .sparse_matmul import sparse_matmul_op

_FORMAT_BUFFERS = ("values", "offsets", "pattern", "columns")


class _SparseLayer(nn.Module):
    """Holds a TiledSparseWeight as buffers (so .to() moves and casts it) plus an optional bias."""

    def __init__(self, weight: TiledSparseWeight, bias: Tensor | None, relu: bool) -> None:
        super().__init__()
        for name, tensor in zip(_FORMAT_BUFFERS, weight.tensors(), strict=True):
            self.register_buffer(name, tensor)
        self.register_buffer("bias", None if bias is None else bias.detach().to(weight.dtype))
        self.weight_shape, self.block_n, self.encoding, self.relu = weight.shape, weight.block_n, weight.encoding, relu

    @property
    def sparse_weight(self) -> TiledSparseWeight:
        return TiledSparseWeight(self.weight_shape, self.block_n, TILE_K, self.encoding,  # type: ignore[arg-type]
                                 *(getattr(self, name) for name in _FORMAT_BUFFERS))

    def _matmul(self, x2d: Tensor) -> Tensor:
        """relu?(x2d @ W^T + bias) computed in the stored dtype, returned in x2d's dtype."""
        # The op straight from the buffers: batch-1 latency pays every microsecond of Python per layer.
        y = sparse_matmul_op(x2d.to(self.values.dtype), self.values, self.offsets, self.pattern, self.columns,
                             self.bias, *self.weight_shape, self.block_n, TILE_K, self.encoding, self.relu, "auto")
        return y.to(x2d.dtype)

    def extra_repr(self) -> str:
        w = self.sparse_weight
        return (f"sparsity={w.sparsity:.3f}, encoding={w.encoding}, block_n={w.block_n}, dtype={w.dtype}, "
                f"bias={self.bias is not None}, relu={self.relu}")


class SparseLinear(_SparseLayer):
    """nn.Linear with its weight in the tiled sparse format; optionally fuses a following ReLU."""

    def __init__(self, weight: TiledSparseWeight, bias: Tensor | None = None, relu: bool = False) -> None:
        super().__init__(weight, bias, relu)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_n: int = 64, encoding: str = "auto",
                    dtype: torch.dtype | None = None, relu: bool = False) -> SparseLinear:
        weight = TiledSparseWeight.from_dense(linear.weight.detach().to(dtype or linear.weight.dtype),
                                              block_n, encoding)
        return cls(weight, linear.bias, relu)

    def forward(self, x: Tensor) -> Tensor:
        return self._matmul(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)


class SparseConv2d(_SparseLayer):
    """nn.Conv2d (groups=1, zero padding) as SpMM: 1x1 directly over pixels, others as implicit GEMM.

    The weight is stored tap-major (kernels.sparse_conv2d.conv_weight_matrix), channel fastest.
    """

    def __init__(self, weight: TiledSparseWeight, bias: Tensor | None, in_channels: int,
                 kernel_size: tuple[int, int], stride: tuple[int, int] = (1, 1),
                 padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1),
                 relu: bool = False) -> None:
        if weight.shape[1] != in_channels * kernel_size[0] * kernel_size[1]:
            raise ValueError(f"a {weight.shape} weight does not match {in_channels} channels x {kernel_size}")
        super().__init__(weight, bias, relu)
        self.out_channels, self.in_channels = weight.shape[0], in_channels
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, block_n: int = 64, encoding: str = "auto",
                  dtype: torch.dtype | None = None, relu: bool = False) -> SparseConv2d:
        reason = dense_reason(conv)
        if reason is not None:
            raise ValueError(f"cannot lower this conv to SpMM: {reason}")
        w2d = conv_weight_matrix(conv.weight.detach())
        weight = TiledSparseWeight.from_dense(w2d.to(dtype or w2d.dtype), block_n, encoding)
        return cls(weight, conv.bias, conv.in_channels, conv.kernel_size, conv.stride,  # type: ignore[arg-type]
                   conv.padding, conv.dilation, relu)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (N, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        if self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0):
            batch, _, height, width = x.shape
            cols = x.permute(0, 2, 3, 1).reshape(-1, self.in_channels)  # a view for channels-last input
            return self._matmul(cols).view(batch, height, width, self.out_channels).permute(0, 3, 1, 2)
        y = sparse_conv2d_op(x.to(self.values.dtype), self.values, self.offsets, self.pattern, self.columns,
                             self.bias, *self.weight_shape, self.block_n, TILE_K, self.encoding,
                             list(self.kernel_size), list(self.stride), list(self.padding), list(self.dilation),
                             self.relu, "auto")
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, {super().extra_repr()}")


def dense_reason(conv: nn.Conv2d) -> str | None:
    """Why a conv cannot become a SparseConv2d, or None if it can."""
    if conv.groups != 1:
        return "grouped conv"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    return None


# ------------------------------------------------------------------------------------------- sparsify_
@dataclass(frozen=True)
class SparsifyConfig:
    """Which weight-pruned layers `sparsify_` swaps for sparse-kernel layers.

    min_sparsity: layers with a smaller fraction of zero weights stay dense.
    measure: on CUDA, time each candidate (dense vs sparse) on a forward pass at batch_size x input_size
        and keep it dense unless sparse_ms < speedup_margin * dense_ms. Ignored on CPU.
    dtype: dtype of the stored values (and of the kernel's inputs); None keeps each layer's own dtype.
    block_n, encoding: the tiled format's rows per tile and encoding ("auto" picks the smaller).
    """

    min_sparsity: float = 0.5
    batch_size: int = 1
    measure: bool = True
    dtype: torch.dtype | None = None
    speedup_margin: float = 0.9
    input_size: tuple[int, int, int] = (3, 32, 32)
    block_n: int = 64
    encoding: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_sparsity <= 1.0:
            raise KernelConfigError(f"min_sparsity must be in [0, 1], got {self.min_sparsity}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise KernelConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.dtype is not None and self.dtype not in VALUE_DTYPES:
            raise KernelConfigError(f"dtype must be None or one of {VALUE_DTYPES}, got {self.dtype}")
        if not self.speedup_margin > 0:
            raise KernelConfigError(f"speedup_margin must be > 0 (0.9: sparse must be 10% faster), "
                              f"got {self.speedup_margin}")
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise KernelConfigError(f"input_size must be (C, H, W) with positive sizes, got {self.input_size}")
        object.__setattr__(self, "input_size", tuple(int(s) for s in self.input_size))
        if self.block_n not in BLOCK_NS:
            raise KernelConfigError(f"block_n must be one of {BLOCK_NS}, got {self.block_n}")
        if self.encoding not in (*ENCODINGS, "auto"):
            raise KernelConfigError(f"encoding must be 'auto' or one of {ENCODINGS}, got {self.encoding!r}")


def sparsify_(model: nn.Module, config: SparsifyConfig | None = None) -> None:
    """Replace weight-pruned nn.Linear / nn.Conv2d in `model` by SparseLinear / SparseConv2d, in place.

    A layer stays dense when it is a grouped conv, when its sparsity is below config.min_sparsity, or (on
    CUDA, with config.measure) when the sparse layer is not faster than config.speedup_margin x the dense
    one. The per-layer choice and its reason are kept for `sparsify_report(model)`. Only exact nn.Linear
    and nn.Conv2d are considered: subclasses (e.g. MultiheadAttention's out_proj) may read .weight directly.
    """
    config = config or SparsifyConfig()
    candidates = [(name, m) for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    if any(m is model for _, m in candidates):
        raise KernelConfigError("sparsify_ swaps submodules in place: wrap a single layer in nn.Sequential first")
    shapes = _input_shapes(model, [m for _, m in candidates], config) if _measuring(model, config) else None
    report = []
    for name, layer in candidates:
        weight = layer.weight.detach()
        row = {"layer": name, "kind": "conv" if isinstance(layer, nn.Conv2d) else "linear",
               "shape": list(weight.shape), "sparsity": 1.0 - int(torch.count_nonzero(weight)) / weight.numel(),
               "choice": "dense", "reason": "", "dense_ms": None, "sparse_ms": None}
        report.append(row)
        sparse = _choose(row, layer, config, shapes)
        if sparse is not None:
            row["choice"] = "sparse"
            _replace(model, name, sparse)
    model._sparsify_report = report


def _choose(row: dict[str, Any], layer: nn.Module, config: SparsifyConfig,
            shapes: dict[str, tuple[int, ...]] | None) -> _SparseLayer | None:
    """The sparse replacement of `layer`, or None to keep it dense; fills row's reason (and timings)."""
    reason = dense_reason(layer) if isinstance(layer, nn.Conv2d) else None
    if reason is not None:
        row["reason"] = reason
        return None
    if row["sparsity"] < config.min_sparsity:
        row["reason"] = f"sparsity {row['sparsity']:.1%} < min_sparsity {config.min_sparsity:.1%}"
        return None
    if shapes is None:
        why = "measure=False" if not config.measure else layer.weight.device.type
        row["reason"] = f"sparsity {row['sparsity']:.1%} >= {config.min_sparsity:.1%}; not timed ({why})"
        return _convert(layer, config)
    if row["layer"] not in shapes:
        row["reason"] = f"not reached by a forward pass at input_size {config.input_size}"
        return None
    sparse = _convert(layer, config)
    x = torch.randn(shapes[row["layer"]], device=layer.weight.device, dtype=layer.weight.dtype)
    row["dense_ms"], row["sparse_ms"] = _median_ms(layer, x), _median_ms(sparse, x)
    faster = row["sparse_ms"] < config.speedup_margin * row["dense_ms"]
    row["reason"] = (f"sparse {row['sparse_ms']:.4f} ms vs dense {row['dense_ms']:.4f} ms at batch "
                     f"{config.batch_size} ({'<' if faster else 'not <'} {config.speedup_margin}x dense)")
    return sparse if faster else None


def sparsify_report(model: nn.Module) -> list[dict[str, Any]]:
    """Per candidate layer of the last `sparsify_(model, ...)`: layer, kind, shape, sparsity, choice,
    reason, dense_ms, sparse_ms (None unless timed). Empty if the model was never sparsified."""
    return [dict(row) for row in getattr(model, "_sparsify_report", [])]


def _convert(layer: nn.Module, config: SparsifyConfig) -> _SparseLayer:
    if isinstance(layer, nn.Conv2d):
        return SparseConv2d.from_conv(layer, config.block_n, config.encoding, config.dtype)
    return SparseLinear.from_linear(layer, config.block_n, config.encoding, config.dtype)  # type: ignore[arg-type]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    new.train(model.get_submodule(name).training)
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _measuring(model: nn.Module, config: SparsifyConfig) -> bool:
    first = next(model.parameters(), None)
    return config.measure and first is not None and first.is_cuda


@torch.no_grad()
def _input_shapes(model: nn.Module, layers: list[nn.Module], config: SparsifyConfig) -> dict[str, tuple[int, ...]]:
    """Input shape of each layer in one eval-mode forward pass at (batch_size, *input_size)."""
    names = {id(m): name for name, m in model.named_modules()}
    shapes: dict[str, tuple[int, ...]] = {}

    def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        shapes.setdefault(names[id(module)], tuple(args[0].shape))

    hooks = [m.register_forward_pre_hook(record) for m in layers]
    modes = {m: m.training for m in model.modules()}
    first = next(model.parameters())
    try:
        model.eval()  # no BatchNorm statistics updated by a dummy batch
        model(torch.zeros(config.batch_size, *config.input_size, device=first.device, dtype=first.dtype))
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return shapes


@torch.no_grad()
def _median_ms(fn: Callable[[Tensor], Any], x: Tensor, warmup: int = 10, reps: int = 30) -> float:
    """Median CUDA-event time of fn(x) in milliseconds (warm-up includes Triton's compile and autotune)."""
    for _ in range(warmup):
        fn(x)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn(x)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


__all__ = ["SparseConv2d", "SparseLinear", "SparsifyConfig", "dense_reason", "sparsify_", "sparsify_report"]
