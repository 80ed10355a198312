"""Kernel tests run the Triton kernels in Triton's CPU interpreter, on CPU tensors.

TRITON_INTERPRET=1 is set before anything imports triton. CUDA tensors still run the compiled kernel
(kernels.sparse_matmul dispatches on the device), so the GPU tests check the real thing; without a GPU
they are skipped with the reason "needs a CUDA GPU". No __init__.py here: as a package this directory
would be named `kernels` and hide the package under test.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def launches(monkeypatch):
    """Records every Triton launch as (M, N, K, encoding, device type, split_k override)."""
    from kernels import sparse_matmul as sm  # the module: kernels/__init__ does not re-export the function

    records = []
    launch = sm._launch_triton

    def counting(x, weight, bias, relu, split_k=None):
        records.append((x.shape[0], weight.shape[0], x.shape[1], weight.encoding, x.device.type, split_k))
        return launch(x, weight, bias, relu, split_k)

    monkeypatch.setattr(sm, "_launch_triton", counting)
    return records


def _pruned(shape, sparsity, dtype=torch.float32, seed=0):
    """A random weight with exactly round(sparsity * numel) zeros at random positions."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    zeros = round(sparsity * w.numel())
    w.view(-1)[torch.randperm(w.numel(), generator=g)[:zeros]] = 0
    return w.to(dtype)


@pytest.fixture
def pruned():
    """pruned(shape, sparsity, dtype=float32, seed=0): a random weight with exactly that fraction of zeros."""
    return _pruned
