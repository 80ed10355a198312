"""The results store DIR/results.sqlite: one row per finished cell, written by the sweep driver alone.

Each row is its own transaction (WAL, synchronous=FULL) under primary key (pair, dataset, method, level, repeat):
a crash loses at most the cells in flight and duplicates are impossible. Tables: `results`, `stages` (the
teachers and students the cells share) and `meta` (the sweep's settings, so a rerun cannot mix settings).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import ConfigError, DataError
from ..runid import run_differences
from ..stats import read_results_csv
from ..vocab import PARAM_COLUMNS, STORE_NAME, norm_level

KEY = ("pair", "dataset", "method", "level", "repeat")
# (column, SQL type) after the key; anything else a cell returns goes to the JSON column `extra`
COLUMNS = (
    ("seed", "INTEGER"), ("top1", "REAL"), ("top5", "REAL"), ("params_nonzero", "INTEGER"),
    ("student_params", "INTEGER"), ("deployed_params", "INTEGER"), ("macs", "INTEGER"),
    ("effective_macs", "INTEGER"), ("perf_efficiency", "REAL"), ("deployed_efficiency", "REAL"),
    ("backend", "TEXT"), ("latency_b1_ms", "REAL"), ("latency_bN_ms", "REAL"), ("latency_efficiency", "REAL"),
    ("layer_sparsity", "TEXT"), ("duration_s", "REAL"), ("host", "TEXT"), ("torch_version", "TEXT"),
    ("kdexport_version", "TEXT"), ("versions", "TEXT"), ("checkpoint", "TEXT"), ("finished_at", "TEXT"),
    ("extra", "TEXT"), ("val_top1", "REAL"),
)
JSON_COLUMNS = ("layer_sparsity", "versions", "extra")
STAGE_COLUMNS = ("dataset", "pair", "stage", "repeat", "seed", "model", "top1", "top5", "params",
                 "params_nonzero", "deployed_params", "path", "duration_s", "host", "finished_at")


class ResultsStore:
    """DIR/results.sqlite: table `results` (one row per cell), `stages` (teachers, students), `meta`.

    `create=False` opens an existing store read-only (SQLite `mode=ro`): readers never write, and a database
    without kdexport's tables is refused rather than given them.
    """

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        self.read_only = not create
        if not create:
            self.db = self._open_read_only()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            cols = ", ".join(f"{c} {t}" for c, t in COLUMNS)
            self.db.execute("CREATE TABLE IF NOT EXISTS results (pair TEXT NOT NULL, dataset TEXT NOT NULL, "
                            "method TEXT NOT NULL, level REAL NOT NULL, repeat INTEGER NOT NULL, "
                            f"{cols}, PRIMARY KEY (pair, dataset, method, level, repeat))")
            self.db.execute(f"CREATE TABLE IF NOT EXISTS stages ({', '.join(STAGE_COLUMNS)}, "
                            "PRIMARY KEY (dataset, pair, stage, repeat))")
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            have = {row[1] for row in self.db.execute("PRAGMA table_info(results)")}
            for c, t in COLUMNS:  # a store from before a column existed gains it (empty for its old rows)
                if c not in have:
                    self.db.execute(f"ALTER TABLE results ADD COLUMN {c} {t}")
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise DataError(f"{self.path} is not a kdexport results store ({exc}); pass another path") \
                from None

    def _open_read_only(self) -> sqlite3.Connection:
        if self.path.is_dir() and (self.path / STORE_NAME).is_file():
            self.path = self.path / STORE_NAME  # `report DIR` means DIR/results.sqlite
        if not self.path.is_file():
            raise DataError(f"results store not found: {self.path}; run `kdexport sweep --out DIR` first")
        db = sqlite3.connect(f"file:{quote(str(self.path.resolve()))}?mode=ro", uri=True, timeout=30,
                             isolation_level=None)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            have = {r[1] for r in db.execute("PRAGMA table_info(results)")}
        except sqlite3.DatabaseError as exc:
            db.close()
            raise DataError(f"{self.path} is not a kdexport results store ({exc}); pass the results.sqlite a "
                            "sweep wrote") from None
        if not ({"results", "stages", "meta"} <= tables and set(KEY) <= have):
            db.close()
            raise DataError(f"{self.path} is not a kdexport results store (no kdexport tables); pass the "
                            "results.sqlite a sweep wrote")
        return db

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close; a writer leaves the file in rollback-journal mode, so that read-only openers (stats, report, a
        copied or committed store) find no WAL to replay and leave no -wal/-shm files beside it. The next writer
        turns WAL on again; while another connection holds the database, the mode stays as it is."""
        if not self.read_only:
            with contextlib.suppress(sqlite3.OperationalError):
                self.db.execute("PRAGMA journal_mode=DELETE")
        self.db.close()

    def done_keys(self) -> set[tuple]:
        return {(p, d, m, norm_level(lv), int(r)) for p, d, m, lv, r in
                self.db.execute(f"SELECT {', '.join(KEY)} FROM results")}

    def write(self, row: Mapping[str, Any]) -> bool:
        """Insert one finished cell in its own transaction; False (nothing written) if it is already there."""
        known = {c for c, _ in COLUMNS}
        values = {k: row[k] for k in KEY}
        values["level"] = norm_level(values["level"])
        values.update({k: v for k, v in row.items() if k in known and k not in JSON_COLUMNS})
        extra = {k: v for k, v in row.items() if k not in known and k not in KEY}
        for k in JSON_COLUMNS:
            v = extra if k == "extra" else row.get(k)
            values[k] = None if v in (None, {}) else json.dumps(v, default=str)
        names = list(values)
        cur = self.db.execute(f"INSERT OR IGNORE INTO results ({', '.join(names)}) VALUES "
                              f"({', '.join('?' * len(names))})", [values[n] for n in names])
        return cur.rowcount == 1

    def rows(self, dataset: str | None = None) -> list[dict[str, Any]]:
        """All rows as dicts (JSON columns decoded, `extra` merged back), ordered by key."""
        cur = self.db.execute("SELECT * FROM results" + (" WHERE dataset = ?" if dataset else "") +
                              " ORDER BY dataset, pair, method, repeat, level", (dataset,) if dataset else ())
        names = [d[0] for d in cur.description]
        out = []
        for values in cur:
            row = dict(zip(names, values, strict=True))
            for k in JSON_COLUMNS:
                row[k] = json.loads(row[k]) if row[k] else None
            row.update(row.pop("extra") or {})
            out.append(row)
        return out

    def write_stage(self, info: Mapping[str, Any]) -> None:
        values = [info.get(c) for c in STAGE_COLUMNS]
        marks = ", ".join("?" * len(STAGE_COLUMNS))
        self.db.execute(f"INSERT OR REPLACE INTO stages VALUES ({marks})", values)

    def stages(self, dataset: str | None = None) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM stages" + (" WHERE dataset = ?" if dataset else "") +
                              " ORDER BY dataset, pair, stage, repeat", (dataset,) if dataset else ())
        return [dict(zip(STAGE_COLUMNS, v, strict=True)) for v in cur]

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Remember the sweep's settings; refuse to mix rows made with other ones."""
        found = self.db.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
        if found is None:
            text = json.dumps(settings, sort_keys=True)
            self.db.execute("INSERT INTO meta VALUES ('settings', ?)", (text,))
            return
        changed = run_differences(json.loads(found[0]), settings)
        if changed:
            raise ConfigError(f"{self.path} holds a sweep made with other {', '.join(changed)}; use the same "
                              "settings to resume it, or another --out")


