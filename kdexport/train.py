"""Supervised training and evaluation loops, shared by teacher training, distillation and fine-tuning.

A run writes `<out>` (the checkpoint), `<out stem>.log.jsonl` (one line per epoch) and, while it runs,
`<out stem>.state.pt` (model + optimiser + scheduler + RNG) so that rerunning the same command continues where it
stopped (`--resume` only refuses to start over when there is nothing to continue).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader

from . import models
from .checkpoint import load_checkpoint, load_model, model_spec, nonfinite_tensors, save_checkpoint
from .data import DEFAULT_VAL_FRACTION, check_image_size, dataset_info, make_loader, size_field
from .errors import CheckpointError, ConfigError, TrainingError
from .lock import output_lock
from .metrics import param_counts
from .preflight import check_device, check_output
from .runid import check_same_run, optional
from .vocab import KEEP_EPOCH, RECIPES, Recipe, get_recipe  # noqa: F401  (re-exported: the recipes belong to training)

stderr = Console(stderr=True)


def plain_progress() -> None:
    """Report training as one line per epoch, never a live bar: for worker processes, whose bars would interleave."""
    global stderr
    stderr = Console(stderr=True, force_terminal=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(device: str | None = None) -> torch.device:
    if check_device(device) in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_batch(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """An input batch on `device`, channels-last when it is a batch of images: on the CPU (oneDNN) as on CUDA most
    of the zoo trains faster on it than on NCHW (a training step: DenseNet-169 1.18x, MobileNet 1.55x,
    EfficientNet-B0 2.32x, ResNet-18 1.02x; benchmarks/bench_memory_format.py)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent (top-k with k capped at the class count) and the mean cross-entropy."""
    model.eval()
    correct1 = correct5 = total = 0
    nll = 0.0
    for x, y in loader:
        x, y = to_batch(x, device), y.to(device)
        logits = model(x)
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (topk[:, 0] == y).sum().item()
        correct5 += (topk == y[:, None]).any(dim=1).sum().item()
        nll += F.cross_entropy(logits.float(), y, reduction="sum").item()
        total += len(y)
    n = max(total, 1)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "nll": nll / n}


def final_metrics(model: nn.Module, val_loader: Iterable, test_loader: Iterable,
                  device: torch.device | str = "cpu", val: dict[str, float] | None = None) -> dict[str, float]:
    """A finished model's numbers: validation (what every choice uses) and test (measured once, only reported).

    `top1`/`top5` are the test figures, the ones a report quotes; `val_top1`/`val_top5` drive selection.
    """
    val = val or evaluate(model, val_loader, device)
    test = evaluate(model, test_loader, device)
    return {"top1": test["top1"], "top5": test["top5"], "val_top1": val["top1"], "val_top5": val["top5"]}


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
                    batches: int = 20) -> None:
    """Re-estimate every BatchNorm's running statistics from `batches` training batches (no weight changes).

    Pruning changes what reaches each BN, so the statistics it carries describe a network that no longer
    exists; a pruned model is often at chance until they are re-estimated (Li et al., "EagleEye", 2020).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    for x, _ in itertools.islice(loader, batches):
        model(x.to(device))
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


def lr_factor(recipe: Recipe, step: int, total: int) -> float:
    """The learning-rate multiplier at `step` of `total`: linear warm-up, then the recipe's schedule."""
    warm = int(recipe.warmup * total)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    if recipe.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if recipe.schedule == "step":
        return recipe.gamma ** sum(t >= m for m in recipe.milestones)
    return 1.0


def make_optimizer(params, recipe: Recipe, epochs: int, steps_per_epoch: int):
    if recipe.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov and
                              recipe.momentum > 0, weight_decay=recipe.weight_decay)
    total = max(1, epochs * steps_per_epoch)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(recipe, i, total))


def ce_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def run_paths(out: Path) -> tuple[Path, Path]:
    """(state file of an interrupted run, JSON-lines log) next to a checkpoint."""
    return out.with_name(out.stem + ".state.pt"), out.with_name(out.stem + ".log.jsonl")


