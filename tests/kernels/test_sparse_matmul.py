"""The SpMM kernel against its torch reference: interpreted on CPU tensors, compiled on a GPU if present."""

import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from kdexport.kernels import sparse_matmul as sm
from kdexport.kernels.sparse_format import TiledSparseWeight
from kdexport.kernels.sparse_matmul import sparse_matmul, sparse_matmul_ref

pytest.importorskip("triton", reason="the kernel tests run Triton's interpreter: install triton")

SPARSITIES = (0.0, 0.5, 0.9, 0.99, 1.0)
ENCODINGS = ("bitmap", "index")


@pytest.fixture
def operands(pruned):
    """operands(m, n, k, sparsity, encoding, block_n=16, dtype=fp32) -> x (m, k), tiled W (n, k), bias (n,)."""

    def make(m, n, k, sparsity, encoding, block_n=16, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed + 1)
        w = TiledSparseWeight.from_dense(pruned((n, k), sparsity, dtype, seed), block_n, encoding)
        x = torch.randn(m, k, generator=g).to(dtype)
        return x, w, torch.randn(n, generator=g).to(dtype)

    return make


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("m", [1, 37], ids=["gemv", "gemm"])
def test_kernel_matches_reference(m, sparsity, encoding, launches, operands):
    x, w, _ = operands(m, 70, 45, sparsity, encoding)  # 5 x 2 tiles, neither dimension a multiple
    y = sparse_matmul(x, w)
    assert launches == [(m, 70, 45, encoding, "cpu", None)]
    assert_close(y, sparse_matmul_ref(x, w))
    assert_close(y, x @ w.to_dense().T)
    if sparsity == 1.0:
        assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(("m", "n", "k", "block_n"), [(5, 33, 100, 16), (130, 20, 33, 16), (2, 1, 1, 64),
                                                      (17, 130, 64, 128)])
def test_odd_shapes(m, n, k, block_n, encoding, launches, operands):
    x, w, bias = operands(m, n, k, 0.6, encoding, block_n)
    assert_close(sparse_matmul(x, w, bias), sparse_matmul_ref(x, w, bias))
    assert len(launches) == 1


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("m", [1, 20])
def test_bias_and_relu_are_fused(m, encoding, launches, operands):
    x, w, bias = operands(m, 40, 64, 0.5, encoding)
    z = x @ w.to_dense().T + bias
    assert (z < 0).any() and (z > 0).any()  # the ReLU has something to clip
    assert_close(sparse_matmul(x, w, bias, relu=True), torch.relu(z))
    assert_close(sparse_matmul(x, w, bias), z)
    assert len(launches) == 2


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize(("m", "split_k"), [(1, 3), (6, 2), (6, 8)])  # 8 > 5 K tiles: empty splits
def test_split_k(m, split_k, relu, launches, operands):
    x, w, bias = operands(m, 24, 150, 0.7, "bitmap")
    y = sm._launch_triton(x, w, bias, relu, split_k=split_k)
    assert y.dtype == x.dtype and launches == [(m, 24, 150, "bitmap", "cpu", split_k)]
    assert_close(y, sparse_matmul_ref(x, w, bias, relu))


def test_strided_and_batched_inputs(launches, operands):
    x, w, bias = operands(8, 24, 40, 0.8, "index")
    xt = x.t().contiguous().t()  # column-major: stride (1, 8)
    assert xt.stride() == (1, 8)
    assert_close(sparse_matmul(xt, w, bias), sparse_matmul_ref(x, w, bias))
    x3 = x.view(2, 4, 40)
    y3 = sparse_matmul(x3, w, bias)
    assert y3.shape == (2, 4, 24)
    assert_close(y3, sparse_matmul_ref(x, w, bias).view(2, 4, 24))
    assert len(launches) == 2


@pytest.mark.parametrize("m", [1, 4])
def test_fp16_accumulates_in_fp32(m, launches, operands):
    x, w, bias = operands(m, 20, 3000, 0.5, "bitmap", dtype=torch.float16)
    y = sparse_matmul(x, w, bias)
    assert y.dtype == torch.float16 and len(launches) == 1
    expected = x.float() @ w.to_dense().float().T + bias.float()
    assert_close(y.float(), expected, rtol=1e-3, atol=2e-2)  # fp16 accumulation would be off by ~0.1


