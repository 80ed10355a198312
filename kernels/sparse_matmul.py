"""Y = X @ W^T (+ bias, optional fused ReLU) with W in the tiled sparse format (sparse_format.py).

Laid out as Triton's matmul tutorial: 1. autotune configs, 2. the kernel, 3. the wrapper, registered as the
custom op ``kdexport::sparse_matmul`` (with a fake implementation, so it composes with torch.compile),
4. ``sparse_matmul_ref``, the plain-torch oracle and CPU fallback.

Each program owns a BLOCK_M x BLOCK_N tile of Y and walks its share of the K tiles: it decodes one weight
tile (BLOCK_N rows x 32 columns) into a dense register tile, bitmap by popcount or uint8 indices by
one-hot selection, and feeds it to ``tl.dot`` with an fp32 accumulator. X rows past M and columns past K
are masked; weight tiles are zero-padded by the format. A single row of X (batch-1 Linear) takes a GEMV
path: BLOCK_M = 1, CUDA-core FMAs instead of tl.dot. When the output tiles alone cannot fill the GPU
(few rows, small out_features), K is split across programs whose fp32 partial sums meet through atomic
adds; the ReLU and the cast to the output dtype then run after the kernel.

Dispatch: CUDA tensors run the compiled kernel; CPU tensors run ``sparse_matmul_ref``, or the kernel in
Triton's interpreter when TRITON_INTERPRET=1 is set or ``backend="triton"`` is passed (not for bfloat16,
whose tl.dot the interpreter gets wrong). A process does one or the other, never both: TRITON_INTERPRET=1
at the moment triton is first imported turns Triton's own library (tl.cdiv, tl.sum, ...) into interpreted
functions, and no kernel that calls them compiles in that process any more. ``triton_mode()`` tells which
way this process went; asking for the other one raises a RuntimeError that says what to set.
Triton is imported on first use only, so ``import kdexport.kernels`` needs neither triton nor a GPU and never
initialises CUDA. Inference only: the op has no autograd formula.
"""

# Annotations stay strings: `tl.constexpr` only resolves once _triton() has bound `tl`.
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .sparse_format import TiledSparseWeight
from .spmm_inputs import BACKENDS, ConvGeometry, check_inputs, interpretable, rows

tl: Any = None  # triton.language, bound by _triton(); the functions below are jitted on first use
libdevice: Any = None  # triton.language.extra.libdevice, likewise

# ----------------------------------------------------------------------------------- 1. autotune configs
# (BLOCK_M, num_warps, num_stages). BLOCK_N x BLOCK_K is fixed by the weight's tiles; the autotuner only
# sees the configs that fit M (_block_m_choices), so each shape benchmarks two or three of them.
GEMM_CONFIGS = ((16, 4, 3), (16, 2, 4), (32, 4, 3), (32, 4, 4), (64, 4, 3), (64, 8, 3), (128, 8, 3))
GEMV_CONFIGS = ((1, 2, 3), (1, 4, 3), (1, 4, 4))
GROUP_M = 8  # programs along M that share weight tiles in L2 (the tutorial's grouped ordering)
MIN_K_TILES_PER_SPLIT = 4  # split-K never leaves a program fewer than 4 x 32 columns of K


def _block_m_choices(m: int) -> tuple[int, ...]:
    """BLOCK_M values worth trying for M rows of X (tl.dot needs >= 16; one row is the GEMV path)."""
    if m == 1:
        return (1,)
    if m <= 16:
        return (16,)
    if m <= 32:
        return (16, 32)
    if m <= 64:
        return (32, 64)
    return (64, 128)


def _prune_configs(configs: Sequence[Any], named_args: dict, **kwargs: Any) -> list[Any]:
    fits = _block_m_choices(named_args["M"])
    return [c for c in configs if c.kwargs["BLOCK_M"] in fits]


