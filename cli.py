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
from rich.markup import escape
from rich.table import Table

from kdexport.errors import CheckFailed, KdexportError, TrainingError
from kernels.errors import KernelConfigError
from models.errors import ModelError

app = typer.Typer(help="Distil, prune, export and profile image classifiers for small devices.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
stdout = Console(width=None if sys.stdout.isatty() else 200)  # piped: do not truncate columns
err = Console(stderr=True)

EXIT_FAILED, EXIT_USAGE = 1, 2


def command(fn):
    """Register a subcommand whose user errors become one stderr line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CheckFailed, TrainingError) as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_FAILED) from None
        except (KdexportError, ModelError, KernelConfigError) as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
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
        import torch

        with torch.device("meta"):  # shapes only: no weights are allocated or initialised
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
    cls_weight: Annotated[float, typer.Option(help="SimKD: cross-entropy weight through the teacher classifier "
                                                   "(0 = the official pure-MSE objective).")] = 1.0,
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

    config = DistillConfig(method.value, projector_factor, temperature, alpha, cls_weight)
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
    finetune_lr: Annotated[float, typer.Option(help="Fine-tuning learning rate (the paper's SGD recipe "
                                                    "otherwise).")] = 0.01,
    cls_weight: Annotated[float, typer.Option(help="SimKD: cross-entropy weight through the teacher classifier "
                                                   "(0 = the official pure-MSE objective).")] = 1.0,
    recipe: Annotated[RecipeName, typer.Option(help="Recipe for teacher and distillation.")] = RecipeName.simkd,
    stem: Annotated[Stem, typer.Option(help="imagenet (fast at 32x32) or cifar.")] = Stem.imagenet,
    scope: Annotated[str | None, typer.Option(help="global or layer [global for weight, layer for channel].")]
    = None,
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
                    finetune_scope=finetune_scope, finetune_lr=finetune_lr, cls_weight=cls_weight,
                    recipe=recipe.value, seed=seed, device=device, stem=stem.value, scope=scope, round_to=round_to,
                    w1=w1, w2=w2, tolerance=tolerance,
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


class BackendName(str, Enum):
    auto = "auto"
    torch = "torch"
    torch_sparse = "torch-sparse"
    ort_cpu = "ort-cpu"
    ort_cuda = "ort-cuda"
    ort_trt = "ort-trt"
    tensorrt = "tensorrt"


@command
def profile(
    artifact: Annotated[Path, typer.Argument(help="A checkpoint (.pt), an ONNX model or a TensorRT engine.")],
    backend: Annotated[BackendName, typer.Option(help="Runtime to measure; auto picks the fastest here.")]
    = BackendName.auto,
    device: Annotated[str | None, typer.Option(help="cpu or cuda [cuda for GPU-only backends].")] = None,
    batch: Annotated[str, typer.Option(help="Comma list of batch sizes.")] = "1,8,32",
    warmup: Annotated[int, typer.Option(help="Untimed warm-up queries per batch size.")] = 10,
    iters: Annotated[int, typer.Option(help="Timed queries per batch size.")] = 50,
    threads: Annotated[int | None, typer.Option(help="CPU threads [all this process may use].")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure single-stream latency (p50/p90/p99), throughput and peak memory of an artifact."""
    from kdexport.errors import ConfigError
    from kdexport.profile import ProfileConfig
    from kdexport.profile import profile as run_profile

    try:
        sizes = tuple(int(b) for b in split_csv(batch))
    except ValueError:
        raise ConfigError(f"--batch takes a comma list of integers, got {batch!r}") from None
    result = run_profile(artifact, ProfileConfig(backend.value, device, sizes, warmup, iters, threads))
    for note in result.notes:
        err.print(f"note: {note}", highlight=False)
    if as_json:
        emit([], "", True, payload=result.to_dict())
        return
    env = result.environment
    rows = [{"batch": r.batch, "p50 ms": r.p50_ms, "p90 ms": r.p90_ms, "p99 ms": r.p99_ms, "mean ms": r.mean_ms,
             "std ms": r.std_ms, "images/s": r.throughput_ips, "peak RSS MiB": r.peak_rss_mb} for r in result.results]
    where = env.get("gpu") if result.device == "cuda" else env.get("cpu_model")
    emit(rows, f"{artifact.name}: {result.backend} on {result.device} ({where}), {result.threads} threads, "
         f"{result.artifact_bytes or 0:,} bytes", False)


# --------------------------------------------------------------------- study: sweep, stats, report, compare
class Executor(str, Enum):
    local = "local"
    ray = "ray"


class ParamsKind(str, Enum):
    student = "student"
    deployed = "deployed"


ParamsOpt = Annotated[ParamsKind, typer.Option(
    "--params", help="Parameters in the efficiency: student (non-zero backbone, the paper's) or deployed.")]
W1Opt = Annotated[float, typer.Option("--w1", help="Efficiency weight of accuracy.")]
W2Opt = Annotated[float, typer.Option("--w2", help="Efficiency weight of parameters.")]
ToleranceOpt = Annotated[float, typer.Option(help="Breakpoint tolerance in accuracy points.")]


@command
def sweep(
    pairs: Annotated[str, typer.Option(help="Comma list of pairs / TEACHER:STUDENT, or all.")],
    out: Annotated[Path, typer.Option(help="Study directory (results.sqlite + stage checkpoints).")],
    dataset: Annotated[str, typer.Option(help="Dataset.")] = "digits",
    methods: Annotated[str, typer.Option(help="Comma list of weight, channel.")] = "weight,channel",
    levels: Annotated[str, typer.Option(help="START:STOP:STEP (STOP included) or a comma list.")] = "0:0.9:0.1",
    repeats: Annotated[int, typer.Option(help="Repeats (seed + r) of distillation, pruning, fine-tuning.")] = 3,
    executor: Annotated[Executor, typer.Option(help="local (in process) or ray (one task per cell).")]
    = Executor.local,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join [start a local instance].")] = None,
    profile: Annotated[str | None, typer.Option(help="Measure latency with this backend (e.g. torch, ort-cpu).")]
    = None,
    teacher_epochs: Annotated[int, typer.Option(help="Teacher training epochs.")] = 12,
    distill_epochs: Annotated[int, typer.Option(help="Distillation epochs.")] = 12,
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs after pruning.")] = 2,
    finetune_lr: Annotated[float | None, typer.Option(help="Fine-tuning learning rate [0.01].")] = None,
    data_dir: DataDirOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Run the study (pairs x methods x levels x repeats), resumable; one row per cell in OUT/results.sqlite."""
    from kdexport.sweep import SweepConfig, import_ray, parse_levels, parse_methods, parse_pairs, run_sweep

    if executor is Executor.ray:
        import_ray()
    config = SweepConfig(pairs=parse_pairs(pairs), levels=parse_levels(levels), out=out, dataset=dataset,
                         methods=parse_methods(methods), repeats=repeats, seed=seed, teacher_epochs=teacher_epochs,
                         distill_epochs=distill_epochs, finetune_epochs=finetune_epochs, profile=profile,
                         device=device, data_dir=str(data_dir) if data_dir else None,
                         options={} if finetune_lr is None else {"finetune_lr": finetune_lr})
    summary = run_sweep(config, executor.value, address=address,
                        log=lambda msg: err.print(msg, highlight=False, soft_wrap=True))
    emit([summary], "sweep", as_json, payload=summary)


@command
def stats(
    results: Annotated[Path, typer.Argument(help="A results store (.sqlite) or CSV (pair,method,accuracy,params"
                                                 "[,repeat][,level]).")],
    w1: W1Opt = 0.5,
    w2: W2Opt = 0.5,
    tolerance: ToleranceOpt = 1.0,
    params: ParamsOpt = ParamsKind.student,
    dataset: Annotated[str | None, typer.Option(help="Dataset, when the store holds several.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Paired t-test of channel vs weight efficiency across pairs (and Welch per pair over repeats)."""
    from kdexport.stats import run_stats
    from kdexport.sweep import stats_rows

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
    dataset: Annotated[str | None, typer.Option(help="Dataset, when the store holds several.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Figures (accuracy vs parameters, efficiency, per-layer sparsity, t-test, latency) and one HTML page."""
    from kdexport.report import build_report

    res = build_report(results, out, dataset=dataset, w1=w1, w2=w2, tolerance=tolerance)
    for note in res["notes"]:
        err.print(f"note: {note}", highlight=False, soft_wrap=True)
    emit([{"file": f} for f in [res["html"], *res["figures"]]], "report", as_json, payload=res)


@command
def compare(
    ckpt_a: Annotated[Path, typer.Argument(help="First checkpoint.")],
    ckpt_b: Annotated[Path, typer.Argument(help="Second checkpoint.")],
    dataset: Annotated[str | None, typer.Option(help="Dataset whose test split is used [A's].")] = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Where two models disagree: differing predictions, logit and weight L2 distances, accuracies."""
    from kdexport.compare import compare_checkpoints

    res = compare_checkpoints(ckpt_a, ckpt_b, dataset, data_dir, device)
    emit([{"metric": k, "value": v} for k, v in res.items() if k not in ("a", "b")],
         f"compare {ckpt_a.name} vs {ckpt_b.name}", as_json, payload=res)


# ---------------------------------------------------------------------------------------------- export
class ExportFormat(str, Enum):
    """--format choices (kdexport.export.FORMAT_NAMES); trt is an alias of tensorrt."""

    onnx = "onnx"
    tensorrt = "tensorrt"
    trt = "trt"


class Int8Target(str, Enum):
    tensorrt = "tensorrt"
    cpu = "cpu"


@command
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A kdexport checkpoint (trained, distilled or pruned).")],
    format_: Annotated[ExportFormat, typer.Option("--format", "-f", help="onnx (CPU or GPU) or tensorrt/trt "
                                                  "(an engine for this GPU).")] = ExportFormat.onnx,
    opset: Annotated[int | None, typer.Option(help="ONNX opset, 13..20 [18].")] = None,
    batch: Annotated[int | None, typer.Option(help="Static batch size; with --dynamic the optimisation batch "
                                              "[1].")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Dynamic batch axis (TensorRT profile 1..max(2N,32))."
                                          )] = False,
    half: Annotated[bool, typer.Option("--half", help="fp16 engine (tensorrt).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="INT8 QDQ by ONNX Runtime static quantisation; TensorRT "
                                       "builds it with explicit quantisation.")] = False,
    int8_target: Annotated[Int8Target | None, typer.Option(help="INT8 recipe: tensorrt (symmetric, TensorRT's "
                                                           "Q/DQ placement; default) or cpu (ONNX Runtime's "
                                                           "U8S8, fast on CPUs).")] = None,
    calib: Annotated[int | None, typer.Option(help="Calibration images from the train split [128].")] = None,
    atol: Annotated[float | None, typer.Option(help="Parity tolerance on the logits, times max(1, max |logit|) "
                                               "(default: fp32 1e-3 ONNX Runtime, 2e-3 TensorRT; fp16 5e-2)."
                                               )] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda: where the PyTorch reference runs (cpu).")]
    = None,
    workspace: Annotated[int | None, typer.Option(help="TensorRT workspace limit in MiB [1024].")] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Test images for the int8 accuracy (all).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output file (default: exports/ next to the checkpoint)."
                                             )] = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a checkpoint to ONNX (fp32 / INT8) or a TensorRT engine, verified against PyTorch on real images."""
    from kdexport.export import ExportConfig
    from kdexport.export import export as run_export

    given = dict(opset=opset, batch=batch, dynamic=dynamic, half=half, int8=int8, calib=calib, atol=atol,
                 int8_target=int8_target.value if int8_target else None, device=device, workspace=workspace,
                 eval_limit=eval_limit, out=out, data_dir=data_dir)
    config = ExportConfig(format_.value, **{k: v for k, v in given.items() if v is not None and v is not False})
    result = run_export(checkpoint, config)
    emit(result.rows(), f"export {checkpoint.name} -> {Path(result.out).name}", as_json, payload=result.to_dict())


# ----------------------------------------------------------------------------------------------- prune
class PruneMethod(str, Enum):
    weight = "weight"
    channel = "channel"


class PruneScope(str, Enum):
    global_ = "global"
    layer = "layer"


class FinetuneScope(str, Enum):
    all = "all"
    head = "head"


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
    = FinetuneScope.all,
    teacher: Annotated[Path | None, typer.Option(help="Teacher checkpoint [teacher.pt next to CHECKPOINT].")] = None,
    lr: Annotated[float | None, typer.Option(help="Fine-tuning learning rate [0.01, paper recipe].")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory [the checkpoint's]; writes "
                                             "<method>-<amount>.pt.")] = None,
    data_dir: DataDirOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Prune a checkpoint by L1 magnitude (weights or channels), optionally fine-tune, and measure it."""
    from kdexport.prune import PruneConfig, prune_checkpoint
    from kdexport.train import get_recipe

    config = PruneConfig(method.value, amount, scope.value if scope else None, round_to, steps, rewind)
    path = (out or checkpoint.parent) / f"{config.method}-{config.amount:.2f}.pt"
    row = prune_checkpoint(checkpoint, config, path, finetune_epochs=finetune_epochs,
                           finetune_scope=finetune_scope.value, teacher_ckpt=teacher,
                           recipe=get_recipe("paper", lr=0.01 if lr is None else lr), seed=seed, data_dir=data_dir,
                           device=device)
    emit([{"metric": k, "value": v} for k, v in row.items()], f"prune {checkpoint.name} -> {path.name}", as_json,
         payload=row)


if __name__ == "__main__":
    app()
