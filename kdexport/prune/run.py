"""prune_checkpoint: load a student, prune it (iteratively), fine-tune it with its own objective, save it.

Fine-tuning objective, from the input checkpoint's spec: SimKD's feature loss against the teacher for a
DistilledStudent, vanilla KD for a KD-distilled plain student, cross-entropy for an undistilled classifier.
The teacher checkpoint is `teacher_ckpt`, else `teacher.pt` next to the input (the run-directory layout).
`finetune_scope="head"` trains only the last layers, as the paper does: the projector of a DistilledStudent
(the teacher classifier after it is frozen anyway) or the classifier of a plain model; the frozen rest
stays in eval mode, so its BatchNorm statistics do not drift.

After every pruning step the BatchNorm statistics are re-estimated on training batches, before fine-tuning.
Default recipe: kdexport.vocab.finetune_recipe(), the student recipe (Nesterov SGD, cosine) at lr 0.01 without
warm-up. The fine-tuned model is its last epoch (vocab.FINETUNE_KEEP: a rule chosen on validation).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import KINDS, atomic_write, build_model, load_checkpoint, load_model, model_from, save_checkpoint
from ..data import DEFAULT_VAL_FRACTION, check_image_size
from ..distill import distillation_step
from ..errors import CheckpointError, ConfigError
from ..lock import output_lock
from ..metrics import (
    count_macs,
    global_sparsity,
    param_counts,
    serialized_bytes,
    sparse_encoded_bytes,
)
from ..models import is_distilled
from ..preflight import check_device, check_output
from ..structure import structure_of
from ..train import (
    ce_step,
    final_metrics,
    fit,
    pick_device,
    recalibrate_bn_,
    seed_everything,
    split_loaders,
)
from ..vocab import FINETUNE_KEEP, FINETUNE_SCOPES, finetune_recipe
from .channel import prune_channels, replay_channels_
from .config import PruneConfig
from .weight import prune_weights_, remove_masks_, rewind_weights_

Step = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def load_prunable(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A finished kdexport checkpoint's model (train mode) and spec; CheckpointError for anything else."""
    state, spec, extra = load_checkpoint(path, with_extra=True)
    if extra:
        raise CheckpointError(f"{path} is a training state file, not a finished checkpoint; prune the checkpoint "
                              "its run writes when it finishes")
    if spec.get("kind") not in KINDS:
        raise CheckpointError(f"{path} has unknown kind {spec.get('kind')!r}; expected one of {', '.join(KINDS)}")
    if any(k.endswith(("_orig", "_mask")) for k in state):
        raise CheckpointError(f"{path} holds unbaked pruning masks; only checkpoints written by kdexport can be "
                              "pruned")
    return model_from(state, spec, path), spec


def _objective(model: nn.Module, spec: dict[str, Any], ckpt: Path, teacher_ckpt: str | Path | None,
               device: torch.device) -> tuple[Step, str, Path | None]:
    """(step, name, teacher path): the student's own training objective."""
    distill = spec.get("distill") or {}
    if spec["kind"] != "distilled" and not distill:
        if teacher_ckpt is not None:
            raise ConfigError(f"{ckpt} was not distilled, so it is fine-tuned with cross-entropy; drop --teacher")
        return ce_step, "ce", None
    path = Path(teacher_ckpt) if teacher_ckpt is not None else ckpt.with_name("teacher.pt")
    if not path.is_file():
        raise CheckpointError(f"fine-tuning {ckpt.name} needs the {spec.get('teacher')} teacher it was distilled "
                              f"from: pass --teacher PATH ({path} not found)")
    teacher, tspec = load_model(path)
    if (tspec.get("kind"), tspec.get("model"), tspec.get("num_classes")) != ("model", spec.get("teacher"),
                                                                             spec.get("num_classes")):
        raise CheckpointError(f"{path} is not a trained {spec.get('teacher')} with {spec.get('num_classes')} "
                              f"classes; pass the teacher {ckpt.name} was distilled from")
    method = "simkd" if spec["kind"] == "distilled" else distill.get("method", "kd")
    step = distillation_step(model, teacher.to(device), method, distill.get("temperature", 4.0),
                             distill.get("alpha", 0.9), distill.get("cls_weight", 0.0), memo=True)
    return step, method, path