# ----------------------------------------------------------------------------------------- 2. the kernel
# Not decorated with @triton.jit, which would import triton with this module: _compiled_kernels() and
# _interpreted_kernel() wrap it on first use.
def _sparse_matmul_kernel(
    # pointers
    x_ptr, values_ptr, offsets_ptr, pattern_ptr, columns_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K,
    # strides (conv: stride_xm, stride_xk are the image and channel strides of the 4-D input)
    stride_xm, stride_xk, stride_ym, stride_yn,
    # conv geometry: input channels and size, output size, input row and column strides (unused for SpMM)
    C, H, W, OH, OW, stride_xh, stride_xw,
    # blocks and switches
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, BITMAP: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    POPCOUNT: tl.constexpr, PRECISION: tl.constexpr,
    CONV: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
    PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
):
    """Y[M, N] (+)= X[M, K] @ W[N, K]^T for one (BLOCK_M x BLOCK_N) output tile and one K split.

    BLOCK_N x BLOCK_K is the weight's tile; BITMAP picks the decoder; POPCOUNT is a jitted popcount
    (libdevice's `popc` when compiled, bit operations in the interpreter); SPLIT_K > 1 atomically adds
    fp32 partial sums into y (bias from split 0, no ReLU); PRECISION is tl.dot's input precision.
    CONV makes it an implicit-GEMM convolution: row m of X is output pixel (image, oh, ow), column k is
    tap (kh, kw) of input channel c with k = (kh * KW + kw) * C + c, and X is gathered from the input
    image as it is loaded, zeros where the window leaves the (zero-padded) image. No im2col in memory.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt_begin = pid_k * per_split
    kt_end = tl.minimum(kt_begin + per_split, k_tiles)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_N)  # tile-local weight rows = output columns
    lanes = tl.arange(0, BLOCK_K)  # tile-local weight columns = bit positions
    lane_bits = lanes.to(tl.uint32)[None, :]
    if CONV:
        pixel = offs_m % (OH * OW)
        x_rows = x_ptr + (offs_m // (OH * OW)).to(tl.int64)[:, None] * stride_xm  # the row's image
        ih0 = ((pixel // OW) * SH - PH)[:, None]  # the window's top-left corner
        iw0 = ((pixel % OW) * SW - PW)[:, None]
    else:
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    if BLOCK_M == 1:  # GEMV: accumulate products elementwise, reduce over K once at the end
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    for kt in range(kt_begin, kt_end):
        tile = pid_n * k_tiles + kt
        start = tl.load(offsets_ptr + tile)
        offs_k = kt * BLOCK_K + lanes
        in_range = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        if CONV:
            tap = offs_k // C
            ih = ih0 + ((tap // KW) * DH)[None, :]
            iw = iw0 + ((tap % KW) * DW)[None, :]
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x = tl.load(x_rows + ((offs_k % C) * stride_xk)[None, :] + ih * stride_xh + iw * stride_xw,
                        mask=in_range & inside, other=0.0)
        else:
            x = tl.load(x_rows + offs_k.to(tl.int64)[None, :] * stride_xk, mask=in_range, other=0.0)
        # Decode the weight tile w[n, k] row-major, so that a warp's lanes read one row's values: coalesced.
        if BITMAP:
            words = tl.load(pattern_ptr + tile * BLOCK_N + rows).to(tl.uint32, bitcast=True)
            row_nnz = POPCOUNT(words)
            row_start = start + tl.cumsum(row_nnz, axis=0) - row_nnz
            present = ((words[:, None] >> lane_bits) & 1) != 0
            before = POPCOUNT(words[:, None] & ((1 << lane_bits) - 1))  # set bits left of column k
            w = tl.load(values_ptr + row_start[:, None] + before, mask=present, other=0.0)
        else:
            counts = tl.load(pattern_ptr + tile * BLOCK_N + rows).to(tl.int32)
            row_start = start + tl.cumsum(counts, axis=0) - counts
            w = tl.zeros((BLOCK_N, BLOCK_K), dtype=values_ptr.dtype.element_ty)
            for slot in range(0, tl.max(counts, axis=0)):
                live = slot < counts
                col = tl.load(columns_ptr + row_start + slot, mask=live, other=BLOCK_K).to(tl.int32)
                val = tl.load(values_ptr + row_start + slot, mask=live, other=0.0)
                w = tl.where(lanes[None, :] == col[:, None], val[:, None], w)
        if BLOCK_M == 1:
            acc += x.to(tl.float32) * w.to(tl.float32)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)

    if BLOCK_M == 1:
        acc = tl.sum(acc, axis=1)[None, :]
    if HAS_BIAS:  # only split 0 adds the bias
        bias = tl.load(bias_ptr + offs_n, mask=(offs_n < N) & (pid_k == 0), other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if RELU:
            acc = tl.maximum(acc, 0.0)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)


def _popcount_hw(x):
    """Set bits per uint32 element: one `popc` instruction."""
    return libdevice.popc(x.to(tl.int32, bitcast=True))


def _popcount_swar(x):
    """Set bits per uint32 element in plain bit operations (the interpreter has no libdevice)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


