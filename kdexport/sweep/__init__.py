"""The paper's study as one resumable command: cells, local and Ray executors (the store is in .store).

A cell is (pair, dataset, method, level, repeat). Stages are shared, not retrained per cell:
- one teacher per pair, trained with the base seed (DIR/<dataset>/<pair>/teacher.pt);
- one SimKD student per (pair, repeat), distilled with seed = base seed + repeat (student[-s<seed>].pt);
- every cell of a (pair, repeat) prunes and fine-tunes that student with the repeat's seed.
The paper repeats the whole pipeline; retraining the teacher per repeat would multiply the cost by the
number of repeats for a source of variance the comparison of pruning methods does not depend on, so the
repeats vary distillation, pruning and fine-tuning only.

Each finished cell is one row in DIR/results.sqlite, written by the driver alone in its own transaction
(WAL, synchronous=FULL) with primary key (pair, dataset, method, level, repeat): a crash or Ctrl-C loses
at most the cells in flight, duplicates are impossible, and a rerun skips finished cells.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import models
from models import is_distilled

from ..errors import ConfigError, KdexportError, TrainingError
from .store import STORE_NAME, ResultsStore, norm_level, read_store, stats_rows

METHODS = ("weight", "channel")
EXECUTORS = ("local", "ray")
RAY_HINT = "pip install 'kdexport[distributed]'"
# settings that change what a row means: a rerun with other values must use another --out
SETTINGS = ("dataset", "seed", "teacher_epochs", "distill_epochs", "finetune_epochs", "profile", "options")


def parse_levels(text: str) -> tuple[float, ...]:
    """`START:STOP:STEP` (STOP included) or a comma list; every level in [0, 1), no duplicates."""
    try:
        if ":" in text:
            start, stop, step = (float(p) for p in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = int(round((stop - start) / step))
            levels = [norm_level(start + i * step) for i in range(n + 1) if start + i * step <= stop + 1e-9]
        else:
            levels = [norm_level(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--levels {text!r}: give START:STOP:STEP (e.g. 0:0.9:0.1) or a comma list "
                          "(e.g. 0,0.5,0.9)") from None
    return _check_levels(levels)


def _check_levels(levels: Iterable[float]) -> tuple[float, ...]:
    levels = tuple(norm_level(v) for v in levels)
    if not levels:
        raise ConfigError("--levels is empty; give at least one pruning level in [0, 1)")
    if any(not 0 <= v < 1 for v in levels):
        raise ConfigError(f"--levels must lie in [0, 1), got {', '.join(map(str, levels))}")
    if len(set(levels)) != len(levels):
        raise ConfigError(f"--levels has duplicates: {', '.join(map(str, levels))}")
    return tuple(sorted(levels))


def parse_pairs(text: str) -> tuple[str, ...]:
    """Comma list of pair names / TEACHER:STUDENT, or `all` (every registered pair, see `kdexport pairs`)."""
    names = list(models.PAIRS) if text.strip() == "all" else [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise ConfigError("--pairs is empty; give pair names, TEACHER:STUDENT, or all")
    return tuple(models.resolve_pair(n).name for n in names)


def parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not methods or any(m not in METHODS for m in methods):
        raise ConfigError(f"--methods {text!r}: give a comma list of {', '.join(METHODS)}")
    return methods


@dataclass(frozen=True)
class Cell:
    pair: str
    dataset: str
    method: str
    level: float
    repeat: int

    @property
    def key(self) -> tuple:
        return (self.pair, self.dataset, self.method, norm_level(self.level), self.repeat)


@dataclass(frozen=True)
class SweepConfig:
    """A study: pairs x methods x levels x repeats on one dataset. `options` go to pipeline.RunConfig."""

    pairs: tuple[str, ...]
    levels: tuple[float, ...]
    out: Path
    methods: tuple[str, ...] = METHODS
    repeats: int = 1
    dataset: str = "digits"
    seed: int = 0
    teacher_epochs: int = 12
    distill_epochs: int = 12
    finetune_epochs: int = 2
    profile: str | None = None
    device: str | None = None
    data_dir: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.pairs:
            raise ConfigError("--pairs is empty; give pair names, TEACHER:STUDENT, or all")
        object.__setattr__(self, "pairs", tuple(models.resolve_pair(p).name for p in self.pairs))
        object.__setattr__(self, "levels", _check_levels(self.levels))
        object.__setattr__(self, "out", Path(self.out))
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise ConfigError(f"--methods must be a subset of {', '.join(METHODS)}, got {self.methods}")
        if self.repeats < 1:
            raise ConfigError(f"--repeats must be >= 1, got {self.repeats}")
        for name in ("teacher_epochs", "distill_epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")

    def cells(self) -> list[Cell]:
        """All cells, grouped by (pair, repeat) so that a student's cells run together."""
        return [Cell(p, self.dataset, m, lv, r) for p in self.pairs for r in range(self.repeats)
                for m in self.methods for lv in self.levels]

    def run_dir(self, pair: str) -> Path:
        return self.out / self.dataset / pair.replace(":", "-")

    def repeat_seed(self, repeat: int) -> int:
        return self.seed + repeat

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        return json.loads(json.dumps({k: d[k] for k in SETTINGS}, sort_keys=True, default=str))


