"""A study's configuration: SweepConfig (pairs x methods x levels x repeats on one dataset) and its cells."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..vocab import (
    METHODS,
    STUDENT_EPOCHS,
    TEACHER_EPOCHS,
    check_epochs,
    check_levels,
    check_methods,
    check_pairs,
    check_repeats,
    norm_level,
    run_directory,
)

# settings that change what a row means: a rerun with other values must use another --out
SETTINGS = ("dataset", "seed", "teacher_epochs", "distill_epochs", "finetune_epochs", "profile", "options")


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
    teacher_epochs: int = TEACHER_EPOCHS
    distill_epochs: int = STUDENT_EPOCHS
    finetune_epochs: int | None = None  # None: per method (vocab.FINETUNE_EPOCHS)
    profile: str | None = None
    device: str | None = None
    data_dir: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    workers: int | None = None  # DataLoader workers: how the data is read, not what the study is

    def __post_init__(self):
        object.__setattr__(self, "pairs", check_pairs(self.pairs))
        object.__setattr__(self, "levels", check_levels(self.levels))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "methods", check_methods(self.methods))
        check_repeats(self.repeats)
        check_epochs(teacher_epochs=self.teacher_epochs, distill_epochs=self.distill_epochs,
                     finetune_epochs=self.finetune_epochs)

    def cells(self) -> list[Cell]:
        """All cells, grouped by (pair, repeat) so that a student's cells run together."""
        return [Cell(p, self.dataset, m, lv, r) for p in self.pairs for r in range(self.repeats)
                for m in self.methods for lv in self.levels]

    def run_dir(self, pair: str) -> Path:
        return run_directory(self.out, self.dataset, pair)

    def repeat_seed(self, repeat: int) -> int:
        return self.seed + repeat

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        return json.loads(json.dumps({k: d[k] for k in SETTINGS}, sort_keys=True, default=str))
