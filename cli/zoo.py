"""Subcommands for the zoo and single stages: models, pairs, train, distill, evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import models as zoo
from ..data import DEFAULT_VAL_FRACTION
from ..distill import DistillConfig
from ..distill import distill as run_distill
from ..train import evaluate_checkpoint, train_classifier
from ..vocab import (
    DEFAULT_STEM,
    DISTILL_METHODS,
    STUDENT_FILE,
    STUDENT_RECIPE,
    TEACHER_RECIPE,
    model_recipe,
    trained_path,
)
from .app import (
    DataDirOpt,
    DeviceOpt,
    ImageSizeOpt,
    JsonOpt,
    OfficialOpt,
    RecipeName,
    SeedOpt,
    SpecSizeOpt,
    Stem,
    ValFractionOpt,
    WorkersOpt,
    choices,
    command,
    emit,
)

DistillMethod = choices("DistillMethod", DISTILL_METHODS)

RecipeOpt = Annotated[RecipeName, typer.Option(help="Hyper-parameter recipe.")]
LrOpt = Annotated[float | None, typer.Option(help="Override the recipe's learning rate.")]
BatchSizeOpt = Annotated[int | None, typer.Option(help="Override the recipe's batch size.")]
WeightDecayOpt = Annotated[float | None, typer.Option(help="Override the recipe's weight decay.")]
EpochsOpt = Annotated[int, typer.Option(help="Training epochs (0 writes the untrained model, and says so).")]
ResumeOpt = Annotated[bool, typer.Option(help="Refuse to start over: fail unless there is an interrupted run of "
                                               "these settings to continue (a plain rerun continues one anyway).")]


@command
def models(as_json: JsonOpt = False) -> None:
    """List the registered models."""
    rows = [{"name": n} for n in zoo.list_models()]
    emit(rows, "models", as_json, payload=[r["name"] for r in rows])


@command
def pairs(num_classes: Annotated[int, typer.Option(help="Classes for the parameter counts.")] = 100,
          as_json: JsonOpt = False) -> None:
    """List the teacher-student pairs with their parameter counts."""
    rows = [{"name": p.name, "teacher": p.teacher, "student": p.student,
             "teacher_params": zoo.count_params(p.teacher, num_classes),
             "student_params": zoo.count_params(p.student, num_classes)} for p in zoo.PAIRS.values()]
    emit(rows, f"pairs ({num_classes} classes)", as_json)


@command
def train(
    model: Annotated[str, typer.Option(help="Registered model name (see `kdexport models`).")],
    dataset: Annotated[str, typer.Option(help="digits, cifar10, cifar100, mnist or imagefolder.")] = "digits",
    out: Annotated[Path | None, typer.Option(help="Checkpoint path [runs/<dataset>/<model>.pt].")] = None,
    epochs: EpochsOpt = 15,
    recipe: Annotated[RecipeName, typer.Option(help="Hyper-parameter recipe (adamw: the teachers' default; "
                                                    f"{STUDENT_RECIPE}: the students').")] = RecipeName[TEACHER_RECIPE],
    lr: LrOpt = None,
    batch_size: BatchSizeOpt = None,
    weight_decay: WeightDecayOpt = None,
    val_fraction: ValFractionOpt = DEFAULT_VAL_FRACTION,
    stem: Annotated[Stem, typer.Option(help="imagenet (original, fast at 32x32) or cifar (3x3, no pool).")]
    = Stem[DEFAULT_STEM],
    pretrained: Annotated[Path | None, typer.Option(help="Local torchvision-format state_dict to start from (a "
                                                         "classifier for another class count is re-initialised).")]
    = None,
    image_size: ImageSizeOpt = None,
    workers: WorkersOpt = None,
    data_dir: DataDirOpt = None,
    download: Annotated[bool, typer.Option(help="Download CIFAR through torchvision if missing.")] = False,
    resume: ResumeOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Train a classifier (a teacher) with cross-entropy."""
    path = out or trained_path(dataset, model)
    metrics = train_classifier(model, dataset, path, epochs=epochs,
                               recipe=model_recipe(recipe.value, model, lr=lr, batch_size=batch_size,
                                                   weight_decay=weight_decay),
                               seed=seed, stem=stem.value, data_dir=data_dir,
                               pretrained=str(pretrained) if pretrained else None, device=device, resume=resume or None,
                               download=download, val_fraction=val_fraction, image_size=image_size, workers=workers)
    emit([{"checkpoint": str(path), **metrics}], "trained", as_json)


@command
def distill(
    pair: Annotated[str, typer.Option(help="Pair name (see `kdexport pairs`) or TEACHER:STUDENT.")],
    teacher: Annotated[Path, typer.Option(help="Trained teacher checkpoint.")],
    out: Annotated[Path | None, typer.Option(help=f"Student checkpoint [next to the teacher: {STUDENT_FILE}].")]
    = None,
    method: Annotated[DistillMethod, typer.Option(help="simkd (feature loss, reused classifier) or kd.")]
    = DistillMethod.simkd,
    projector_factor: Annotated[int, typer.Option(help="SimKD projector reduction factor f.")] = 2,
    temperature: Annotated[float, typer.Option(help="KD temperature T.")] = 4.0,
    alpha: Annotated[float, typer.Option(help="KD weight of the soft loss.")] = 0.9,
    cls_weight: Annotated[float, typer.Option(help="SimKD: cross-entropy weight through the teacher classifier "
                                                   "(0 = the official pure-MSE objective).")] = 1.0,
    official_simkd: OfficialOpt = False,
    epochs: EpochsOpt = 15,
    recipe: RecipeOpt = RecipeName[STUDENT_RECIPE],
    lr: LrOpt = None,
    batch_size: BatchSizeOpt = None,
    weight_decay: WeightDecayOpt = None,
    pretrained: Annotated[Path | None, typer.Option(help="Local torchvision-format state_dict for the student's "
                                                         "backbone.")] = None,
    image_size: SpecSizeOpt = None,
    workers: WorkersOpt = None,
    data_dir: DataDirOpt = None,
    resume: ResumeOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Distil a student from a trained teacher (SimKD by default); it uses the teacher's train/val split."""
    config = (DistillConfig.official(projector_factor=projector_factor) if official_simkd else
              DistillConfig(method.value, projector_factor, temperature, alpha, cls_weight))
    path = out or teacher.with_name(STUDENT_FILE)
    metrics = run_distill(teacher, pair, path, config=config,
                          recipe=model_recipe(recipe.value, zoo.resolve_pair(pair).student, lr=lr,
                                              batch_size=batch_size, weight_decay=weight_decay),
                          epochs=epochs, seed=seed, data_dir=data_dir, device=device, resume=resume or None,
                          image_size=image_size, workers=workers, pretrained=pretrained)
    emit([{"checkpoint": str(path), **metrics}], "distilled", as_json)


@command
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A kdexport checkpoint.")],
    dataset: Annotated[str | None, typer.Option(help="Dataset [the checkpoint's].")] = None,
    image_size: SpecSizeOpt = None,
    workers: WorkersOpt = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Top-1/top-5 accuracy and honest parameter counts of a checkpoint."""
    row = evaluate_checkpoint(checkpoint, dataset, data_dir, device, image_size, workers)
    emit([row], f"evaluate {checkpoint.name}", as_json, payload=row)