# ---------------------------------------------------------------------------------------------- runners
class Runner(Protocol):
    """What a sweep runs: the stage and cell work, shipped to Ray workers as is (so keep it picklable)."""

    def stage(self, config: SweepConfig, pair: str, repeat: int | None) -> dict[str, Any]: ...

    def cell(self, config: SweepConfig, cell: Cell) -> dict[str, Any]: ...


class PipelineRunner:
    """The real work: kdexport.pipeline stages, pruning, fine-tuning, measurement, per-layer sparsity."""

    def run_config(self, config: SweepConfig, pair: str):
        from ..pipeline import RunConfig

        return RunConfig(pair=pair, dataset=config.dataset, data_dir=config.data_dir, seed=config.seed,
                         teacher_epochs=config.teacher_epochs, distill_epochs=config.distill_epochs,
                         finetune_epochs=config.finetune_epochs, device=config.device, profile=config.profile,
                         **dict(config.options))

    def stage(self, config: SweepConfig, pair: str, repeat: int | None) -> dict[str, Any]:
        """Ensure the pair's teacher (repeat None) or the repeat's student; return its summary."""
        from ..checkpoint import load_model
        from ..metrics import param_counts
        from ..pipeline import ensure_student, ensure_teacher

        cfg, run_dir = self.run_config(config, pair), config.run_dir(pair)
        if repeat is None:
            path, seed = ensure_teacher(cfg, run_dir), config.seed
        else:
            seed = config.repeat_seed(repeat)
            path = ensure_student(cfg, run_dir, seed=seed)
        model, spec = load_model(path)
        counts = param_counts(model)
        return {"stage": "teacher" if repeat is None else "student",
                "repeat": -1 if repeat is None else repeat, "seed": seed,
                "model": spec.get("model") or spec.get("student"), "path": str(path),
                "top1": spec["metrics"]["top1"], "top5": spec["metrics"]["top5"], "params": counts.student,
                "params_nonzero": counts.student_nonzero, "deployed_params": counts.deployed_nonzero}

    def cell(self, config: SweepConfig, cell: Cell) -> dict[str, Any]:
        from ..checkpoint import build_model, load_checkpoint, load_model
        from ..metrics import layer_sparsity
        from ..pipeline import ensure_student, run_level, versions

        cfg, run_dir = self.run_config(config, cell.pair), config.run_dir(cell.pair)
        seed = config.repeat_seed(cell.repeat)
        row = run_level(cfg, run_dir, cell.method, cell.level, seed=seed, student_seed=seed)
        model, _ = load_model(row["checkpoint"])
        _, student_spec = load_checkpoint(ensure_student(cfg, run_dir, seed=seed))
        reference = build_model(student_spec)  # the unpruned architecture: removed channels count as pruned

        def backbone(m):
            return m.student if is_distilled(m) else m

        v = versions()
        row.update(layer_sparsity=layer_sparsity(backbone(model), backbone(reference)), versions=v,
                   torch_version=v["torch"], kdexport_version=v["kdexport"])
        return row


