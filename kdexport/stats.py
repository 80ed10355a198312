"""The paper's statistics: is channel pruning more efficient than weight pruning across teacher-student pairs?

Input is plain result rows (dicts, or records with the same attributes): `pair`, `method` ("weight" or
"channel"), `accuracy` (percent), `params` (a raw count; whichever count the caller chose, student or
deployed), optional `repeat` and optional `level` (pruning amount). With `level`, each (pair, method, repeat)
curve is reduced to its breakpoint (`kdexport.metrics.find_breakpoint`); without it each row already is the
chosen point. Efficiency is `metrics.performance_efficiency` (accuracy % / params in millions), averaged over
repeats; then a paired t-test of channel against weight across pairs, and a Welch test per pair over repeats.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from .errors import ConfigError, DataError
from .metrics import find_breakpoint, performance_efficiency
from .vocab import METHODS

REQUIRED = ("pair", "method", "accuracy", "params")
OPTIONAL = ("repeat", "level", "val_accuracy")
COLUMNS_HINT = "expected columns pair,method,accuracy,params and optionally repeat,level,val_accuracy"


def _num(value: Any) -> float | None:
    """A JSON-safe float: numpy scalars to Python, NaN / inf to None."""
    if value is None:
        return None
    f = float(value)
    return f if math.isfinite(f) else None


# ------------------------------------------------------------------------------------------------ input
def read_results_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results CSV (columns pair,method,accuracy,params[,repeat][,level]) as typed dicts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"results file not found: {path}; pass a CSV with {COLUMNS_HINT}")
    try:
        rows = _read_csv(path)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; save it as a UTF-8 CSV with {COLUMNS_HINT}") from None
    except csv.Error as exc:
        raise DataError(f"{path} is not a readable CSV ({exc}); pass a CSV with {COLUMNS_HINT}") from None
    if not rows:
        raise DataError(f"{path} has no data rows; {COLUMNS_HINT}")
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise DataError(f"{path} lacks column(s) {','.join(missing)}; {COLUMNS_HINT}")
        reader.fieldnames = header
        rows = []
        for n, raw in enumerate(reader, 1):  # row n: the n-th data row, as _normalise counts them
            row = {c: (raw[c] or "").strip() for c in (*REQUIRED, *OPTIONAL) if c in header}
            try:
                rows.append(_typed(row))
            except (ValueError, TypeError):
                raise DataError(f"{path} row {n} (line {reader.line_num}): bad value in {row}; {COLUMNS_HINT} "
                                "(accuracy, params, level numbers; repeat an integer)") from None
    return rows


def _typed(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {"pair": str(row["pair"]), "method": str(row["method"]),
           "accuracy": float(row["accuracy"]), "params": float(row["params"])}
    if not out["pair"]:
        raise ValueError("empty pair")
    if "repeat" in row and row["repeat"] is not None:
        out["repeat"] = int(row["repeat"])
    for key in ("level", "val_accuracy"):
        if row.get(key) is not None:
            out[key] = float(row[key])
    return out


def _field(row: Any, name: str) -> Any:
    if isinstance(row, Mapping):
        return row.get(name)
    return getattr(row, name, None)


def _normalise(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """Validated typed rows; every row has a repeat (default 0); levels on all rows or on none."""
    out = []
    for i, row in enumerate(rows):
        values = {c: _field(row, c) for c in (*REQUIRED, *OPTIONAL)}
        if any(values[c] is None for c in REQUIRED):
            raise DataError(f"row {i + 1} lacks {[c for c in REQUIRED if values[c] is None]}; {COLUMNS_HINT}")
        try:
            r = _typed(values)
        except (ValueError, TypeError):
            raise DataError(f"row {i + 1} has a bad value: {values}; {COLUMNS_HINT}") from None
        if r["method"] not in METHODS:
            raise DataError(f"row {i + 1}: method must be one of {', '.join(METHODS)}, got {r['method']!r}")
        if not (0 <= r["accuracy"] <= 100) or not (math.isfinite(r["params"]) and r["params"] > 0):
            raise DataError(f"row {i + 1}: accuracy must be a percentage in [0, 100] and params a count > 0, "
                            f"got accuracy={r['accuracy']}, params={r['params']}")
        if "level" in r and not math.isfinite(r["level"]):
            raise DataError(f"row {i + 1}: level must be a finite number, got {r['level']}")
        r.setdefault("repeat", 0)
        out.append(r)
    if not out:
        raise DataError(f"no result rows; {COLUMNS_HINT}")
    with_level = sum("level" in r for r in out)
    if 0 < with_level < len(out):
        raise DataError("some rows have a level and some do not; give a level on every row or on none")
    return out


# ------------------------------------------------------------------------------------------ efficiencies
def _chosen_points(rows: list[dict[str, Any]], tolerance: float, breakpoint: str) -> dict[tuple, dict]:
    """{(pair, method, repeat): the row at the breakpoint (or the only row, when rows carry no level)}."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["pair"], r["method"], r["repeat"])].append(r)
    chosen = {}
    for key, group in groups.items():
        if "level" not in group[0]:
            if len(group) > 1:
                raise DataError(f"{len(group)} rows for pair {key[0]}, method {key[1]}, repeat {key[2]} but "
                                "no level column; add level (to find the breakpoint) or distinct repeats")
            chosen[key] = group[0]
            continue
        try:
            # chosen on validation accuracy when every row has one; the test accuracy is only reported
            on = "val_accuracy" if all("val_accuracy" in r for r in group) else "accuracy"
            bp = find_breakpoint([r["level"] for r in group], [r[on] for r in group], tolerance, breakpoint)
        except ConfigError as exc:
            raise DataError(f"pair {key[0]}, method {key[1]}, repeat {key[2]}: {exc}") from None
        chosen[key] = sorted(group, key=lambda r: r["level"])[bp.index]
    return chosen


