"""The whole pipeline as resumable stages: teacher -> SimKD student -> prune (weight | channel) -> fine-tune -> measure.

A run directory (runs/<dataset>/<pair>/) holds one checkpoint per finished stage and a manifest.json. A stage
whose checkpoint exists, made with the same configuration, is reused; an interrupted training stage resumes
from its state file. `--force` recomputes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import platform
import socket
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from . import __version__, models
from .checkpoint import load_checkpoint, load_model, write_json
from .distill import DistillConfig, distill, distill_run
from .errors import CheckpointError, ConfigError
from .metrics import (
    count_macs,
    find_breakpoint,
    latency_breakpoint,
    latency_efficiency,
    param_counts,
    performance_efficiency,
)
from .profile import ProfileConfig, profile
from .prune import PruneConfig, prune_checkpoint
from .train import train_classifier, train_run
from .vocab import (
    DEFAULT_LEVELS,
    FINETUNE_SCOPES,
    MANIFEST_FILE,
    METHODS,
    RESULTS_FILE,
    RUNS_ROOT,
    STEMS,
    TEACHER_FILE,
    check_epochs,
    check_levels,
    check_methods,
    check_repeats,
    finetune_recipe,
    get_recipe,
    level_file,
    run_directory,
    student_file,
)


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run directory contains."""

    pair: str
    dataset: str = "digits"
    data_dir: str | None = None
    teacher_epochs: int = 12
    distill_epochs: int = 12
    finetune_epochs: int = 2
    finetune_scope: str = "all"
    recipe: str = "simkd"
    finetune_lr: float = 0.01
    seed: int = 0
    device: str | None = None
    stem: str = models.DEFAULT_STEM
    distill_method: str = "simkd"
    projector_factor: int = 2
    cls_weight: float = 1.0
    scope: str | None = None  # None: global for weight pruning, per layer for channel pruning
    round_to: int = 8
    w1: float = 0.5
    w2: float = 0.5
    tolerance: float = 1.0
    breakpoint_method: str = "tolerance"
    profile: str | None = None
    profile_batch: int = 32
    teacher: str | None = None  # a trained teacher checkpoint to reuse instead of training one

    def __post_init__(self):
        models.resolve_pair(self.pair)
        check_epochs(teacher_epochs=self.teacher_epochs, distill_epochs=self.distill_epochs,
                     finetune_epochs=self.finetune_epochs)
        if not self.finetune_lr > 0:
            raise ConfigError(f"--finetune-lr must be > 0, got {self.finetune_lr}")
        if self.finetune_scope not in FINETUNE_SCOPES:
            raise ConfigError(f"--finetune-scope must be {' or '.join(FINETUNE_SCOPES)}, got {self.finetune_scope!r}")
        if self.stem not in STEMS:
            raise ConfigError(f"unknown stem {self.stem!r}; choose one of: {', '.join(STEMS)}")
        if self.profile_batch < 1:
            raise ConfigError("--profile-batch must be >= 1")

    @property
    def pair_spec(self) -> models.Pair:
        return models.resolve_pair(self.pair)


def default_run_dir(cfg: RunConfig) -> Path:
    return run_directory(RUNS_ROOT, cfg.dataset, cfg.pair)