def run_stage(runner: Runner, config: SweepConfig, pair: str, repeat: int | None,
              *_after: Any) -> dict[str, Any]:
    """A stage as a task (`_after`: results of the stages it waits for, passed only to order Ray tasks)."""
    t0 = time.perf_counter()
    info = dict(runner.stage(config, pair, repeat))
    info.update(dataset=config.dataset, pair=pair, duration_s=time.perf_counter() - t0,
                host=socket.gethostname(), finished_at=_now())
    info.setdefault("stage", "teacher" if repeat is None else "student")
    info.setdefault("repeat", -1 if repeat is None else repeat)
    return info


def run_cell(runner: Runner, config: SweepConfig, cell: Cell, *_after: Any) -> dict[str, Any]:
    """A cell as a task: the runner's row plus key, seed, duration, host, versions and finish time."""
    import torch

    from .. import __version__

    t0 = time.perf_counter()
    row = dict(runner.cell(config, cell))
    row.update(pair=cell.pair, dataset=cell.dataset, method=cell.method, level=norm_level(cell.level),
               repeat=cell.repeat, duration_s=time.perf_counter() - t0, finished_at=_now())
    row.setdefault("seed", config.repeat_seed(cell.repeat))
    row.setdefault("host", socket.gethostname())
    row.setdefault("torch_version", torch.__version__)
    row.setdefault("kdexport_version", __version__)
    return row


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -------------------------------------------------------------------------------------------- executors
Log = Callable[[str], None]


@dataclass
class _Progress:
    store: ResultsStore
    total: int
    log: Log
    ran: int = 0
    failed: list[tuple[Cell, str]] = field(default_factory=list)

    def row(self, row: dict[str, Any]) -> None:
        if self.store.write(row):
            self.ran += 1
        self.log(f"[{self.ran}/{self.total}] {row['pair']} {row['method']} {row['level']:.2f} repeat "
                 f"{row['repeat']}: top1 {row.get('top1', float('nan')):.2f}% ({row['duration_s']:.1f} s)")

    def fail(self, cells: Iterable[Cell], exc: BaseException) -> None:
        cause = getattr(exc, "cause", None) or exc  # a RayTaskError wraps the task's exception
        msg = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
        cells = list(cells)
        if not isinstance(cause, (KdexportError, models.ModelError)) and not self.failed:
            self.log("".join(traceback.format_exception(cause)).rstrip())
        self.failed.extend((c, msg) for c in cells)
        for c in cells:
            self.log(f"failed: {c.pair} {c.method} {c.level:.2f} repeat {c.repeat}: {msg}")


def _groups(pending: list[Cell]) -> dict[tuple[str, int], list[Cell]]:
    groups: dict[tuple[str, int], list[Cell]] = {}
    for c in pending:
        groups.setdefault((c.pair, c.repeat), []).append(c)
    return groups


def _run_local(runner: Runner, config: SweepConfig, pending: list[Cell], progress: _Progress) -> None:
    teachers: dict[str, BaseException | None] = {}
    for (pair, repeat), cells in _groups(pending).items():
        try:
            if pair not in teachers:
                teachers[pair] = None
                progress.store.write_stage(run_stage(runner, config, pair, None))
            progress.store.write_stage(run_stage(runner, config, pair, repeat))
        except Exception as exc:  # a failed stage fails its cells; the others go on
            progress.fail(cells, exc)
            continue
        for cell in cells:
            try:
                progress.row(run_cell(runner, config, cell))
            except Exception as exc:
                progress.fail([cell], exc)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--executor ray needs Ray, which is not installed; {RAY_HINT}") from None
    return ray