def fit(
    model: nn.Module,
    step: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    train_loader: DataLoader,
    val_loader: DataLoader,
    test_loader: DataLoader,
    recipe: Recipe,
    epochs: int,
    out: Path,
    spec: dict[str, Any],
    *,
    params: Iterable[torch.nn.Parameter] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    resume: bool | None = None,
    label: str = "train",
    after_step: Callable[[nn.Module], None] | None = None,
    keep_state: bool = True,
    keep: str = "best",
) -> dict[str, float]:
    """Train `model` with `step(model, x, y) -> (loss, logits)` and save `out` with metrics in its spec.

    After every epoch the model is measured on the validation split. `keep="best"` saves the epoch with the best
    validation top-1 (ties: the lower validation loss, then the later epoch); `keep="last"` saves the last epoch
    (fine-tuning after pruning, where picking the best of a few noisy validation readings did worse on held-out
    validation images: benchmarks/RESULTS.md). The test split is measured once, on the saved model, and only
    reported: it feeds no choice.

    An interrupted run of the same identity (`spec["run"]`) is continued from its state file; `resume=True`
    refuses to start over when there is none, `resume=False` starts over. Only one process writes `out` at a time.
    `keep_state=False` writes no state file (a run nothing will continue, such as fine-tuning a freshly pruned
    model): each epoch's state costs a write of the model, the optimiser and the best weights.
    """
    with output_lock(check_output(out)):
        return _fit(model, step, train_loader, val_loader, test_loader, recipe, epochs, Path(out), spec,
                    params=params, device=device, seed=seed, resume=resume, label=label, after_step=after_step,
                    keep_state=keep_state, keep=keep)