def test_bf16_on_cpu_uses_the_reference(launches, operands):
    x, w, bias = operands(4, 20, 30, 0.5, "bitmap", dtype=torch.bfloat16)
    assert_close(sparse_matmul(x, w, bias), sparse_matmul_ref(x, w, bias))
    assert launches == []
    with pytest.raises(ValueError, match="bfloat16"):
        sparse_matmul(x, w, bias, backend="triton")


def test_no_rows(launches, operands):
    x, w, _ = operands(0, 20, 30, 0.5, "bitmap")
    assert sparse_matmul(x, w).shape == (0, 20)
    assert launches == []


def test_dispatch(launches, monkeypatch, operands):
    x, w, _ = operands(3, 20, 30, 0.5, "bitmap")
    expected = sparse_matmul_ref(x, w)
    assert_close(sparse_matmul(x, w), expected)  # TRITON_INTERPRET=1: the interpreted kernel
    assert_close(sparse_matmul(x, w, backend="torch"), expected)
    assert len(launches) == 1
    monkeypatch.delenv("TRITON_INTERPRET")
    assert_close(sparse_matmul(x, w), expected)  # plain CPU: the reference
    assert len(launches) == 1
    assert_close(sparse_matmul(x, w, backend="triton"), expected)
    assert len(launches) == 2


def test_validation_errors(operands):
    x, w, bias = operands(3, 20, 30, 0.5, "bitmap")
    cases = [
        (lambda: sparse_matmul(x[:, :29], w), ValueError, "x must be"),
        (lambda: sparse_matmul(x.double(), w), TypeError, "dtype"),
        (lambda: sparse_matmul(x, w, bias[:19]), ValueError, "bias must be"),
        (lambda: sparse_matmul(x, w, bias.half()), TypeError, "bias dtype"),
        (lambda: sparse_matmul(x, w, backend="cuda"), ValueError, "backend"),
        (lambda: sparse_matmul(x, w.to_dense()), TypeError, "TiledSparseWeight"),
        (lambda: sparse_matmul(x.to("meta"), w), ValueError, "x is on meta"),
        (lambda: sparse_matmul(x, w, bias.to("meta")), ValueError, "bias is on"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_custom_op_passes_opcheck(operands):
    x, w, bias = operands(3, 16, 32, 0.5, "bitmap")
    args = (x, *w.tensors(), bias, 16, 32, w.block_n, w.block_k, w.encoding, True, "auto")
    torch.library.opcheck(torch.ops.kdexport.sparse_matmul.default, args)


def _python(code: str, **env: str) -> str:
    """Run code in a fresh interpreter at the repository root; its stdout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_kernels_needs_neither_triton_nor_cuda():
    _python("import sys, torch, kdexport.kernels, kdexport.kernels.sparse_matmul; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'")


def test_a_compiling_process_never_interprets():
    """Triton imported without TRITON_INTERPRET=1: CPU tensors take the reference, backend='triton' says why not."""
    out = _python("""
import os, torch
from kdexport.kernels.sparse_format import TiledSparseWeight
from kdexport.kernels.sparse_matmul import sparse_matmul, sparse_matmul_ref, triton_mode
print(triton_mode())
w = TiledSparseWeight.from_dense(torch.randn(20, 30), 16, "bitmap")
x = torch.randn(3, 30)
os.environ["TRITON_INTERPRET"] = "1"  # too late: triton is imported
torch.testing.assert_close(sparse_matmul(x, w), sparse_matmul_ref(x, w))
try:
    sparse_matmul(x, w, backend="triton")
except RuntimeError as e:
    print(e)
""", TRITON_INTERPRET="0")
    mode, error = out.splitlines()
    assert mode == "compiler"
    assert error.startswith("the Triton kernel runs on CPU tensors only in Triton's interpreter: set TRITON_")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("m", [1, 16, 300])
def test_compiled_kernel_on_gpu(m, encoding, dtype, launches, operands):
    x, w, bias = operands(m, 520, 1000, 0.9 if encoding == "index" else 0.7, encoding, 64, dtype)
    x, w, bias = x.cuda(), w.to("cuda"), bias.cuda()
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    expected = torch.relu(x.float() @ w.to_dense().float().T + bias.float())
    assert_close(sparse_matmul(x, w, bias, relu=True).float(), expected, **tol)
    assert_close(sm._launch_triton(x, w, bias, True, split_k=4).float(), expected, **tol)
    assert launches[0][4] == "cuda"