# ---------------------------------------------------------------------------------------------- reading
def read_store(path: str | Path, dataset: str | None = None) -> tuple[list[dict], list[dict]]:
    """(result rows, stage rows) of a results store, for one dataset (required if it holds several)."""
    with ResultsStore(path, create=False) as store:
        rows, stages = store.rows(dataset), store.stages(dataset)
        datasets = sorted({r["dataset"] for r in store.rows()})
    if dataset is None and len(datasets) > 1:
        raise ConfigError(f"{path} holds results for {', '.join(datasets)}; pass --dataset to pick one")
    if not rows:
        where = f" for {dataset}" if dataset else ""
        raise DataError(f"{path} has no result rows{where}; run the sweep first")
    return rows, stages


def stats_rows(path: str | Path, params: str = "student", dataset: str | None = None) -> list[dict[str, Any]]:
    """Rows for kdexport.stats from a results store (.sqlite) or a CSV: pair, method, accuracy, params,
    repeat, level. `params`: "student" (non-zero backbone parameters, the paper's) or "deployed"."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return read_results_csv(path)
    if params not in PARAM_COLUMNS:
        raise ConfigError(f"--params must be one of {', '.join(PARAM_COLUMNS)}, got {params!r}")
    rows, _ = read_store(path, dataset)
    column = PARAM_COLUMNS[params]
    return [{"pair": r["pair"], "method": r["method"], "accuracy": r["top1"], "params": r[column],
             "repeat": r["repeat"], "level": r["level"],
             **({"val_accuracy": r["val_top1"]} if r.get("val_top1") is not None else {})} for r in rows]


__all__ = ["ResultsStore", "read_store", "stats_rows", "norm_level", "STORE_NAME", "PARAM_COLUMNS", "KEY",
           "COLUMNS"]
