"""Subcommands that prune: compress (the whole pipeline for one pair) and prune (one checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..data import DEFAULT_VAL_FRACTION
from ..pipeline import RunConfig
from ..pipeline import compress as run_compress
from ..prune import PruneConfig, prune_checkpoint
from ..summary import pm
from ..vocab import (
    BREAKPOINT_METHODS,
    DEFAULT_LEVELS,
    DEFAULT_STEM,
    FINETUNE_LR,
    FINETUNE_SCOPES,
    METHODS,
    SCOPES,
    STUDENT_EPOCHS,
    STUDENT_RECIPE,
    TEACHER_EPOCHS,
    TEACHER_RECIPE,
    finetune_recipe,
    level_file,
    parse_levels,
    parse_methods,
)
from .app import (
    DataDirOpt,
    DeviceOpt,
    FinetuneEpochsOpt,
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
    log,
    stdout,
)

PruneMethod = choices("PruneMethod", METHODS)
PruneScope = choices("PruneScope", SCOPES)
FinetuneScope = choices("FinetuneScope", FINETUNE_SCOPES)


@command
def compress(
    pair: Annotated[str, typer.Option(help="Pair name (see `kdexport pairs`) or TEACHER:STUDENT.")]
    = "dens169-mobilenet",
    dataset: Annotated[str, typer.Option(help="digits (embedded), cifar10, cifar100, mnist or imagefolder.")]
    = "digits",
    methods: Annotated[str, typer.Option(help=f"Comma list of pruning methods: {', '.join(METHODS)}.")]
    = ",".join(METHODS),
    levels: Annotated[str, typer.Option(help="Pruning levels: 0,0.3,0.5 or START:STOP:STEP (STOP included).")]
    = ",".join(f"{v:g}" for v in DEFAULT_LEVELS),
    repeats: Annotated[int, typer.Option(help="Repeats per level (seeds seed..seed+R-1).")] = 1,
    teacher: Annotated[Path | None, typer.Option(help="Reuse a trained teacher checkpoint.")] = None,
    teacher_pretrained: Annotated[Path | None, typer.Option(help="Local torchvision state_dict the teacher starts "
                                                                 "from (its classifier re-initialised).")] = None,
    student_pretrained: Annotated[Path | None, typer.Option(help="Local torchvision state_dict the students' "
                                                                 "backbones start from.")] = None,
    teacher_epochs: Annotated[int, typer.Option(help="Teacher training epochs.")] = TEACHER_EPOCHS,
    distill_epochs: Annotated[int, typer.Option(help="SimKD distillation epochs.")] = STUDENT_EPOCHS,
    finetune_epochs: FinetuneEpochsOpt = None,
    finetune_scope: Annotated[str, typer.Option(help="all, or head (projector only, as the paper).")] = "all",
    finetune_lr: Annotated[float, typer.Option(help=f"Fine-tuning learning rate (the {STUDENT_RECIPE} recipe "
                                                    "otherwise, no warm-up).")] = FINETUNE_LR,
    cls_weight: Annotated[float, typer.Option(help="SimKD: cross-entropy weight through the teacher classifier "
                                                   "(0 = the official pure-MSE objective).")] = 1.0,
    official_simkd: OfficialOpt = False,
    recipe: Annotated[RecipeName, typer.Option(help="Recipe for distillation and the student trained alone.")]
    = RecipeName[STUDENT_RECIPE],
    teacher_recipe: Annotated[RecipeName, typer.Option(help="Recipe for the teacher.")]
    = RecipeName[TEACHER_RECIPE],
    baseline: Annotated[bool, typer.Option(help="Also train the student alone (CE, same budget): the comparison "
                                                "that shows what distillation is worth.")] = True,
    val_fraction: ValFractionOpt = DEFAULT_VAL_FRACTION,
    stem: Annotated[Stem, typer.Option(help="imagenet (fast at 32x32) or cifar.")] = Stem[DEFAULT_STEM],
    scope: Annotated[str | None, typer.Option(help="global or layer [global for weight, layer for channel].")]
    = None,
    round_to: Annotated[int, typer.Option(help="Channel counts are rounded to multiples of this.")] = 8,
    tolerance: Annotated[float, typer.Option(help="Breakpoint: accuracy points allowed below unpruned.")] = 1.0,
    breakpoint: Annotated[str, typer.Option(help=f"Breakpoint method: {' or '.join(BREAKPOINT_METHODS)}.")]
    = BREAKPOINT_METHODS[0],
    w1: Annotated[float, typer.Option(help="Efficiency weight of accuracy.")] = 0.5,
    w2: Annotated[float, typer.Option(help="Efficiency weight of parameters / latency.")] = 0.5,
    profile: Annotated[str | None, typer.Option(help="Measure latency with this backend (torch, ort-cpu, ...).")]
    = None,
    profile_batch: Annotated[int, typer.Option(help="The larger batch size measured with --profile.")] = 32,
    out: Annotated[Path | None, typer.Option(help="Run directory [runs/<dataset>/<pair>].")] = None,
    force: Annotated[bool, typer.Option(help="Recompute stages that are already done.")] = False,
    image_size: ImageSizeOpt = None,
    workers: WorkersOpt = None,
    jobs: Annotated[int | None, typer.Option(help="Stages run at once after the student (the baseline and the "
                                                  "pruned levels), each on its share of the threads [one per "
                                                  "thread on a CPU with in-memory data, else 1].")] = None,
    data_dir: DataDirOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Run the whole pipeline: teacher -> SimKD student -> prune at each level -> fine-tune -> measure."""
    cfg = RunConfig(pair=pair, dataset=dataset, data_dir=str(data_dir) if data_dir else None,
                    teacher_epochs=teacher_epochs, distill_epochs=distill_epochs, finetune_epochs=finetune_epochs,
                    finetune_scope=finetune_scope, finetune_lr=finetune_lr,
                    cls_weight=0.0 if official_simkd else cls_weight, match_bn=not official_simkd,
                    recipe=recipe.value, teacher_recipe=teacher_recipe.value, baseline=baseline,
                    val_fraction=val_fraction, seed=seed, device=device, stem=stem.value, scope=scope,
                    round_to=round_to, w1=w1, w2=w2, tolerance=tolerance,
                    breakpoint_method=breakpoint, profile=profile, profile_batch=profile_batch,
                    teacher=str(teacher) if teacher else None, image_size=image_size, workers=workers, jobs=jobs,
                    teacher_pretrained=str(teacher_pretrained) if teacher_pretrained else None,
                    student_pretrained=str(student_pretrained) if student_pretrained else None)
    result = run_compress(cfg, parse_methods(methods), parse_levels(levels), repeats, out, force, log=log)
    if as_json:
        emit([], "", True, payload={"run_dir": str(result.run_dir), "rows": result.rows, "table": result.table,
                                     "summary": result.summary, **result.references})
        return
    refs = [{"model": f"{name} ({cfg.pair_spec.teacher if name == 'teacher' else cfg.pair_spec.student})",
             "val top1 %": r["val_top1"], "test top1 %": r["top1"], "params": round(r["deployed_params"]),
             "MACs": round(r["macs"]), **({"b1 ms": r["latency_b1_ms"]} if r.get("latency_b1_ms") else {})}
            for name, r in result.references.items()]
    emit(refs, f"references, {cfg.pair_spec.name} on {dataset}", False)
    for method, rows in result.table.items():
        shown = []
        for r in rows:
            row = {"level": f"{r['level']:.0%}" + (" *" if r["breakpoint"] else ""),
                   "val top1 %": pm(r["val_top1"], r["val_top1_sd"]), "test top1 %": pm(r["top1"], r["top1_sd"]),
                   "nonzero params": round(r["params_nonzero"]), "deployed params": round(r["deployed_params"]),
                   "MACs": round(r["effective_macs"]), "efficiency": r["perf_efficiency"]}
            if r.get("latency_b1_ms"):
                row.update({"b1 ms": r["latency_b1_ms"], "b1 speedup": r["speedup_b1"],
                            f"b{profile_batch} ms": r["latency_bN_ms"], "latency eff.": r["latency_efficiency"]})
            shown.append(row)
        emit(shown, f"{method} pruning, {cfg.pair_spec.name} on {dataset} (* = breakpoint, chosen on val)", False)
    for line in result.summary:
        stdout.print(line, highlight=False)
    stdout.print(f"run directory: {result.run_dir}", highlight=False)


