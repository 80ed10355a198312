"""The whole pipeline as resumable stages: teacher -> SimKD student -> prune (weight | channel) -> fine-tune -> measure.

A run directory (runs/<dataset>/<pair>/) holds one checkpoint per finished stage and a manifest.json. A stage
whose checkpoint exists, made with the same configuration, is reused; an interrupted training stage resumes
from its state file. `--force` recomputes.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from . import models
from .checkpoint import load_checkpoint, load_model, write_json
from .data import (
    DEFAULT_VAL_FRACTION,
    check_val_fraction,
    check_workers,
    dataset_info,
    default_image_size,
    parse_image_size,
    size_field,
)
from .distill import DistillConfig, distill, distill_run
from .errors import CheckpointError, ConfigError
from .jobs import check_jobs, run_side_by_side, stage_jobs
from .lock import output_lock
from .manifest import record_stage
from .metrics import count_macs, latency_efficiency, param_counts, performance_efficiency
from .preflight import check_device, check_output
from .profile import ProfileConfig, profile
from .prune import PruneConfig, prune_checkpoint
from .runid import check_same_run
from .summary import reference_lines, summarise
from .train import pick_device, train_classifier, train_run
from .vocab import (
    BASELINE_FILE,
    DEFAULT_LEVELS,
    FINETUNE_KEEP,
    FINETUNE_LR,
    FINETUNE_SCOPES,
    METHODS,
    RESULTS_FILE,
    RUNS_ROOT,
    STEMS,
    STUDENT_EPOCHS,
    STUDENT_RECIPE,
    TEACHER_EPOCHS,
    TEACHER_FILE,
    TEACHER_RECIPE,
    check_epochs,
    check_levels,
    check_methods,
    check_repeats,
    finetune_epochs,
    finetune_recipe,
    get_recipe,
    level_file,
    model_recipe,
    run_directory,
    student_file,
)


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run directory contains."""

    pair: str
    dataset: str = "digits"
    data_dir: str | None = None
    teacher_epochs: int = TEACHER_EPOCHS
    distill_epochs: int = STUDENT_EPOCHS
    finetune_epochs: int | None = None  # None: per method (vocab.FINETUNE_EPOCHS)
    finetune_scope: str = "all"
    recipe: str = STUDENT_RECIPE  # distillation and the student-alone baseline
    teacher_recipe: str = TEACHER_RECIPE
    finetune_lr: float = FINETUNE_LR
    val_fraction: float = DEFAULT_VAL_FRACTION
    baseline: bool = True  # also train the student alone, the comparison that shows what distillation is worth
    seed: int = 0
    device: str | None = None
    stem: str = models.DEFAULT_STEM
    distill_method: str = "simkd"
    projector_factor: int = 2
    cls_weight: float = 1.0
    match_bn: bool = True
    scope: str | None = None  # None: global for weight pruning, per layer for channel pruning
    round_to: int = 8
    w1: float = 0.5
    w2: float = 0.5
    tolerance: float = 1.0
    breakpoint_method: str = "tolerance"
    profile: str | None = None
    profile_batch: int = 32
    teacher: str | None = None  # a trained teacher checkpoint to reuse instead of training one
    image_size: tuple[int, int] | None = None  # (H, W); None: the dataset's default (data.default_image_size)
    workers: int | None = None  # DataLoader workers; None: data.default_workers
    jobs: int | None = None  # stages run side by side after the student; None: jobs.stage_jobs decides
    teacher_pretrained: str | None = None  # local torchvision state_dicts the teacher / the students start from
    student_pretrained: str | None = None

    def __post_init__(self):
        models.resolve_pair(self.pair)
        object.__setattr__(self, "image_size", parse_image_size(self.image_size))
        check_workers(self.workers, self.dataset)
        check_jobs(self.jobs)
        if self.teacher and self.teacher_pretrained:
            raise ConfigError("--teacher-pretrained is where a teacher that compress trains starts from; with "
                              "--teacher (an already trained one) drop it")
        for flag, path in (("--teacher-pretrained", self.teacher_pretrained),
                           ("--student-pretrained", self.student_pretrained)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{flag}: {path} is not a file; pass a local torchvision state_dict")
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
        check_val_fraction(self.val_fraction)
        for name in (self.recipe, self.teacher_recipe):
            get_recipe(name)  # an unknown recipe is one line now, not after the teacher has trained

    @property
    def pair_spec(self) -> models.Pair:
        return models.resolve_pair(self.pair)

    @property
    def size(self) -> tuple[int, int]:
        """The image size every stage of the run works at."""
        return self.image_size or default_image_size(self.dataset)

    @cached_property
    def augmentation(self) -> str:
        """What the run's training stages augment with (data.DatasetInfo.augmentation); read once, since for an
        image folder it scans the class folders."""
        return dataset_info(self.dataset, self.data_dir).augmentation


def default_run_dir(cfg: RunConfig) -> Path:
    return run_directory(RUNS_ROOT, cfg.dataset, cfg.pair)


def _reusable(path: Path, run: dict[str, Any], force: bool) -> bool:
    """True when `path` is a finished stage made by the same configuration; error when made by another."""
    if force or not path.is_file():
        return False
    _, spec = load_checkpoint(path)
    check_same_run(str(path), spec.get("run"), run, "pass --force to recompute it or --out for a new run directory")
    return True


# ------------------------------------------------------------------------------------------------ stages
def ensure_teacher(cfg: RunConfig, run_dir: Path, force: bool = False) -> Path:
    """The teacher checkpoint: the user's (--teacher), or run_dir/teacher.pt trained once."""
    pair = cfg.pair_spec
    if cfg.teacher:
        _, spec = load_checkpoint(cfg.teacher)
        if spec.get("kind") != "model" or spec.get("model") != pair.teacher:
            raise CheckpointError(f"{cfg.teacher} is not a trained {pair.teacher}; pair {pair.name} needs one")
        if spec.get("dataset") != cfg.dataset:
            raise CheckpointError(f"{cfg.teacher} was trained on {spec.get('dataset')}, not {cfg.dataset}")
        if tuple(spec["input_size"][1:]) != cfg.size:
            raise CheckpointError(f"{cfg.teacher} was trained at {'x'.join(map(str, spec['input_size'][1:]))} px, "
                                  f"not {'x'.join(map(str, cfg.size))}; pass --image-size "
                                  f"{','.join(map(str, spec['input_size'][1:]))} or train a teacher at this size")
        if spec.get("val_fraction") != cfg.val_fraction:
            raise CheckpointError(f"{cfg.teacher} was trained with --val-fraction {spec.get('val_fraction')}, so "
                                  f"it may have seen this run's validation images; pass --val-fraction "
                                  f"{spec.get('val_fraction')} or train a teacher with {cfg.val_fraction}")
        return Path(cfg.teacher)
    return _ensure_trained(cfg, run_dir, pair.teacher, TEACHER_FILE, cfg.teacher_epochs, cfg.teacher_recipe, force,
                           cfg.teacher_pretrained)


def ensure_baseline(cfg: RunConfig, run_dir: Path, force: bool = False) -> Path:
    """run_dir/baseline.pt: the student architecture trained alone with cross-entropy, with the distillation's
    budget, recipe, data and seed, so that the distilled student has the comparison that tells what KD is worth."""
    return _ensure_trained(cfg, run_dir, cfg.pair_spec.student, BASELINE_FILE, cfg.distill_epochs, cfg.recipe, force,
                           cfg.student_pretrained)


def _ensure_trained(cfg: RunConfig, run_dir: Path, model: str, name: str, epochs: int, recipe_name: str,
                    force: bool, pretrained: str | None) -> Path:
    path = run_dir / name
    recipe = model_recipe(recipe_name, model)
    run = train_run(model, cfg.seed, epochs, recipe, cfg.augmentation, cfg.val_fraction,
                    size_field(cfg.dataset, cfg.size), pretrained)
    if not _reusable(path, run, force):
        metrics = train_classifier(model, cfg.dataset, path, epochs=epochs, recipe=recipe, seed=cfg.seed,
                                   stem=cfg.stem, data_dir=cfg.data_dir, device=cfg.device,
                                   resume=False if force else None, val_fraction=cfg.val_fraction,
                                   image_size=cfg.size, workers=cfg.workers, pretrained=pretrained)
        record_stage(run_dir, cfg, path.stem, {"path": path.name, **metrics})
    return path


def ensure_student(cfg: RunConfig, run_dir: Path, force: bool = False, seed: int | None = None) -> Path:
    """The distilled student run_dir/student.pt (student-s<seed>.pt for other seeds), distilled once."""
    seed = cfg.seed if seed is None else seed
    teacher = ensure_teacher(cfg, run_dir, force)
    path = run_dir / student_file(seed, cfg.seed)
    config = DistillConfig(cfg.distill_method, cfg.projector_factor, cls_weight=cfg.cls_weight, match_bn=cfg.match_bn)
    recipe = model_recipe(cfg.recipe, cfg.pair_spec.student)
    run = distill_run(cfg.pair_spec, seed, cfg.distill_epochs, recipe, config, cfg.augmentation,
                      cfg.student_pretrained)
    if not _reusable(path, run, force):
        metrics = distill(teacher, cfg.pair, path, config=config, recipe=recipe, epochs=cfg.distill_epochs,
                          seed=seed, data_dir=cfg.data_dir, device=cfg.device, resume=False if force else None,
                          image_size=cfg.size, workers=cfg.workers, pretrained=cfg.student_pretrained)
        record_stage(run_dir, cfg, path.stem, {"path": path.name, **metrics})
    return path


def run_level(cfg: RunConfig, run_dir: Path, method: str, level: float, seed: int | None = None,
              force: bool = False, student_seed: int | None = None) -> dict[str, Any]:
    """Prune the distilled student to `level` with `method`, fine-tune, and measure it (one row).

    `force` recomputes this level only; the shared teacher and student are forced by `compress`.
    """
    t0 = time.perf_counter()
    path = level_checkpoint(cfg, run_dir, method, level, seed, force, student_seed)
    return level_row(cfg, path, time.perf_counter() - t0, method=method, level=level,
                     seed=cfg.seed if seed is None else seed)


def level_checkpoint(cfg: RunConfig, run_dir: Path, method: str, level: float, seed: int | None = None,
                     force: bool = False, student_seed: int | None = None) -> Path:
    """The checkpoint of one level, made once: the distilled student at 0, else the student pruned to `level`
    with `method` and fine-tuned."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    seed = cfg.seed if seed is None else seed
    student = ensure_student(cfg, run_dir, seed=student_seed)
    if level == 0:
        return student  # the unpruned student is level 0 of both methods
    config = PruneConfig(method=method, amount=level, scope=cfg.scope, round_to=cfg.round_to)
    path = level_path(cfg, run_dir, method, level, seed)
    if not force and path.is_file():
        _check_level_settings(path, config, cfg, finetune_recipe(cfg.finetune_lr))
    else:
        prune_checkpoint(student, config, path, finetune_epochs=finetune_epochs(method, cfg.finetune_epochs),
                         finetune_scope=cfg.finetune_scope, teacher_ckpt=ensure_teacher(cfg, run_dir),
                         recipe=finetune_recipe(cfg.finetune_lr), seed=seed, data_dir=cfg.data_dir,
                         device=cfg.device, workers=cfg.workers)
        record_stage(run_dir, cfg, path.stem, {"path": path.name})
    return path


def level_path(cfg: RunConfig, run_dir: Path, method: str, level: float, seed: int) -> Path:
    """Where a pruned level's checkpoint lives (a repeat's seed in its name)."""
    return run_dir / level_file(method, level, seed, cfg.seed)


def level_row(cfg: RunConfig, path: Path, duration_s: float, *, method: str, level: float, seed: int) -> dict[str, Any]:
    """The measured row of a level's checkpoint."""
    row = measure(path, cfg)
    row.update(pair=cfg.pair_spec.name, dataset=cfg.dataset, method=method, level=float(level), seed=seed,
               duration_s=duration_s, host=socket.gethostname(), checkpoint=str(path))
    return row


