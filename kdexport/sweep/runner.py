"""What a sweep runs: the shared stages (teacher, students) and the cells, as picklable tasks for any executor."""

from __future__ import annotations

import datetime as dt
import socket
import time
from typing import Any, Protocol

import torch

from .. import __version__
from ..checkpoint import build_model, load_checkpoint, load_model
from ..manifest import versions
from ..metrics import layer_sparsity, param_counts
from ..models import is_distilled
from ..pipeline import RunConfig, ensure_student, ensure_teacher, run_level
from ..vocab import norm_level
from .config import Cell, SweepConfig


class Runner(Protocol):
    """What a sweep runs: the stage and cell work, shipped to Ray workers as is (so keep it picklable)."""

    def stage(self, config: SweepConfig, pair: str, repeat: int | None) -> dict[str, Any]: ...

    def cell(self, config: SweepConfig, cell: Cell) -> dict[str, Any]: ...


class PipelineRunner:
    """The real work: kdexport.pipeline stages, pruning, fine-tuning, measurement, per-layer sparsity."""

    def run_config(self, config: SweepConfig, pair: str):
        return RunConfig(pair=pair, dataset=config.dataset, data_dir=config.data_dir, seed=config.seed,
                         teacher_epochs=config.teacher_epochs, distill_epochs=config.distill_epochs,
                         finetune_epochs=config.finetune_epochs, device=config.device, profile=config.profile,
                         workers=config.workers, **dict(config.options))

    def stage(self, config: SweepConfig, pair: str, repeat: int | None) -> dict[str, Any]:
        """Ensure the pair's teacher (repeat None) or the repeat's student; return its summary."""
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