def _run_ray(runner: Runner, config: SweepConfig, pending: list[Cell], progress: _Progress,
             address: str | None, init_kwargs: Mapping[str, Any] | None) -> None:
    """Stages and cells as Ray tasks (students wait for their teacher, cells for their student); only this
    driver writes the store, as each task finishes. The out directory must be on storage every node sees."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        kwargs = {"include_dashboard": False, "log_to_driver": True, **(init_kwargs or {})}
        if address is None:  # a local instance: make sure its workers import this checkout
            root = str(Path(__file__).resolve().parents[2])
            kwargs.setdefault("runtime_env", {"env_vars": {"PYTHONPATH": root}})
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"cannot start or join Ray at {address or 'a new local instance'} ({exc}); "
                              "check --address") from None
    try:
        gpu = ray.cluster_resources().get("GPU", 0) >= 1
        resources = {"num_gpus": 1} if gpu else {"num_cpus": 1}
        stage_task = ray.remote(**resources)(run_stage)
        cell_task = ray.remote(max_retries=1, **resources)(run_cell)
        what: dict[Any, tuple[str, Any]] = {}
        groups = _groups(pending)
        # a failed stage is reported through the cells that depend on it
        pairs = dict.fromkeys(p for p, _ in groups)
        teachers = {p: stage_task.remote(runner, config, p, None) for p in pairs}
        what.update({ref: ("stage", []) for ref in teachers.values()})
        for (pair, repeat), cells in groups.items():
            student = stage_task.remote(runner, config, pair, repeat, teachers[pair])
            what[student] = ("stage", [])
            for cell in cells:
                what[cell_task.remote(runner, config, cell, student)] = ("cell", [cell])
        left = list(what)
        try:
            while left:
                done, left = ray.wait(left, num_returns=1)
                kind, cells = what[done[0]]
                try:
                    value = ray.get(done[0])
                except Exception as exc:
                    if kind == "cell":
                        progress.fail(cells, exc)
                    continue
                if kind == "cell":
                    progress.row(value)
                else:
                    progress.store.write_stage(value)
        except KeyboardInterrupt:
            for ref in left:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


class SweepFailed(TrainingError):
    """Some cells failed; the finished ones are stored (exit 1)."""


def run_sweep(config: SweepConfig, executor: str = "local", *, address: str | None = None,
              runner: Runner | None = None, log: Log | None = None,
              ray_init: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the cells not yet in DIR/results.sqlite.

    Returns {store, cells, skipped, ran, failed, remaining, wall_s}.

    Raises SweepFailed (after storing every finished cell) when some cells failed.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; choose one of: {', '.join(EXECUTORS)}")
    if executor == "ray":
        import_ray()
    log = log or (lambda _msg: None)
    runner = runner or PipelineRunner()
    t0 = time.perf_counter()
    with ResultsStore(config.out / STORE_NAME) as store:
        store.check_settings(config.settings())
        cells = config.cells()
        done = store.done_keys()
        pending = [c for c in cells if c.key not in done]
        log(f"{len(cells)} cells: {len(cells) - len(pending)} already done, {len(pending)} remaining "
            f"(store {store.path})")
        progress = _Progress(store, len(pending), log)
        if pending:
            if executor == "ray":
                _run_ray(runner, config, pending, progress, address, ray_init)
            else:
                _run_local(runner, config, pending, progress)
        remaining = len([c for c in cells if c.key not in store.done_keys()])
    summary = {"store": str(config.out / STORE_NAME), "cells": len(cells),
               "skipped": len(cells) - len(pending), "ran": progress.ran, "failed": len(progress.failed),
               "remaining": remaining,
               "wall_s": round(time.perf_counter() - t0, 3)}
    if progress.failed:
        cell, msg = progress.failed[0]
        raise SweepFailed(f"{len(progress.failed)} of {len(pending)} cells failed (first: {cell.pair} "
                          f"{cell.method} {cell.level:.2f} repeat {cell.repeat}: {msg}); {remaining} "
                          "remaining, the finished ones are stored; fix the cause and rerun the same command")
    return summary


__all__ = ["Cell", "SweepConfig", "ResultsStore", "PipelineRunner", "run_sweep", "run_stage", "run_cell",
           "parse_levels", "parse_pairs", "parse_methods", "read_store", "stats_rows", "import_ray", "SweepFailed",
           "METHODS", "EXECUTORS", "STORE_NAME"]