@command
def prune(
    checkpoint: Annotated[Path, typer.Argument(help="A trained or distilled kdexport checkpoint.")],
    method: Annotated[PruneMethod, typer.Option(help="weight (L1 unstructured masks) or channel (slimmer model).")],
    amount: Annotated[float, typer.Option(help="Fraction in [0, 1) of the remaining weights / channels to remove.")],
    scope: Annotated[PruneScope | None, typer.Option(help="global or layer ranking [weight: global, channel: "
                                                     "layer].")] = None,
    round_to: Annotated[int, typer.Option(help="Channel pruning keeps multiples of this many channels.")] = 8,
    steps: Annotated[int, typer.Option(help="Iterative pruning steps (fine-tuning after each).")] = 1,
    rewind: Annotated[bool, typer.Option("--rewind", help="Lottery-ticket rewinding to the input's weights after "
                                         "each step.")] = False,
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs per step.")] = 0,
    finetune_scope: Annotated[FinetuneScope, typer.Option(help="all, or head (projector / classifier only).")]
    = FinetuneScope[FINETUNE_SCOPES[0]],
    teacher: Annotated[Path | None, typer.Option(help="Teacher checkpoint [teacher.pt next to CHECKPOINT].")] = None,
    lr: Annotated[float | None, typer.Option(help=f"Fine-tuning learning rate [{FINETUNE_LR}, {STUDENT_RECIPE} "
                                                  "recipe, no warm-up].")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory [the checkpoint's]; writes "
                                             "<method>-<amount>.pt.")] = None,
    image_size: SpecSizeOpt = None,
    workers: WorkersOpt = None,
    data_dir: DataDirOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Prune a checkpoint by L1 magnitude (weights or channels), optionally fine-tune, and measure it."""
    config = PruneConfig(method.value, amount, scope.value if scope else None, round_to, steps, rewind)
    path = (out or checkpoint.parent) / level_file(config.method, config.amount)
    row = prune_checkpoint(checkpoint, config, path, finetune_epochs=finetune_epochs,
                           finetune_scope=finetune_scope.value, teacher_ckpt=teacher, recipe=finetune_recipe(lr),
                           seed=seed, data_dir=data_dir, device=device, image_size=image_size, workers=workers)
    emit([{"metric": k, "value": v} for k, v in row.items()], f"prune {checkpoint.name} -> {path.name}", as_json,
         payload=row)
