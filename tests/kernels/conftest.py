"""Kernel tests: the Triton kernels interpreted on CPU tensors, or compiled on a GPU (tests marked `gpu`).

tests/conftest.py sets TRITON_INTERPRET before triton's import: 1 without a GPU, 0 with one. One process
cannot do both (kernels.sparse_matmul.triton_mode), so the interpreted-kernel tests (those that count
launches) are skipped in a compiling process and the `gpu` tests without a GPU or in an interpreting one,
each with its reason. No __init__.py here: as a package this directory would be named `kernels` and hide
the package under test.
"""

import pytest
import torch


def _triton_mode() -> str | None:
    try:
        from kdexport.kernels.sparse_matmul import triton_mode

        return triton_mode()
    except ImportError:
        return None


def pytest_collection_modifyitems(config, items):
    mode = _triton_mode()
    if mode is None:
        reason = "triton is not installed"
    elif not torch.cuda.is_available():
        reason = "needs a CUDA GPU (none visible to torch)"
    elif mode == "interpreter":
        reason = "TRITON_INTERPRET=1 was set when triton was imported: this process cannot compile kernels"
    else:
        reason = None
    interpreted_skip = None if mode == "interpreter" else pytest.mark.skip(
        reason="triton is not installed" if mode is None else
        "the kernel is not interpreted in this process (TRITON_INTERPRET=0): rerun with TRITON_INTERPRET=1")
    for item in items:
        if not str(item.path).startswith(str(config.rootpath / "tests" / "kernels")):
            continue
        if "gpu" in item.keywords:
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
        elif interpreted_skip and "launches" in getattr(item, "fixturenames", ()):
            item.add_marker(interpreted_skip)


@pytest.fixture
def launches(monkeypatch):
    """Records every Triton launch as (M, N, K, encoding, device type, split_k override)."""
    from kdexport.kernels import sparse_matmul as sm  # the module: kernels/__init__ does not re-export the function

    records = []
    launch = sm._launch_triton

    def counting(x, weight, bias, relu, split_k=None, conv=None):
        records.append((sm.rows(x, conv), *weight.shape, weight.encoding, x.device.type, split_k))
        return launch(x, weight, bias, relu, split_k, conv)

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
