"""kdexport command line: parses options, calls the library, prints rich tables (or --json). No logic of its own.

Exit codes: 0 ok, 1 a failed check or run, 2 bad usage or input (one line on stderr, no traceback).
"""

from __future__ import annotations

import functools
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kdexport.errors import KdexportError, TrainingError

app = typer.Typer(help="Distil, prune, export and profile image classifiers for small devices.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
stdout = Console()
err = Console(stderr=True)

EXIT_FAILED, EXIT_USAGE = 1, 2


class CheckFailed(KdexportError):
    """A run finished but its check did not pass (exit 1)."""


def command(fn):
    """Register a subcommand whose user errors become one stderr line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CheckFailed, TrainingError) as exc:
            err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_FAILED) from None
        except KdexportError as exc:
            err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            err.print("interrupted; finished stages are kept, rerun the same command to resume")
            raise typer.Exit(130) from None

    return app.command()(wrapper)


def emit(rows: list[dict[str, Any]], title: str, as_json: bool, payload: Any = None) -> None:
    """Print rows as a rich table, or `payload` (default: the rows) as JSON on stdout."""
    if as_json:
        sys.stdout.write(json.dumps(rows if payload is None else payload, indent=2, default=str) + "\n")
        return
    table = Table(title=title)
    for key in rows[0] if rows else []:
        table.add_column(key, justify="right" if isinstance(rows[0][key], int | float) else "left")
    for row in rows:
        table.add_row(*(fmt(v) for v in row.values()))
    stdout.print(table)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return "" if v is None else str(v)


JsonOpt = Annotated[bool, typer.Option("--json", help="Write machine-readable JSON to stdout.")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Local dataset root (not needed for digits).")]
SeedOpt = Annotated[int, typer.Option(help="Random seed.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or auto.")]


class Stem(str, Enum):
    cifar = "cifar"
    imagenet = "imagenet"


class RecipeName(str, Enum):
    paper = "paper"
    simkd = "simkd"


class DistillMethod(str, Enum):
    simkd = "simkd"
    kd = "kd"


def recipe_from(name: RecipeName, lr: float | None, batch_size: int | None, weight_decay: float | None):
    from kdexport.train import get_recipe

    return get_recipe(name.value, lr=lr, batch_size=batch_size, weight_decay=weight_decay)


@command
def models(as_json: JsonOpt = False) -> None:
    """List the registered models."""
    import models as zoo

    rows = [{"name": n} for n in zoo.list_models()]
    emit(rows, "models", as_json, payload=[r["name"] for r in rows])


@command
def pairs(num_classes: Annotated[int, typer.Option(help="Classes for the parameter counts.")] = 100,
          as_json: JsonOpt = False) -> None:
    """List the teacher-student pairs with their parameter counts."""
    import models as zoo

    def n_params(name: str) -> int:
        return sum(p.numel() for p in zoo.create_model(name, num_classes).parameters())

    rows = [{"name": p.name, "teacher": p.teacher, "student": p.student, "teacher_params": n_params(p.teacher),
             "student_params": n_params(p.student)} for p in zoo.PAIRS.values()]
    emit(rows, f"pairs ({num_classes} classes)", as_json)


@command
def train(
    model: Annotated[str, typer.Option(help="Registered model name (see `kdexport models`).")],
    dataset: Annotated[str, typer.Option(help="digits, cifar10, cifar100, mnist or imagefolder.")] = "digits",
    out: Annotated[Path | None, typer.Option(help="Checkpoint path [runs/<dataset>/<model>.pt].")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 15,
    recipe: Annotated[RecipeName, typer.Option(help="Hyper-parameter recipe.")] = RecipeName.simkd,
    lr: Annotated[float | None, typer.Option(help="Override the recipe's learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Override the recipe's batch size.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Override the recipe's weight decay.")] = None,
    stem: Annotated[Stem, typer.Option(help="imagenet (original, fast at 32x32) or cifar (3x3, no pool).")]
    = Stem.imagenet,
    pretrained: Annotated[Path | None, typer.Option(help="Local torchvision-format state_dict to start from.")]
    = None,
    data_dir: DataDirOpt = None,
    download: Annotated[bool, typer.Option(help="Download CIFAR through torchvision if missing.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last epoch.")] = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Train a classifier (a teacher) with cross-entropy."""
    from kdexport.train import train_classifier

    path = out or Path("runs") / dataset / f"{model}.pt"
    metrics = train_classifier(model, dataset, path, epochs=epochs, recipe=recipe_from(recipe, lr, batch_size,
                               weight_decay), seed=seed, stem=stem.value, data_dir=data_dir,
                               pretrained=str(pretrained) if pretrained else None, device=device, resume=resume,
                               download=download)
    emit([{"checkpoint": str(path), **metrics}], "trained", as_json)


@command
def distill(
    pair: Annotated[str, typer.Option(help="Pair name (see `kdexport pairs`) or TEACHER:STUDENT.")],
    teacher: Annotated[Path, typer.Option(help="Trained teacher checkpoint.")],
    out: Annotated[Path | None, typer.Option(help="Student checkpoint [next to the teacher: student.pt].")] = None,
    method: Annotated[DistillMethod, typer.Option(help="simkd (feature loss, reused classifier) or kd.")]
    = DistillMethod.simkd,
    projector_factor: Annotated[int, typer.Option(help="SimKD projector reduction factor f.")] = 2,
    temperature: Annotated[float, typer.Option(help="KD temperature T.")] = 4.0,
    alpha: Annotated[float, typer.Option(help="KD weight of the soft loss.")] = 0.9,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 15,
    recipe: Annotated[RecipeName, typer.Option(help="Hyper-parameter recipe.")] = RecipeName.simkd,
    lr: Annotated[float | None, typer.Option(help="Override the recipe's learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Override the recipe's batch size.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Override the recipe's weight decay.")] = None,
    data_dir: DataDirOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last epoch.")] = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Distil a student from a trained teacher (SimKD by default)."""
    from kdexport.distill import DistillConfig
    from kdexport.distill import distill as run_distill

    config = DistillConfig(method.value, projector_factor, temperature, alpha)
    path = out or teacher.with_name("student.pt")
    metrics = run_distill(teacher, pair, path, config=config, recipe=recipe_from(recipe, lr, batch_size, weight_decay),
                          epochs=epochs, seed=seed, data_dir=data_dir, device=device, resume=resume)
    emit([{"checkpoint": str(path), **metrics}], "distilled", as_json)


@command
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A kdexport checkpoint.")],
    dataset: Annotated[str | None, typer.Option(help="Dataset [the checkpoint's].")] = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Top-1/top-5 accuracy and honest parameter counts of a checkpoint."""
    from kdexport.train import evaluate_checkpoint

    row = evaluate_checkpoint(checkpoint, dataset, data_dir, device)
    emit([row], f"evaluate {checkpoint.name}", as_json, payload=row)


def split_csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@command
def compress(
    pair: Annotated[str, typer.Option(help="Pair name (see `kdexport pairs`) or TEACHER:STUDENT.")]
    = "dens169-mobilenet",
    dataset: Annotated[str, typer.Option(help="digits (embedded), cifar10, cifar100, mnist or imagefolder.")]
    = "digits",
    methods: Annotated[str, typer.Option(help="Comma list of pruning methods: weight, channel.")] = "weight,channel",
    levels: Annotated[str, typer.Option(help="Pruning levels: 0,0.3,0.5 or start:stop:step.")] = "0,0.3,0.5,0.7,0.9",
    repeats: Annotated[int, typer.Option(help="Repeats per level (seeds seed..seed+R-1).")] = 1,
    teacher: Annotated[Path | None, typer.Option(help="Reuse a trained teacher checkpoint.")] = None,
    teacher_epochs: Annotated[int, typer.Option(help="Teacher training epochs.")] = 12,
    distill_epochs: Annotated[int, typer.Option(help="SimKD distillation epochs.")] = 12,
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs after pruning.")] = 2,
    finetune_scope: Annotated[str, typer.Option(help="all, or head (projector only, as the paper).")] = "all",
    recipe: Annotated[RecipeName, typer.Option(help="Recipe for teacher and distillation.")] = RecipeName.simkd,
    stem: Annotated[Stem, typer.Option(help="imagenet (fast at 32x32) or cifar.")] = Stem.imagenet,
    scope: Annotated[str, typer.Option(help="global or layer pruning.")] = "global",
    round_to: Annotated[int, typer.Option(help="Channel counts are rounded to multiples of this.")] = 8,
    tolerance: Annotated[float, typer.Option(help="Breakpoint: accuracy points allowed below unpruned.")] = 1.0,
    breakpoint: Annotated[str, typer.Option(help="Breakpoint method: tolerance or knee.")] = "tolerance",
    w1: Annotated[float, typer.Option(help="Efficiency weight of accuracy.")] = 0.5,
    w2: Annotated[float, typer.Option(help="Efficiency weight of parameters / latency.")] = 0.5,
    profile: Annotated[str | None, typer.Option(help="Measure latency with this backend (torch, ort-cpu, ...).")]
    = None,
    profile_batch: Annotated[int, typer.Option(help="The larger batch size measured with --profile.")] = 32,
    out: Annotated[Path | None, typer.Option(help="Run directory [runs/<dataset>/<pair>].")] = None,
    force: Annotated[bool, typer.Option(help="Recompute stages that are already done.")] = False,
    data_dir: DataDirOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Run the whole pipeline: teacher -> SimKD student -> prune at each level -> fine-tune -> measure."""
    from kdexport.pipeline import RunConfig, parse_levels
    from kdexport.pipeline import compress as run_compress

    cfg = RunConfig(pair=pair, dataset=dataset, data_dir=str(data_dir) if data_dir else None,
                    teacher_epochs=teacher_epochs, distill_epochs=distill_epochs, finetune_epochs=finetune_epochs,
                    finetune_scope=finetune_scope, recipe=recipe.value, seed=seed, device=device, stem=stem.value,
                    scope=scope, round_to=round_to, w1=w1, w2=w2, tolerance=tolerance,
                    breakpoint_method=breakpoint, profile=profile, profile_batch=profile_batch,
                    teacher=str(teacher) if teacher else None)
    result = run_compress(cfg, split_csv(methods), parse_levels(levels), repeats, out, force,
                          log=lambda msg: err.print(msg, highlight=False))
    if as_json:
        emit([], "", True, payload={"run_dir": str(result.run_dir), "rows": result.rows, "table": result.table,
                                     "summary": result.summary})
        return
    for method, rows in result.table.items():
        shown = []
        for r in rows:
            row = {"level": f"{r['level']:.0%}" + (" *" if r["breakpoint"] else ""), "top1 %": r["top1"],
                   "nonzero params": round(r["params_nonzero"]), "deployed params": round(r["deployed_params"]),
                   "MACs": round(r["effective_macs"]), "efficiency": r["perf_efficiency"]}
            if r.get("latency_b1_ms"):
                row.update({"b1 ms": r["latency_b1_ms"], "b1 speedup": r["speedup_b1"],
                            f"b{profile_batch} ms": r["latency_bN_ms"], "latency eff.": r["latency_efficiency"]})
            shown.append(row)
        emit(shown, f"{method} pruning, {cfg.pair_spec.name} on {dataset} (* = breakpoint)", False)
    for line in result.summary:
        stdout.print(line, highlight=False)
    stdout.print(f"run directory: {result.run_dir}", highlight=False)


if __name__ == "__main__":
    app()
