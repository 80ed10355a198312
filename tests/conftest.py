"""Shared test fixtures: a tiny trained LeNet-5 teacher checkpoint on digits, and test-wide torch settings.

Torch runs single-threaded unless KDEXPORT_TEST_THREADS says otherwise: on a shared 2-core machine two
spinning OpenMP threads per process made small forward passes up to 100x slower than one thread.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pytest puts tests/ first on sys.path (for this conftest and tests/test_cli.py); tests/models and
# tests/kdexport would then import as empty namespace packages unless the repository root is also there.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter; with one they compile for it.
# A process gets one or the other (kernels.sparse_matmul.triton_mode), fixed when triton is first imported,
# which importing torch does not do but torchvision does (through torch._dynamo): set it before that. Set
# TRITON_INTERPRET=1 yourself to run the interpreted kernel tests on a GPU machine.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

torch.set_num_threads(int(os.environ.get("KDEXPORT_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.openvino` tests need the optional openvino package: skipped, with the reason, without it."""
    import importlib.util

    if importlib.util.find_spec("openvino") is not None:
        return
    skip = pytest.mark.skip(reason="needs openvino: pip install -e '.[openvino]' (the README's test command does)")
    for item in items:
        if "openvino" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A LeNet-5 trained 2 epochs on digits (180 steps, ~90% top-1): a real kdexport checkpoint."""
    from kdexport.train import get_recipe, train_classifier

    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    recipe = get_recipe("simkd", lr=0.02, batch_size=16)  # lr 0.05 sometimes kills LeNet-5's ReLUs on digits
    train_classifier("lenet5", "digits", out, epochs=2, recipe=recipe, seed=0, device="cpu")
    return out


@pytest.fixture(scope="session")
def digits_x() -> torch.Tensor:
    """Two real test images (N=2, 3x32x32), normalised."""
    from kdexport.data import sample_batch

    return sample_batch("digits", 2)