def versions() -> dict[str, str]:
    """The versions a manifest records; Torch-Pruning's from its package metadata (its __version__ lags)."""
    return {"kdexport": __version__, "torch": torch.__version__, "torch_pruning": version("torch-pruning"),
            "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------- manifest
def _manifest_path(run_dir: Path) -> Path:
    return run_dir / MANIFEST_FILE


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = _manifest_path(run_dir)
    if not path.is_file():
        return {"stages": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} is corrupt; delete it (stages are re-registered) or use another --out") from None


def record_stage(run_dir: Path, cfg: RunConfig, name: str, info: dict[str, Any]) -> None:
    """Mark a stage done in manifest.json (rewritten atomically)."""
    manifest = read_manifest(run_dir)
    manifest.update(config=dataclasses.asdict(cfg), versions=versions(), host=socket.gethostname())
    manifest["stages"][name] = {**info, "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_json(_manifest_path(run_dir), manifest)


def _reusable(path: Path, run: dict[str, Any], force: bool) -> bool:
    """True when `path` is a finished stage made by the same configuration; error when made by another."""
    if force or not path.is_file():
        return False
    run = json.loads(json.dumps(run))  # as stored: tuples become lists
    _, spec = load_checkpoint(path)
    if spec.get("run") != run:
        changed = sorted(k for k in set(run) | set(spec.get("run") or {}) if run.get(k) != (spec.get("run") or
                                                                                               {}).get(k))
        raise ConfigError(f"{path} was made with other settings ({', '.join(changed) or 'unknown'}); "
                          "pass --force to recompute it or --out for a new run directory")
    return True


# ------------------------------------------------------------------------------------------------ stages
def _recipe(cfg: RunConfig):
    return get_recipe(cfg.recipe)


def ensure_teacher(cfg: RunConfig, run_dir: Path, force: bool = False) -> Path:
    """The teacher checkpoint: the user's (--teacher), or run_dir/teacher.pt trained once."""
    pair = cfg.pair_spec
    if cfg.teacher:
        _, spec = load_checkpoint(cfg.teacher)
        if spec.get("kind") != "model" or spec.get("model") != pair.teacher:
            raise CheckpointError(f"{cfg.teacher} is not a trained {pair.teacher}; pair {pair.name} needs one")
        if spec.get("dataset") != cfg.dataset:
            raise CheckpointError(f"{cfg.teacher} was trained on {spec.get('dataset')}, not {cfg.dataset}")
        return Path(cfg.teacher)
    path = run_dir / TEACHER_FILE
    recipe = _recipe(cfg)
    run = train_run(pair.teacher, cfg.seed, cfg.teacher_epochs, recipe)
    if not _reusable(path, run, force):
        metrics = train_classifier(pair.teacher, cfg.dataset, path, epochs=cfg.teacher_epochs, recipe=recipe,
                                   seed=cfg.seed, stem=cfg.stem, data_dir=cfg.data_dir, device=cfg.device,
                                   resume=not force)
        record_stage(run_dir, cfg, "teacher", {"path": path.name, **metrics})
    return path


def ensure_student(cfg: RunConfig, run_dir: Path, force: bool = False, seed: int | None = None) -> Path:
    """The distilled student run_dir/student.pt (student-s<seed>.pt for other seeds), distilled once."""
    seed = cfg.seed if seed is None else seed
    teacher = ensure_teacher(cfg, run_dir, force)
    path = run_dir / student_file(seed, cfg.seed)
    config = DistillConfig(cfg.distill_method, cfg.projector_factor, cls_weight=cfg.cls_weight)
    recipe = _recipe(cfg)
    run = distill_run(cfg.pair_spec, seed, cfg.distill_epochs, recipe, config)
    if not _reusable(path, run, force):
        metrics = distill(teacher, cfg.pair, path, config=config, recipe=recipe, epochs=cfg.distill_epochs,
                          seed=seed, data_dir=cfg.data_dir, device=cfg.device, resume=not force)
        record_stage(run_dir, cfg, path.stem, {"path": path.name, **metrics})
    return path


def run_level(cfg: RunConfig, run_dir: Path, method: str, level: float, seed: int | None = None,
              force: bool = False, student_seed: int | None = None) -> dict[str, Any]:
    """Prune the distilled student to `level` with `method`, fine-tune, and measure it (one row).

    `force` recomputes this level only; the shared teacher and student are forced by `compress`.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    seed = cfg.seed if seed is None else seed
    t0 = time.perf_counter()
    student = ensure_student(cfg, run_dir, seed=student_seed)
    teacher = ensure_teacher(cfg, run_dir)
    if level == 0:
        path = student  # the unpruned student is level 0 of both methods
    else:
        config = PruneConfig(method=method, amount=level, scope=cfg.scope, round_to=cfg.round_to)
        path = run_dir / level_file(method, level, seed, cfg.seed)
        if not force and path.is_file():
            _check_level_settings(path, config, cfg)
        else:
            prune_checkpoint(student, config, path, finetune_epochs=cfg.finetune_epochs,
                             finetune_scope=cfg.finetune_scope, teacher_ckpt=teacher,
                             recipe=finetune_recipe(cfg.finetune_lr), seed=seed, data_dir=cfg.data_dir,
                             device=cfg.device)
            record_stage(run_dir, cfg, path.stem, {"path": path.name})
    row = measure(path, cfg)
    row.update(pair=cfg.pair_spec.name, dataset=cfg.dataset, method=method, level=float(level), seed=seed,
               duration_s=time.perf_counter() - t0, host=socket.gethostname(), checkpoint=str(path))
    return row


def _check_level_settings(path: Path, config, cfg: RunConfig) -> None:
    """A finished pruned checkpoint is reused only when it was made with the same pruning settings."""
    _, spec = load_checkpoint(path)
    prune = spec.get("prune") or {}
    lr = (prune.get("recipe") or {}).get("lr")
    made = (prune.get("method"), prune.get("amount"), prune.get("scope"), prune.get("finetune_epochs"),
            prune.get("finetune_scope"), lr if cfg.finetune_epochs else None)
    if made != (config.method, config.amount, config.scope, cfg.finetune_epochs, cfg.finetune_scope,
                cfg.finetune_lr if cfg.finetune_epochs else None):
        raise ConfigError(f"{path} was pruned with other settings; pass --force to recompute it")


def measure(path: Path, cfg: RunConfig) -> dict[str, Any]:
    """Accuracy (from the checkpoint), honest parameter counts, MACs, efficiency and, if asked, latency."""
    model, spec = load_model(path)
    acc = spec.get("metrics", {})
    if "top1" not in acc:
        raise CheckpointError(f"{path} has no recorded accuracy; evaluate it with `kdexport evaluate`")
    counts = param_counts(model)
    macs = count_macs(model, tuple(spec["input_size"]))
    row: dict[str, Any] = {
        "top1": acc["top1"], "top5": acc["top5"], "params_nonzero": counts.student_nonzero,
        "student_params": counts.student, "deployed_params": counts.deployed_nonzero,
        "macs": macs.dense, "effective_macs": macs.effective,
        "perf_efficiency": performance_efficiency(acc["top1"], counts.student_nonzero, cfg.w1, cfg.w2),
        "deployed_efficiency": performance_efficiency(acc["top1"], counts.deployed_nonzero, cfg.w1, cfg.w2),
    }
    if cfg.profile:
        result = profile(path, ProfileConfig(backend=cfg.profile, device=cfg.device if cfg.device not in (None, "auto")
                                             else None, batch_sizes=(1, cfg.profile_batch), warmup=5, iters=30))
        by_batch = {r.batch: r.p50_ms for r in result.results}
        row.update(backend=result.backend, latency_b1_ms=by_batch.get(1),
                   latency_bN_ms=by_batch.get(cfg.profile_batch),
                   latency_efficiency=latency_efficiency(acc["top1"], by_batch[1], cfg.w1, cfg.w2)
                   if by_batch.get(1) else None)
    return row


# ----------------------------------------------------------------------------------------------- compress
@dataclass
class CompressResult:
    run_dir: Path
    rows: list[dict[str, Any]]  # one per (method, level, repeat)
    table: dict[str, list[dict[str, Any]]]  # per method: rows averaged over repeats, breakpoint marked
    summary: list[str]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarise(rows: list[dict[str, Any]], cfg: RunConfig) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Average repeats, mark breakpoints, and answer "which student should I ship?" per method."""

    table: dict[str, list[dict[str, Any]]] = {}
    summary: list[str] = []
    for method in dict.fromkeys(r["method"] for r in rows):
        by_level: dict[float, list[dict[str, Any]]] = {}
        for r in rows:
            if r["method"] == method:
                by_level.setdefault(r["level"], []).append(r)
        out = []
        for level in sorted(by_level):
            group = by_level[level]
            avg = {k: _mean([g.get(k) for g in group]) for k in ("top1", "top5", "params_nonzero", "deployed_params",
                                                                  "macs", "effective_macs", "perf_efficiency",
                                                                  "latency_b1_ms", "latency_bN_ms",
                                                                  "latency_efficiency")}
            out.append({"level": level, "repeats": len(group), **avg})
        bp = find_breakpoint([r["level"] for r in out], [r["top1"] for r in out], cfg.tolerance,
                             cfg.breakpoint_method)
        for r in out:
            r["breakpoint"] = r["level"] == bp.level
        table[method] = out
        chosen = out[bp.index]
        summary.append(f"{method}: breakpoint at {bp.level:.0%} ({bp.method}, tolerance {cfg.tolerance:g} pt): "
                       f"top-1 {chosen['top1']:.2f}%, {chosen['params_nonzero']:,.0f} non-zero student params, "
                       f"{chosen['deployed_params']:,.0f} deployed, efficiency {chosen['perf_efficiency']:.3g}")
        if all(r.get("latency_b1_ms") for r in out):
            for r in out:
                r["speedup_b1"] = out[0]["latency_b1_ms"] / r["latency_b1_ms"]
                r["speedup_bN"] = (out[0]["latency_bN_ms"] / r["latency_bN_ms"]) if r.get("latency_bN_ms") else None
            lb = latency_breakpoint([r["level"] for r in out], [r["top1"] for r in out],
                                    [r["latency_b1_ms"] for r in out], cfg.tolerance)
            fast = out[lb.index]
            summary.append(f"{method} on {cfg.profile}: fastest within tolerance is {lb.level:.0%}: "
                           f"{fast['latency_b1_ms']:.3f} ms at batch 1 ({fast['speedup_b1']:.2f}x), "
                           f"top-1 {fast['top1']:.2f}%")
    candidates = [(m, r) for m, out in table.items() for r in out if r["top1"] >= out[0]["top1"] - cfg.tolerance]
    if candidates:
        key = "latency_b1_ms" if all(r.get("latency_b1_ms") for _, r in candidates) else None
        m, r = (min(candidates, key=lambda c: (c[1][key], -c[1]["level"])) if key else
                max(candidates, key=lambda c: c[1]["perf_efficiency"]))
        why = f"fastest on {cfg.profile} within tolerance" if key else "most efficient within tolerance"
        summary.append(f"ship: {m}-pruned student at {r['level']:.0%} ({why}): top-1 {r['top1']:.2f}%")
    return table, summary


def compress(cfg: RunConfig, methods=METHODS, levels=DEFAULT_LEVELS, repeats: int = 1, run_dir: Path | None = None,
             force: bool = False, log=print) -> CompressResult:
    """Run (or resume) the whole pipeline and return every measured row plus the per-method tables."""
    methods = check_methods(methods)
    check_repeats(repeats)
    levels = check_levels(levels)
    run_dir = Path(run_dir or default_run_dir(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    cells = [(m, lv, r) for r in range(repeats) for m in methods for lv in levels]
    log(f"run directory {run_dir}: teacher {cfg.pair_spec.teacher}, student {cfg.pair_spec.student}")
    ensure_student(cfg, run_dir, force)
    rows = []
    for i, (method, level, r) in enumerate(cells, 1):
        log(f"[{i}/{len(cells)}] {method} pruning at {level:.0%} (repeat {r + 1}/{repeats})")
        rows.append(run_level(cfg, run_dir, method, level, seed=cfg.seed + r, force=force))
    table, summary = summarise(rows, cfg)
    write_json(run_dir / RESULTS_FILE, {"config": dataclasses.asdict(cfg), "rows": rows, "table": table,
                                          "summary": summary})
    record_stage(run_dir, cfg, "compress", {"methods": list(methods), "levels": list(levels), "repeats": repeats})
    return CompressResult(run_dir, rows, table, summary)