def finetune_parts(model: nn.Module, scope: str) -> tuple[list[nn.Module], list[nn.Module]]:
    """(trained, frozen) top-level parts for a fine-tuning scope; "all" trains every trainable parameter."""
    if scope == "all":
        return [model], []
    head = model.projector if is_distilled(model) else model.get_classifier()
    return [head], [c for c in model.children() if c is not head]


@contextmanager
def _frozen(parts: list[nn.Module]) -> Iterator[None]:
    grads = {p: p.requires_grad for m in parts for p in m.parameters()}
    try:
        for p in grads:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)


def _finetune(model: nn.Module, step: Step, loaders, recipe, epochs: int, scope: str, out: Path,
              spec: dict[str, Any], seed: int, device: torch.device, label: str) -> dict[str, float]:
    """kdexport.train.fit on the scope's parameters, the frozen parts held in eval mode at every step."""
    trained, frozen = finetune_parts(model, scope)

    def guarded(m: nn.Module, x: torch.Tensor, y: torch.Tensor):
        for part in frozen:
            part.eval()
        return step(m, x, y)

    with _frozen(frozen):
        params = [p for part in trained for p in part.parameters()]
        return fit(model, guarded, *loaders, recipe, epochs, out, spec, params=params, device=device, seed=seed,
                   label=label, resume=False, keep_state=False,  # a fresh pruned model each time: nothing to continue
                   keep=FINETUNE_KEEP)


def _prune_step_(model: nn.Module, config: PruneConfig, example: torch.Tensor, history: list,
                 original: nn.Module | None) -> None:
    """One pruning step of `config.amount`, then (with `original`) rewinding the survivors to it."""
    if config.method == "weight":
        prune_weights_(model, config)
        if original is not None:
            rewind_weights_(model, original.state_dict())
        return
    history += prune_channels(model, config, example)
    if original is not None:
        rewound = copy.deepcopy(original)
        replay_channels_(rewound, history, example)
        model.load_state_dict(rewound.state_dict())


def prune_checkpoint(ckpt_path: str | Path, config: PruneConfig, out_path: str | Path, *, finetune_epochs: int = 0,
                     finetune_scope: str = "all", teacher_ckpt: str | Path | None = None, recipe=None,
                     seed: int = 0, data_dir: str | Path | None = None, device: str | None = None,
                     recalibrate_bn: bool = True, image_size=None, workers: int | None = None) -> dict[str, Any]:
    """Prune a checkpoint (see `_prune_checkpoint`), after checking `out_path`, holding its write lock."""
    check_output(out_path, inputs=(ckpt_path, teacher_ckpt))
    check_device(device)
    with output_lock(out_path):
        return _prune_checkpoint(ckpt_path, config, out_path, finetune_epochs=finetune_epochs,
                                 finetune_scope=finetune_scope, teacher_ckpt=teacher_ckpt, recipe=recipe, seed=seed,
                                 data_dir=data_dir, device=device, recalibrate_bn=recalibrate_bn,
                                 image_size=image_size, workers=workers)


