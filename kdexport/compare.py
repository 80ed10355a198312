"""Compare two checkpoints on a test set: where they disagree, how far apart their logits and weights are.

Useful after pruning or export-related changes: two models with the same accuracy can still classify different
examples. Distances:
- logits: per example, the L2 norm of the logit difference; `logit_l2_mean` averages it over the test set and
  `logit_l2_total` is the L2 norm of the difference of the whole (examples x classes) logit matrices;
- weights: the L2 norm of the difference over all parameters, when both state_dicts have the same keys and
  shapes (e.g. a student and its weight-pruned copy); otherwise "n/a: architectures differ".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint, load_model
from .data import check_image_size, dataset_info, make_loader
from .errors import ConfigError
from .train import pick_device

NA_ARCH = "n/a: architectures differ"


def weight_distance(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor],
                    params_a: set[str]) -> float | str:
    """L2 distance over the parameters (`params_a` names) when both state_dicts match in keys and shapes."""
    if state_a.keys() != state_b.keys() or any(state_a[k].shape != state_b[k].shape for k in state_a):
        return NA_ARCH
    total = sum(float((state_a[k].double() - state_b[k].double()).pow(2).sum()) for k in params_a)
    return math.sqrt(total)


@torch.inference_mode()
def compare_checkpoints(ckpt_a: str | Path, ckpt_b: str | Path, dataset: str | None = None,
                        data_dir: str | Path | None = None, device: str | None = None,
                        batch_size: int = 256, image_size=None, workers: int | None = None) -> dict[str, Any]:
    """Disagreements, logit distances, weight distance and each model's accuracy on `dataset`'s test split, at the
    checkpoints' image size (they must share it; an explicit `image_size` must agree)."""
    (model_a, spec_a), (model_b, spec_b) = load_model(ckpt_a), load_model(ckpt_b)
    dataset = dataset or spec_a["dataset"]
    size = check_image_size(image_size, spec_a["input_size"], ckpt_a)
    info = dataset_info(dataset, data_dir, size)
    for path, spec in ((ckpt_a, spec_a), (ckpt_b, spec_b)):
        if spec["num_classes"] != info.num_classes or list(spec["input_size"]) != list(info.input_size):
            raise ConfigError(f"{path} takes {spec['input_size']} inputs with {spec['num_classes']} classes; "
                              f"{dataset} has {list(info.input_size)} with {info.num_classes}: pass the "
                              "--dataset it was trained on")
    dev = pick_device(device)
    model_a.to(dev)
    model_b.to(dev)
    n = differ = correct_a = correct_b = 0
    l2_sum = sq_total = 0.0
    for x, y in make_loader(dataset, "test", batch_size, data_dir, image_size=size, workers=workers,
                            pin_memory=dev.type == "cuda"):
        x, y = x.to(dev), y.to(dev)
        la, lb = model_a(x).float(), model_b(x).float()
        pa, pb = la.argmax(1), lb.argmax(1)
        dist = (la - lb).norm(dim=1)
        n += len(y)
        differ += int((pa != pb).sum())
        correct_a += int((pa == y).sum())
        correct_b += int((pb == y).sum())
        l2_sum += float(dist.sum())
        sq_total += float(dist.double().pow(2).sum())
    state_a, _ = load_checkpoint(ckpt_a)
    state_b, _ = load_checkpoint(ckpt_b)
    params = {name for name, _ in model_a.named_parameters()}
    return {
        "a": str(ckpt_a), "b": str(ckpt_b), "dataset": dataset, "examples": n,
        "disagreements": differ, "disagreement_pct": 100.0 * differ / max(n, 1),
        "logit_l2_mean": l2_sum / max(n, 1), "logit_l2_total": math.sqrt(sq_total),
        "weight_l2": weight_distance(state_a, state_b, params),
        "accuracy_a": 100.0 * correct_a / max(n, 1), "accuracy_b": 100.0 * correct_b / max(n, 1),
    }


__all__ = ["compare_checkpoints", "weight_distance", "NA_ARCH"]
