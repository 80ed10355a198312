"""Parity and accuracy checks shared by every format: a runner is any callable float32 NCHW -> logits."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import DEFAULT_VAL_FRACTION, get_dataset

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Parity:
    """An artifact's logits against PyTorch's on the same real images."""

    runtime: str  # "onnxruntime-cpu", "openvino-cpu" or "tensorrt"
    precision: str
    images: int
    max_abs_diff: float
    top1_agreement: float  # percent of images whose arg-max matches PyTorch's
    tolerance: float | None  # in logit units (atol x scale); None: reported, not gated (int8)
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"max |diff| {self.max_abs_diff:.3g}"
                f"{'' if self.tolerance is None else f' (tolerance {self.tolerance:.3g})'}, top-1 agreement "
                f"{self.top1_agreement:.1f}% on {self.images} test images")


def compare(reference: np.ndarray, got: np.ndarray, *, runtime: str, precision: str,
            atol: float | None) -> Parity:
    """Gate on max |diff| <= atol * max(1, max |reference|), plus 100% top-1 agreement in fp32; atol None
    (int8): reported only. See formats.DEFAULT_ATOL for why the tolerance scales with the logits."""
    finite = bool(np.all(np.isfinite(got)))
    diff = float(np.max(np.abs(reference.astype(np.float64) - got.astype(np.float64)))) if finite else math.inf
    agree = 100.0 * float(np.mean(reference.argmax(1) == got.argmax(1)))
    if atol is None:
        return Parity(runtime, precision, len(reference), diff, agree, None, finite)
    tol = atol * max(1.0, float(np.max(np.abs(reference))))
    passed = diff <= tol and (agree == 100.0 or precision != "fp32")
    return Parity(runtime, precision, len(reference), diff, agree, tol, passed)


def batches(x: np.ndarray, size: int, pad: bool) -> Iterator[tuple[np.ndarray, int]]:
    """Chunks of `size` rows with the count of real rows; `pad` repeats the last row to fill a fixed batch."""
    for i in range(0, len(x), size):
        chunk = x[i:i + size]
        n = len(chunk)
        if pad and n < size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - n, axis=0)])
        yield np.ascontiguousarray(chunk), n


@contextlib.contextmanager
def _full_fp32():
    """The PyTorch reference in true fp32: cuDNN/cuBLAS may otherwise use TF32 (10-bit mantissa) on CUDA."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def torch_logits(model: nn.Module, x: torch.Tensor, device: str = "cpu", chunk: int = 64) -> np.ndarray:
    """PyTorch's fp32 logits for `x`, the reference every artifact is compared with."""
    model = model.eval().to(device)
    outs = []
    with torch.inference_mode(), _full_fp32():
        for i in range(0, len(x), chunk):
            outs.append(model(x[i:i + chunk].to(device)).float().cpu().numpy())
    return np.concatenate(outs)


def eval_images(dataset: str, split: str, limit: int | None, root: str | Path | None,
                val_fraction: float = DEFAULT_VAL_FRACTION, image_size=None) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of a split at `image_size` (evaluation transforms); `limit` keeps an evenly spaced subset
    (folders are sorted by class)."""
    ds = get_dataset(dataset, split, root, val_fraction=val_fraction, image_size=image_size)
    idx = np.arange(len(ds)) if limit is None or limit >= len(ds) else \
        np.linspace(0, len(ds) - 1, limit).round().astype(int)
    items = [ds[int(i)] for i in idx]
    return (torch.stack([x for x, _ in items]).numpy(), np.array([int(y) for _, y in items]))


def accuracy(run: Runner, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent of a runner."""
    return 100.0 * float(np.mean(run(images).argmax(1) == labels))