def _fit(model, step, train_loader, val_loader, test_loader, recipe, epochs, out, spec, *, params, device, seed,
         resume, label, after_step, keep_state, keep) -> dict[str, float]:
    if keep not in KEEP_EPOCH:
        raise ConfigError(f"keep must be one of {', '.join(KEEP_EPOCH)}, got {keep!r}")
    if epochs < 0:
        raise ConfigError(f"--epochs must be >= 0, got {epochs}")
    if epochs == 0:
        stderr.print(f"[{label}] --epochs 0: writing the untrained model to {out} (nothing is trained)")
    device = torch.device(device)
    seed_everything(seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path, log_path = run_paths(out)
    cuda = device.type == "cuda"
    model.to(device, memory_format=torch.channels_last)  # see to_batch; back to NCHW before it is saved
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    opt, sched = make_optimizer(params, recipe, epochs, len(train_loader))
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    start = 0
    best: dict[str, Any] | None = None  # {"key", "epoch", "state", "val"} of the best epoch so far
    if resume and not state_path.is_file():
        raise CheckpointError(f"--resume: there is no interrupted run to continue ({state_path} is missing); "
                              "drop --resume to start one")
    if resume is not False and state_path.is_file():
        saved_state, saved_spec, st = load_checkpoint(state_path, with_extra=True)
        check_same_run(f"the interrupted run in {state_path}", saved_spec.get("run"), spec.get("run"),
                       "rerun with those settings to finish it, or delete it to start over")
        model.load_state_dict(saved_state)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"])
        if cuda and "cuda_rng" in st:
            torch.cuda.set_rng_state(st["cuda_rng"], device)
        start = int(st["epoch"])
        if "best_state" in st:
            best = {"key": tuple(st["best_key"]), "epoch": int(st["best_epoch"]), "state": st["best_state"],
                    "val": dict(st["best_val"])}
        stderr.print(f"[{label}] continuing the interrupted run of {out.name} at epoch {start + 1}/{epochs}")
    else:  # a fresh start: the log starts over, no duplicate epochs
        log_path.unlink(missing_ok=True)

    metrics: dict[str, float] = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=stderr,
                  transient=False, disable=not stderr.is_terminal) as progress:
        task = progress.add_task(label, total=epochs * len(train_loader), completed=start * len(train_loader),
                                 info="")
        for epoch in range(start, epochs):
            model.train()
            seen, loss_sum, correct, t0 = 0, 0.0, 0, time.perf_counter()
            for i, (x, y) in enumerate(train_loader):
                x, y = to_batch(x, device), y.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                    loss, logits = step(model, x, y)
                if not torch.isfinite(loss):
                    raise TrainingError(f"[{label}] loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}; "
                                        "lower --lr or check the data")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                if after_step is not None:
                    after_step(model)
                seen += len(y)
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                ips = seen / max(time.perf_counter() - t0, 1e-9)
                progress.update(task, advance=1, info=f"epoch {epoch + 1}/{epochs} loss {loss_sum / seen:.4f} "
                                f"acc {100 * correct / seen:.1f}% {ips:.0f} img/s")
            val = evaluate(model, val_loader, device)
            metrics = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "train_top1": 100 * correct / max(seen, 1),
                       "images_per_s": seen / max(time.perf_counter() - t0, 1e-9),
                       "lr": opt.param_groups[0]["lr"], **{f"val_{k}": v for k, v in val.items()}}
            key = (val["top1"], -val["nll"])
            if best is None or key >= best["key"] or keep == "last":
                best = {"key": key, "epoch": epoch + 1, "val": val,
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
            with log_path.open("a") as fh:
                fh.write(json.dumps({"stage": label, **metrics}) + "\n")
            rng = {"rng": torch.get_rng_state(), **({"cuda_rng": torch.cuda.get_rng_state(device)} if cuda else {})}
            if keep_state:
                save_checkpoint(state_path, model.state_dict(), spec,
                                extra={"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **rng,
                                       "epoch": epoch + 1, "best_key": list(best["key"]), "best_epoch": best["epoch"],
                                       "best_state": best["state"], "best_val": best["val"]})
            if not stderr.is_terminal:
                stderr.print(f"[{label}] epoch {epoch + 1}/{epochs} loss {metrics['loss']:.4f} "
                             f"val top1 {val['top1']:.2f}% ({metrics['images_per_s']:.0f} img/s)")
    if best is not None:
        model.load_state_dict(best["state"])
    final = final_metrics(model, val_loader, test_loader, device, best["val"] if best else None)
    if best is not None:
        final["best_epoch"] = best["epoch"]
    model.to("cpu", memory_format=torch.contiguous_format)
    save_checkpoint(out, model.state_dict(), {**spec, "metrics": {**spec.get("metrics", {}), **final}})
    state_path.unlink(missing_ok=True)
    return final


def train_run(model_name: str, seed: int, epochs: int, recipe: Recipe, augmentation: str,
              val_fraction: float = DEFAULT_VAL_FRACTION, image_size: tuple[int, int] | None = None,
              pretrained: str | None = None) -> dict[str, Any]:
    """What identifies a training run: a finished checkpoint is reused only for the same identity.

    The image size, the pretrained weights and the zoo's revision of the model enter it only when given (a size
    other than the dataset's default, see `data.size_field`; a non-zero `models.model_revision`), so the runs made
    before they existed keep their identity."""
    return {"stage": "train", "model": model_name, "seed": seed, "epochs": epochs, "recipe": recipe.to_dict(),
            "augmentation": augmentation, "val_fraction": val_fraction,
            **optional(image_size=image_size, pretrained=pretrained,
                       revision=models.model_revision(model_name) or None)}


def split_loaders(dataset: str, batch_size: int, data_dir: str | Path | None, val_fraction: float,
                  download: bool = False, image_size=None, workers: int | None = None,
                  device: torch.device | str = "cpu",
                  drop_last: bool = True) -> tuple[DataLoader, DataLoader, DataLoader]:
    """(train shuffled and augmented, val, test) loaders of one dataset at `image_size` (the dataset's default
    when None), with `workers` processes each (`data.default_workers` when None); pinned memory for CUDA.
    `drop_last` (a recipe's) drops the training split's partial last batch."""
    common = dict(image_size=image_size, workers=workers, pin_memory=torch.device(device).type == "cuda")
    train = make_loader(dataset, "train", batch_size, data_dir, download=download, val_fraction=val_fraction,
                        drop_last=drop_last, **common)
    val = make_loader(dataset, "val", 256, data_dir, val_fraction=val_fraction, **common)
    return train, val, make_loader(dataset, "test", 256, data_dir, **common)


def train_classifier(model_name: str, dataset: str, out: Path, *, epochs: int, recipe: Recipe, seed: int = 0,
                     stem: str | None = None, data_dir: str | Path | None = None, pretrained: str | None = None,
                     device: str | None = None, resume: bool | None = None, download: bool = False,
                     val_fraction: float = DEFAULT_VAL_FRACTION, image_size=None,
                     workers: int | None = None) -> dict[str, float]:
    """Train a classifier (a teacher, or a student without distillation) with cross-entropy.

    `image_size` (N or (H, W); the dataset's default when None) is recorded in the checkpoint's spec, and every
    later stage takes it from there. `pretrained` is a local torchvision state_dict; its classifier is kept only
    when it has the dataset's class count.
    """
    check_output(out, inputs=(pretrained,))
    check_device(device)
    info = dataset_info(dataset, data_dir, image_size)
    stem = stem or models.DEFAULT_STEM
    seed_everything(seed)  # --seed also fixes the initial weights
    model = models.create_model(model_name, info.num_classes, stem=stem, pretrained=pretrained,
                                input_size=info.input_size)
    run = train_run(model_name, seed, epochs, recipe, info.augmentation, val_fraction,
                    size_field(dataset, info.input_size), pretrained)
    spec = model_spec("model", num_classes=info.num_classes, stem=stem, input_size=info.input_size,
                      dataset=dataset, mean=info.mean, std=info.std, model=model_name, recipe=recipe.to_dict(),
                      seed=seed, run=run, val_fraction=val_fraction)
    dev = pick_device(device)
    train, val, test = split_loaders(dataset, recipe.batch_size, data_dir, val_fraction, download=download,
                                     image_size=info.input_size[1:], workers=workers, device=dev,
                                     drop_last=recipe.drop_last)
    return fit(model, ce_step, train, val, test, recipe, epochs, Path(out), spec, device=dev,
               seed=seed, resume=resume, label=f"train {model_name}")


def evaluate_checkpoint(path: str | Path, dataset: str | None = None, data_dir: str | Path | None = None,
                        device: str | None = None, image_size=None, workers: int | None = None) -> dict[str, Any]:
    """Accuracy and both parameter counts of a checkpoint: `student_params` (paper) and `deployed_params`.

    Images come at the checkpoint's size; an explicit `image_size` must agree with it."""
    dev = pick_device(device)
    model, spec = load_model(path)
    size = check_image_size(image_size, spec["input_size"], path)
    bad = nonfinite_tensors(model)
    if bad:
        stderr.print(f"warning: {path} holds NaN or inf in {len(bad)} tensor(s) (first: {bad[0]}); its accuracy "
                     "below is not a trained model's", highlight=False, soft_wrap=True)
    dataset = dataset or spec["dataset"]
    val_fraction = spec.get("val_fraction", DEFAULT_VAL_FRACTION)
    common = dict(image_size=size, workers=workers, pin_memory=dev.type == "cuda")
    test = make_loader(dataset, "test", 256, data_dir, **common)
    val = (make_loader(dataset, "val", 256, data_dir, val_fraction=val_fraction, **common)
           if dataset == spec["dataset"] else None)
    acc = evaluate(model.to(dev), test, dev)
    vals = {f"val_{k}": v for k, v in evaluate(model, val, dev).items() if k != "nll"} if val else {}
    counts = param_counts(model)
    return {"model": spec.get("pair") or spec.get("model"), "kind": spec["kind"], "dataset": dataset,
            "top1": acc["top1"], "top5": acc["top5"], **vals, "student_params": counts.student_nonzero,
            "deployed_params": counts.deployed_nonzero, "total_params": counts.total}
