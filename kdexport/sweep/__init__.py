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

from ..vocab import EXECUTORS, METHODS, STORE_NAME, parse_levels, parse_methods, parse_pairs
from .config import SETTINGS, Cell, SweepConfig
from .executors import RAY_HINT, SweepFailed, import_ray, run_sweep
from .runner import PipelineRunner, Runner, run_cell, run_stage
from .store import ResultsStore, read_store, stats_rows

__all__ = ["Cell", "SweepConfig", "SETTINGS", "ResultsStore", "PipelineRunner", "Runner", "run_sweep", "run_stage",
           "run_cell", "parse_levels", "parse_pairs", "parse_methods", "read_store", "stats_rows", "import_ray",
           "SweepFailed", "METHODS", "EXECUTORS", "STORE_NAME", "RAY_HINT"]
