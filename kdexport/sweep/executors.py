"""Executors: run a sweep's pending cells in this process or as Ray tasks; only the driver writes the store."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, KdexportError, TrainingError
from ..lock import output_lock
from ..models import ModelError
from ..preflight import check_device, check_output
from ..vocab import EXECUTORS, STORE_NAME
from .config import Cell, SweepConfig
from .runner import PipelineRunner, Runner, run_cell, run_stage
from .store import ResultsStore

RAY_HINT = "pip install 'kdexport[distributed]'"


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
        if not isinstance(cause, (KdexportError, ModelError)) and not self.failed:
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
        import ray  # lazy: optional (kdexport[distributed])
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
    check_output(config.out / STORE_NAME)
    check_device(config.device)
    t0 = time.perf_counter()
    with output_lock(config.out / STORE_NAME), ResultsStore(config.out / STORE_NAME) as store:
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