def _no_spread(values: Any) -> bool:
    """All values equal up to rounding: a t statistic would be inf or NaN (and scipy warns)."""
    a = np.asarray(values, dtype=float)
    return bool(np.ptp(a) <= 1e-9 * max(1.0, float(np.abs(a).max())))


def _welch(channel: list[float], weight: list[float]) -> dict[str, float | None] | None:
    if len(channel) < 2 or len(weight) < 2:
        return None
    if _no_spread(channel) and _no_spread(weight):
        return {"t": None, "p": None, "df": None}  # no spread in either group: the test is undefined
    res = sps.ttest_ind(channel, weight, equal_var=False)
    return {"t": _num(res.statistic), "p": _num(res.pvalue), "df": _num(res.df)}


def _paired(channel: np.ndarray, weight: np.ndarray) -> dict[str, Any]:
    n = channel.size
    diff = channel - weight
    mean, sd = float(diff.mean()), 0.0 if _no_spread(diff) else float(diff.std(ddof=1))
    # equal differences (sd 0) leave t undefined; scipy would warn and return inf / nan
    t, p = sps.ttest_rel(channel, weight) if sd > 0 else (None, None)
    half = float(sps.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"t": _num(t), "p": _num(p), "df": n - 1, "n_pairs": n,
            "mean_diff": _num(mean), "ci95": [_num(mean - half), _num(mean + half)],
            "effect_size": _num(mean / sd) if sd > 0 else None}


def run_stats(rows: Iterable[Any], w1: float = 0.5, w2: float = 0.5, tolerance: float = 1.0,
              breakpoint: str = "tolerance") -> dict[str, Any]:
    """Paired t-test (channel - weight efficiency across pairs) plus per-pair efficiencies and Welch tests.

    Returns a JSON-serialisable dict: t, p, df, n_pairs, mean_diff, ci95 [lo, hi], effect_size (Cohen's d_z),
    w1, w2, and "pairs": one entry per pair (sorted by name) with, per method, the mean efficiency, its
    per-repeat values and the mean accuracy / params / level at the chosen points, the difference, whether
    the pair entered the paired test (it needs both methods) and the Welch test (>= 2 repeats per method).
    Non-finite numbers (e.g. t when every difference is equal) are None.
    """
    chosen = _chosen_points(_normalise(rows), tolerance, breakpoint)
    by_pm: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for (pair, method, _repeat), r in sorted(chosen.items()):
        by_pm[(pair, method)].append(r)

    pairs, channel, weight = [], [], []
    for pair in sorted({p for p, _ in by_pm}):
        entry: dict[str, Any] = {"pair": pair}
        effs = {}
        for method in METHODS:
            points = by_pm.get((pair, method), [])
            effs[method] = [performance_efficiency(r["accuracy"], r["params"], w1, w2) for r in points]
            entry[method] = None if not points else {
                "efficiency": _num(np.mean(effs[method])),
                "efficiencies": [_num(e) for e in effs[method]],
                "repeats": len(points),
                "accuracy": _num(np.mean([r["accuracy"] for r in points])),
                "params": _num(np.mean([r["params"] for r in points])),
                "level": _num(np.mean([r["level"] for r in points])) if "level" in points[0] else None,
            }
        entry["in_test"] = bool(effs["weight"] and effs["channel"])
        if entry["in_test"]:
            channel.append(float(np.mean(effs["channel"])))
            weight.append(float(np.mean(effs["weight"])))
        entry["diff"] = _num(channel[-1] - weight[-1]) if entry["in_test"] else None
        entry["welch"] = _welch(effs["channel"], effs["weight"])
        pairs.append(entry)

    if len(channel) < 2:
        raise DataError(f"the paired t-test needs >= 2 pairs with both weight and channel results, got "
                        f"{len(channel)}; run more pairs")
    return {**_paired(np.array(channel), np.array(weight)), "w1": float(w1), "w2": float(w2), "pairs": pairs}


__all__ = ["read_results_csv", "run_stats", "METHODS", "REQUIRED", "OPTIONAL"]