def _check_level_settings(path: Path, config, cfg: RunConfig, recipe) -> None:
    """A finished pruned checkpoint is reused only when it was made with the same pruning settings."""
    _, spec = load_checkpoint(path)
    prune = spec.get("prune") or {}
    epochs = finetune_epochs(config.method, cfg.finetune_epochs)
    wanted = {"method": config.method, "amount": config.amount, "scope": config.scope, "finetune_epochs": epochs,
              "finetune_scope": cfg.finetune_scope, "recipe": recipe.to_dict(),  # its loader recalibrates BN too
              "bn_recalibration": True, "keep_epoch": FINETUNE_KEEP if epochs else None}
    if config.method == "weight":
        wanted["min_layer_density"] = config.min_layer_density
    made = {k: prune.get(k) for k in wanted}
    check_same_run(str(path), made, wanted, "pass --force to recompute it")


def measure(path: Path, cfg: RunConfig) -> dict[str, Any]:
    """Accuracy (from the checkpoint), honest parameter counts, MACs, efficiency and, if asked, latency."""
    model, spec = load_model(path)
    acc = spec.get("metrics", {})
    if "top1" not in acc:
        raise CheckpointError(f"{path} has no recorded accuracy; evaluate it with `kdexport evaluate`")
    counts = param_counts(model)
    macs = count_macs(model, tuple(spec["input_size"]))
    row: dict[str, Any] = {
        "top1": acc["top1"], "top5": acc["top5"], "val_top1": acc.get("val_top1"),
        "params_nonzero": counts.student_nonzero, "student_params": counts.student,
        "deployed_params": counts.deployed_nonzero, "deployed_dense": counts.deployed,
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
    references: dict[str, dict[str, Any]]  # "teacher" and (unless disabled) "baseline": measured like a row


def compress(cfg: RunConfig, methods=METHODS, levels=DEFAULT_LEVELS, repeats: int = 1, run_dir: Path | None = None,
             force: bool = False, log=print) -> CompressResult:
    """Run (or resume) the whole pipeline and return every measured row plus the per-method tables."""
    methods = check_methods(methods)
    check_repeats(repeats)
    levels = check_levels(levels)
    run_dir = check_output(run_dir or default_run_dir(cfg), inputs=(cfg.teacher,), directory=True)
    check_device(cfg.device)
    with output_lock(run_dir, directory=True):
        return _compress(cfg, methods, levels, repeats, run_dir, force, log)


def _compress(cfg: RunConfig, methods, levels, repeats: int, run_dir: Path, force: bool, log) -> CompressResult:
    cells = [(m, lv, r) for r in range(repeats) for m in methods for lv in levels]
    log(f"run directory {run_dir}: teacher {cfg.pair_spec.teacher}, student {cfg.pair_spec.student}")
    student = ensure_student(cfg, run_dir, force)
    made = _after_student(cfg, run_dir, [c for c in cells if c[1] != 0], repeats, force, log)
    references = {"teacher": measure(ensure_teacher(cfg, run_dir), cfg)}
    if cfg.baseline:
        references["baseline"] = measure(made["baseline"][0], cfg)
    rows = [level_row(cfg, *made.get((m, lv, r), (student, 0.0)), method=m, level=lv, seed=cfg.seed + r)
            for m, lv, r in cells]
    table, summary = summarise(rows, cfg.tolerance, cfg.breakpoint_method, cfg.profile)
    student_row = next((r for r in rows if r["level"] == 0), None) or measure(student, cfg)
    summary = reference_lines(references, student_row, cfg.pair_spec, cfg.tolerance) + summary
    write_json(run_dir / RESULTS_FILE, {"config": dataclasses.asdict(cfg), "rows": rows, "table": table,
                                          "summary": summary, **{k: {**v, "test_top1": v["top1"]}
                                                                 for k, v in references.items()}})
    record_stage(run_dir, cfg, "compress", {"methods": list(methods), "levels": list(levels), "repeats": repeats})
    return CompressResult(run_dir, rows, table, summary, references)


class _Stage(NamedTuple):
    key: Any  # "baseline" or (method, level, repeat)
    name: str
    epochs: int  # how long it runs, for the order
    path: Path  # the checkpoint it makes
    make: Any  # the function that makes (or finds) its checkpoint
    args: tuple


def _after_student(cfg: RunConfig, run_dir: Path, cells, repeats: int, force: bool, log) -> dict[Any, tuple]:
    """Make the baseline and the pruned levels' checkpoints: {"baseline" | (method, level, repeat): (path, s)}.

    They need nothing but the teacher and the student, so the ones still to make run side by side
    (kdexport.jobs), the longest first; finished ones are checked here, with no worker forked for them. The parent
    measures every checkpoint afterwards, so that latency is never timed beside a training run.
    """
    stages = [_Stage("baseline", "baseline", cfg.distill_epochs, run_dir / BASELINE_FILE, ensure_baseline,
                     (cfg, run_dir, force))] if cfg.baseline else []
    stages += [_Stage((m, lv, r), f"{m} pruning at {lv:.0%}" + (f" (repeat {r + 1}/{repeats})" if repeats > 1 else ""),
                      finetune_epochs(m, cfg.finetune_epochs), level_path(cfg, run_dir, m, lv, cfg.seed + r),
                      level_checkpoint, (cfg, run_dir, m, lv, cfg.seed + r, force)) for m, lv, r in cells]
    found, todo = [], []
    for stage in stages:
        (found if not force and stage.path.is_file() else todo).append(stage)
    todo.sort(key=lambda stage: -stage.epochs)
    jobs = min(len(todo), stage_jobs(cfg.jobs, pick_device(cfg.device), check_workers(cfg.workers, cfg.dataset) == 0))
    if todo:
        log(f"{len(todo)} stage{'s' * (len(todo) != 1)} after the student, "
            + (f"{jobs} at a time" if jobs > 1 else "one at a time")
            + (f" ({len(found)} already made)" if found else ""))
    made = {stage.key: _timed(stage.make, *stage.args) for stage in found}  # each checks its settings here

    def done(i: int, result: tuple[Path, float]) -> None:
        log(f"[{len(made) - len(found) + 1}/{len(todo)}] {todo[i].name}: {result[1]:.0f} s")
        made[todo[i].key] = result

    run_side_by_side([(_timed, (stage.make, *stage.args)) for stage in todo], jobs, done)
    return made


def _timed(fn, *args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0