def _prune_checkpoint(ckpt_path: str | Path, config: PruneConfig, out_path: str | Path, *, finetune_epochs: int = 0,
                      finetune_scope: str = "all", teacher_ckpt: str | Path | None = None, recipe=None,
                      seed: int = 0, data_dir: str | Path | None = None, device: str | None = None,
                      recalibrate_bn: bool = True, image_size=None, workers: int | None = None) -> dict[str, Any]:
    """Prune a checkpoint in `config.steps` steps (fine-tuning `finetune_epochs` after each), save `out_path`.

    Data comes at the checkpoint's image size (an explicit `image_size` must agree), with `workers` processes.

    After each step, BatchNorm statistics are re-estimated on training batches (`recalibrate_bn`), before any
    fine-tuning: without it a channel-pruned student starts fine-tuning at chance.

    The saved spec gains "prune" (the config, fine-tuning settings, objective, source and any earlier
    "prune" as "previous") and, for channel pruning, "structure". Returns the saved model's metrics:
    top1, top5, params_nonzero (student backbone, non-zero: the paper's count), student_params (backbone,
    all), deployed_params (non-zero, everything that runs), sparsity (conv/linear weights zero or removed),
    macs, effective_macs, size_bytes (torch.save), sparse_bytes (best sparse encoding).
    Nothing is written at `out_path` unless everything succeeds.
    """
    ckpt_path, out_path = Path(ckpt_path), Path(out_path)
    if finetune_scope not in FINETUNE_SCOPES:
        raise ConfigError(f"--finetune-scope must be one of {', '.join(FINETUNE_SCOPES)}, got {finetune_scope!r}")
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs must be an integer >= 0, got {finetune_epochs!r}")
    model, spec = load_prunable(ckpt_path)
    size = check_image_size(image_size, spec["input_size"], ckpt_path)
    recipe = recipe or finetune_recipe()
    dev = pick_device(device)
    seed_everything(seed)
    step, objective, teacher = None, None, None
    if finetune_epochs:
        step, objective, teacher = _objective(model, spec, ckpt_path, teacher_ckpt, dev)
    train, val, test = split_loaders(spec["dataset"], recipe.batch_size, data_dir,
                                     spec.get("val_fraction", DEFAULT_VAL_FRACTION), image_size=size,
                                     workers=workers, device=dev, drop_last=recipe.drop_last)

    record = {**config.to_dict(), "finetune_epochs": finetune_epochs, "finetune_scope": finetune_scope,
              "objective": objective, "recipe": recipe.to_dict() if finetune_epochs or recalibrate_bn else None,
              "bn_recalibration": recalibrate_bn, "keep_epoch": FINETUNE_KEEP if finetune_epochs else None,
              "teacher": str(teacher) if teacher else None, "source": str(ckpt_path), "seed": seed,
              "previous": spec.get("prune")}
    new_spec = {**spec, "prune": record, "run": {"stage": "prune", **record}}
    each = dataclasses.replace(config, amount=config.step_amount(), steps=1)
    example = torch.randn(1, *spec["input_size"])
    original = copy.deepcopy(model) if config.rewind else None
    tmp = out_path.with_name(f".{out_path.stem}.finetune.pt")
    tmp_log = tmp.with_name(tmp.stem + ".log.jsonl")
    log: list[str] = []
    history: list = []
    acc: dict[str, float] | None = None
    try:
        for i in range(config.steps):
            _prune_step_(model, each, example, history, original)
            if recalibrate_bn:
                recalibrate_bn_(model.to(dev), train, dev)
            if finetune_epochs:
                acc = _finetune(model, step, (train, val, test), recipe, finetune_epochs, finetune_scope, tmp, new_spec,
                                seed + i, dev, f"finetune {config.method}-{config.amount:.2f} {i + 1}/{config.steps}")
                log += [json.dumps({**json.loads(line), "prune_step": i + 1})
                        for line in tmp_log.read_text().splitlines()]
    finally:
        for path in (tmp, tmp_log, tmp.with_name(tmp.stem + ".state.pt")):
            path.unlink(missing_ok=True)
    remove_masks_(model)
    if acc is None:
        acc = final_metrics(model.to(dev), val, test, dev)
        model.to("cpu")
    model.eval()
    reference = build_model({**spec, "structure": None})
    counts = param_counts(model)
    macs = count_macs(model, tuple(spec["input_size"]))
    row = {"checkpoint": str(out_path), "method": config.method, "amount": config.amount, "scope": config.scope,
           "top1": acc["top1"], "top5": acc["top5"], "val_top1": acc["val_top1"],
           "params_nonzero": counts.student_nonzero, "student_params": counts.student,
           "deployed_params": counts.deployed_nonzero,
           "sparsity": global_sparsity(model, reference), "macs": macs.dense, "effective_macs": macs.effective,
           "size_bytes": serialized_bytes(model), "sparse_bytes": sparse_encoded_bytes(model)}
    if config.method == "channel" or spec.get("structure"):
        new_spec["structure"] = structure_of(model, reference)
    new_spec["metrics"] = {**spec.get("metrics", {}), **acc, "source_top1": spec.get("metrics", {}).get("top1"),
                           "source_val_top1": spec.get("metrics", {}).get("val_top1")}
    if log:
        log_path = out_path.with_name(out_path.stem + ".log.jsonl")
        atomic_write(log_path, lambda t: Path(t).write_text("\n".join(log) + "\n"))
    save_checkpoint(out_path, model.state_dict(), new_spec)
    return row