# ---------------------------------------------------------------------------------------- 3. the wrapper
@functools.cache
def _triton() -> Any:
    """Import triton once and bind the names the kernel source uses."""
    global tl, libdevice
    # lazy: triton is optional (kdexport[sparse]); `import kdexport.kernels` works without it
    import triton
    import triton.language
    from triton.language.extra import libdevice as _libdevice

    tl, libdevice = triton.language, _libdevice
    return triton


def triton_mode() -> str:
    """"interpreter" if triton was imported under TRITON_INTERPRET=1 (kernels then run only interpreted, on
    CPU), else "compiler" (kernels compile for CUDA, and CPU tensors take the reference)."""
    _triton()
    # lazy: optional (kdexport[sparse]); `import kdexport.kernels` works without it
    from triton.runtime.interpreter import InterpretedFunction

    return "interpreter" if isinstance(tl.cdiv, InterpretedFunction) else "compiler"


@functools.cache
def _compiled_kernels() -> tuple[Any, Any, Any]:
    """(GEMM autotuner, GEMV autotuner, popcount) for the GPU. Needs triton_mode() == "compiler"."""
    triton = _triton()
    # lazy: optional (kdexport[sparse]); `import kdexport.kernels` works without it
    from triton.runtime.jit import JITFunction

    kernel = JITFunction(_sparse_matmul_kernel)

    def tuned(configs):
        return triton.autotune(
            [triton.Config({"BLOCK_M": bm}, num_warps=nw, num_stages=ns) for bm, nw, ns in configs],
            key=["M", "N", "K", "SPLIT_K", "BITMAP", "HAS_BIAS", "RELU", "CONV", "SH", "SW"],
            prune_configs_by={"early_config_prune": _prune_configs},
            reset_to_zero=["y_ptr"],  # split-K accumulates into y: every benchmark run starts from zero
        )(kernel)

    return tuned(GEMM_CONFIGS), tuned(GEMV_CONFIGS), JITFunction(_popcount_hw)


