"""Subcommands of the study: sweep (cells, resumable, local or Ray), stats, report, compare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..compare import compare_checkpoints
from ..data import DEFAULT_VAL_FRACTION, parse_image_size
from ..report import build_report
from ..stats import run_stats
from ..sweep import SweepConfig, run_sweep, stats_rows
from ..vocab import (
    EXECUTORS,
    FINETUNE_LR,
    METHODS,
    PARAM_KINDS,
    STUDENT_EPOCHS,
    TEACHER_EPOCHS,
    parse_levels,
    parse_methods,
    parse_pairs,
)
from .app import (
    DataDirOpt,
    DeviceOpt,
    FinetuneEpochsOpt,
    ImageSizeOpt,
    JsonOpt,
    SeedOpt,
    SpecSizeOpt,
    ValFractionOpt,
    WorkersOpt,
    choices,
    command,
    emit,
    err,
    fmt,
    log,
)

Executor = choices("Executor", EXECUTORS)
ParamsKind = choices("ParamsKind", PARAM_KINDS)

ParamsOpt = Annotated[ParamsKind, typer.Option(
    "--params", help="Parameters in the efficiency: student (non-zero backbone, the paper's) or deployed.")]
W1Opt = Annotated[float, typer.Option("--w1", help="Efficiency weight of accuracy.")]
W2Opt = Annotated[float, typer.Option("--w2", help="Efficiency weight of parameters.")]
ToleranceOpt = Annotated[float, typer.Option(help="Breakpoint tolerance in accuracy points.")]
DatasetPickOpt = Annotated[str | None, typer.Option(help="Dataset, when the store holds several.")]


@command
def sweep(
    pairs: Annotated[str, typer.Option(help="Comma list of pairs / TEACHER:STUDENT, or all.")],
    out: Annotated[Path, typer.Option(help="Study directory (results.sqlite + stage checkpoints).")],
    dataset: Annotated[str, typer.Option(help="Dataset.")] = "digits",
    methods: Annotated[str, typer.Option(help=f"Comma list of {', '.join(METHODS)}.")] = ",".join(METHODS),
    levels: Annotated[str, typer.Option(help="START:STOP:STEP (STOP included) or a comma list.")] = "0:0.9:0.1",
    repeats: Annotated[int, typer.Option(help="Repeats (seed + r) of distillation, pruning, fine-tuning.")] = 3,
    executor: Annotated[Executor, typer.Option(help="local (in process) or ray (one task per cell).")]
    = Executor[EXECUTORS[0]],
    address: Annotated[str | None, typer.Option(help="Ray cluster to join [start a local instance].")] = None,
    profile: Annotated[str | None, typer.Option(help="Measure latency with this backend (e.g. torch, ort-cpu).")]
    = None,
    teacher_epochs: Annotated[int, typer.Option(help="Teacher training epochs.")] = TEACHER_EPOCHS,
    distill_epochs: Annotated[int, typer.Option(help="Distillation epochs.")] = STUDENT_EPOCHS,
    finetune_epochs: FinetuneEpochsOpt = None,
    finetune_lr: Annotated[float | None, typer.Option(help=f"Fine-tuning learning rate [{FINETUNE_LR}].")] = None,
    val_fraction: ValFractionOpt = DEFAULT_VAL_FRACTION,
    image_size: ImageSizeOpt = None,
    workers: WorkersOpt = None,
    data_dir: DataDirOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Run the study (pairs x methods x levels x repeats), resumable; one row per cell in OUT/results.sqlite."""
    config = SweepConfig(pairs=parse_pairs(pairs), levels=parse_levels(levels), out=out, dataset=dataset,
                         methods=parse_methods(methods), repeats=repeats, seed=seed, teacher_epochs=teacher_epochs,
                         distill_epochs=distill_epochs, finetune_epochs=finetune_epochs, profile=profile,
                         device=device, data_dir=str(data_dir) if data_dir else None,
                         options={"val_fraction": val_fraction,
                                  **({} if finetune_lr is None else {"finetune_lr": finetune_lr}),
                                  **({} if image_size is None else {"image_size": parse_image_size(image_size)})},
                         workers=workers)
    summary = run_sweep(config, executor.value, address=address, log=log)
    emit([summary], "sweep", as_json, payload=summary)


@command
def stats(
    results: Annotated[Path, typer.Argument(help="A results store (.sqlite) or CSV (pair,method,accuracy,params"
                                                 "[,repeat][,level]).")],
    w1: W1Opt = 0.5,
    w2: W2Opt = 0.5,
    tolerance: ToleranceOpt = 1.0,
    params: ParamsOpt = ParamsKind[PARAM_KINDS[0]],
    dataset: DatasetPickOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Paired t-test of channel vs weight efficiency across pairs (and Welch per pair over repeats)."""
    res = run_stats(stats_rows(results, params.value, dataset), w1, w2, tolerance)
    if as_json:
        emit([], "", True, payload=res)
        return
    rows = []
    for e in res["pairs"]:
        w, c = e["weight"] or {}, e["channel"] or {}
        rows.append({"pair": e["pair"], "weight": w.get("efficiency"), "channel": c.get("efficiency"),
                     "diff": e["diff"], "w level": w.get("level"), "c level": c.get("level"),
                     "n": max(w.get("repeats", 0), c.get("repeats", 0)), "welch p": (e["welch"] or {}).get("p")})
    emit(rows, f"efficiency at the breakpoint ({params.value} parameters, mean over n repeats)", False)
    ci = "n/a" if res["ci95"][0] is None else f"[{fmt(res['ci95'][0])}, {fmt(res['ci95'][1])}]"
    emit([{k: res[k] for k in ("t", "p", "df", "n_pairs", "mean_diff")} | {"ci95": ci, "effect_size":
          res["effect_size"]}], "paired t-test, channel - weight", False)


@command
def report(
    results: Annotated[Path, typer.Argument(help="A results store (.sqlite) or CSV.")],
    out: Annotated[Path, typer.Option(help="Directory for the PNG figures and index.html.")],
    w1: W1Opt = 0.5,
    w2: W2Opt = 0.5,
    tolerance: ToleranceOpt = 1.0,
    dataset: DatasetPickOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Figures (accuracy vs parameters, efficiency, per-layer sparsity, t-test, latency) and one HTML page."""
    res = build_report(results, out, dataset=dataset, w1=w1, w2=w2, tolerance=tolerance)
    for note in res["notes"]:
        err.print(f"note: {note}", highlight=False, soft_wrap=True)
    emit([{"file": f} for f in [res["html"], *res["figures"]]], "report", as_json, payload=res)


@command
def compare(
    ckpt_a: Annotated[Path, typer.Argument(help="First checkpoint.")],
    ckpt_b: Annotated[Path, typer.Argument(help="Second checkpoint.")],
    dataset: Annotated[str | None, typer.Option(help="Dataset whose test split is used [A's].")] = None,
    image_size: SpecSizeOpt = None,
    workers: WorkersOpt = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Where two models disagree: differing predictions, logit and weight L2 distances, accuracies."""
    res = compare_checkpoints(ckpt_a, ckpt_b, dataset, data_dir, device, image_size=image_size, workers=workers)
    emit([{"metric": k, "value": v} for k, v in res.items() if k not in ("a", "b")],
         f"compare {ckpt_a.name} vs {ckpt_b.name}", as_json, payload=res)