@functools.cache
def _interpreted_kernel() -> Any:
    """The kernel for Triton's CPU interpreter; no autotuning, which would only slow it down."""
    _triton()
    # lazy: optional (kdexport[sparse]); `import kdexport.kernels` works without it
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(_sparse_matmul_kernel)


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_k(m: int, n_tiles: int, k_tiles: int, device: torch.device) -> int:
    """K splits that bring the grid to ~2 programs per SM without cutting a split below 4 tiles."""
    if device.type != "cuda":
        return 1
    programs = -(-m // _block_m_choices(m)[0]) * n_tiles
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(-(-2 * sms // programs), k_tiles // MIN_K_TILES_PER_SPLIT))


def _launch_triton(x: Tensor, weight: TiledSparseWeight, bias: Tensor | None, relu: bool,
                   split_k: int | None = None, conv: ConvGeometry | None = None) -> Tensor:
    """Run the Triton kernel, compiled for CUDA tensors and interpreted for CPU tensors; Y is (M, N).

    x is (M, K), or for `conv` the (batch, C, H, W) input image (any strides).
    """
    triton = _triton()
    m, (n, k) = rows(x, conv), weight.shape
    n_tiles, k_tiles = weight.tile_grid
    split_k = _split_k(m, n_tiles, k_tiles, x.device) if split_k is None else split_k
    fused = split_k == 1
    y = (torch.empty((m, n), dtype=x.dtype, device=x.device) if fused
         else torch.zeros((m, n), dtype=torch.float32, device=x.device))
    if conv is None:
        geometry = (1, 1, 1, 1, 1, 0, 0)
        switches = dict(CONV=False, KW=1, SH=1, SW=1, PH=0, PW=0, DH=1, DW=1)
    else:
        (_, kw), (sh, sw), (ph, pw), (dh, dw) = conv
        geometry = (*x.shape[1:], *conv.output_size(*x.shape[2:]), x.stride(2), x.stride(3))
        switches = dict(CONV=True, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw)
    args = (x, weight.values, weight.offsets, weight.pattern, weight.columns,
            weight.values if bias is None else bias, y,  # an unused bias pointer is never read
            m, n, k, x.stride(0), x.stride(1), y.stride(0), y.stride(1), *geometry)
    ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    meta = dict(BLOCK_N=weight.block_n, BLOCK_K=weight.block_k, GROUP_M=GROUP_M, SPLIT_K=split_k,
                BITMAP=weight.encoding == "bitmap", HAS_BIAS=bias is not None, RELU=relu and fused,
                PRECISION="ieee" if ieee else "tf32", **switches)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(m, meta["BLOCK_M"]) * n_tiles, split_k

    if x.device.type == "cpu":
        # Plain Python popcount: inside an interpreted kernel it runs on the interpreter's tensors as is.
        _interpreted_kernel()[grid](*args, BLOCK_M=_block_m_choices(m)[-1], POPCOUNT=_popcount_swar, **meta)
    else:
        gemm, gemv, popcount = _compiled_kernels()
        with torch.cuda.device(x.device):
            (gemv if m == 1 else gemm)[grid](*args, POPCOUNT=popcount, **meta)
    if fused:
        return y
    return (y.relu_() if relu else y).to(x.dtype)


def _use_triton(x: Tensor, backend: str) -> bool:
    """Whether this call runs the Triton kernel; RuntimeError where this process's Triton cannot run it."""
    if backend == "torch" or x.device.type not in ("cpu", "cuda"):
        return False  # backend="triton" on other devices was refused by check_inputs
    on_cpu = x.device.type == "cpu"
    if backend == "auto" and on_cpu:  # interpreted if asked for and possible; otherwise the reference
        return (os.environ.get("TRITON_INTERPRET") == "1" and interpretable(x.dtype)
                and triton_mode() == "interpreter")
    mode = triton_mode()
    if on_cpu and mode == "compiler":
        raise RuntimeError("the Triton kernel runs on CPU tensors only in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before anything imports triton, or pass backend='torch'")
    if not on_cpu and mode == "interpreter":
        raise RuntimeError("triton was imported under TRITON_INTERPRET=1, so the kernel cannot compile for CUDA "
                           "in this process: unset TRITON_INTERPRET (or set it to 0) before triton is imported, "
                           "or pass backend='torch'")
    return True


@torch.library.custom_op("kdexport::sparse_matmul", mutates_args=())
def sparse_matmul_op(x: Tensor, values: Tensor, offsets: Tensor, pattern: Tensor, columns: Tensor,
                     bias: Tensor | None, out_features: int, in_features: int, block_n: int, block_k: int,
                     encoding: str, relu: bool, backend: str) -> Tensor:
    """The registered op on the format's raw tensors (see `sparse_matmul` for the friendly signature)."""
    weight = TiledSparseWeight((out_features, in_features), block_n, block_k, encoding,  # type: ignore[arg-type]
                               values, offsets, pattern, columns)
    check_inputs(x, weight, bias, backend)
    if x.shape[0] == 0:
        return x.new_empty((0, out_features))
    if _use_triton(x, backend):
        return _launch_triton(x, weight, bias, relu)
    return sparse_matmul_ref(x, weight, bias, relu)


@sparse_matmul_op.register_fake
def _(x, values, offsets, pattern, columns, bias, out_features, in_features, block_n, block_k, encoding, relu,
      backend):
    weight = TiledSparseWeight((out_features, in_features), block_n, block_k, encoding,
                               values, offsets, pattern, columns)
    check_inputs(x, weight, bias, backend)
    return x.new_empty((x.shape[0], out_features))


def sparse_matmul(x: Tensor, weight: TiledSparseWeight, bias: Tensor | None = None, *, relu: bool = False,
                  backend: str = "auto") -> Tensor:
    """relu?(x @ W^T + bias) for x of shape (..., in_features); W stays in its tiled sparse format.

    backend: "auto" (CUDA: Triton; CPU: reference, or the interpreted kernel under TRITON_INTERPRET=1),
    "triton" (the kernel on CUDA, interpreted on CPU) or "torch" (the reference).
    """
    if not isinstance(weight, TiledSparseWeight):
        raise TypeError(f"weight must be a TiledSparseWeight, got {type(weight).__name__}")
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError("x must be a torch.Tensor of shape (..., in_features)")
    lead = x.shape[:-1]
    y = sparse_matmul_op(
        x.reshape(-1, x.shape[-1]), *weight.tensors(), bias, weight.shape[0], weight.shape[1],
        weight.block_n, weight.block_k, weight.encoding, relu, backend)
    return y.view(*lead, weight.shape[0])


# ------------------------------------------------------------------------------------- 4. the reference
def sparse_matmul_ref(x: Tensor, weight: TiledSparseWeight, bias: Tensor | None = None,
                      relu: bool = False) -> Tensor:
    """Plain torch: decode W to dense, then linear (+ ReLU). The test oracle and the CPU fallback."""
    y = torch.nn.functional.linear(x, weight.to_dense(), bias)
    return torch.relu(y) if relu else y


__all__ = ["BACKENDS", "ConvGeometry", "sparse_matmul", "sparse_matmul_op", "sparse_matmul_ref", "triton_mode"]
