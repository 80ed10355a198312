"""The paper's efficiency metric and breakpoints: how accuracy trades against parameters or latency.

Unit conventions (used by `kdexport.stats` too):
- accuracy is a percentage in [0, 100];
- `performance_efficiency` takes `params` as a raw count and divides it by 1e6 (params in millions), so that
  90 % at 4.2M parameters gives 21.4 with the default weights;
- latency is in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..vocab import BREAKPOINT_METHODS

PARAMS_UNIT = 1e6  # performance_efficiency divides parameter counts by this (millions)


# -------------------------------------------------------------------------------------------- efficiency
def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not (isinstance(v, (int, float, np.number)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")


def _check_accuracy(accuracy: float) -> None:
    if not (isinstance(accuracy, (int, float, np.number)) and 0 <= accuracy <= 100):
        raise ConfigError(f"accuracy must be a percentage in [0, 100], got {accuracy!r}")


def performance_efficiency(accuracy: float, params: float, w1: float = 0.5, w2: float = 0.5) -> float:
    """The paper's Performance Efficiency (w1 * accuracy) / (w2 * params), accuracy in %, params in millions.

    `params` is a raw parameter count (e.g. 4_200_000); it is divided by 1e6 here.
    """
    _check_accuracy(accuracy)
    _check_positive(params=params, w1=w1, w2=w2)
    return float(w1 * accuracy / (w2 * params / PARAMS_UNIT))


def latency_efficiency(accuracy: float, latency_ms: float, w1: float = 0.5, w2: float = 0.5) -> float:
    """(w1 * accuracy) / (w2 * latency_ms): the efficiency metric with measured latency instead of params."""
    _check_accuracy(accuracy)
    _check_positive(latency_ms=latency_ms, w1=w1, w2=w2)
    return float(w1 * accuracy / (w2 * latency_ms))


# -------------------------------------------------------------------------------------------- breakpoint
@dataclass(frozen=True)
class Breakpoint:
    """The chosen pruning level; `index` refers to the curve sorted by level."""

    level: float
    index: int
    accuracy: float
    method: str
    tolerance: float | None  # None for "knee"


def _curve(levels: Sequence[float], accuracies: Sequence[float], *extra: Sequence[float]):
    """Validated float arrays sorted by level (levels need not arrive sorted; duplicates are an error)."""
    arrays = [np.asarray(a, dtype=float).ravel() for a in (levels, accuracies, *extra)]
    if len({a.size for a in arrays}) != 1:
        raise ConfigError(f"levels, accuracies (and latencies) differ in length: {[a.size for a in arrays]}")
    if arrays[0].size == 0:
        raise ConfigError("no pruning levels given; pass at least one (level, accuracy) point")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ConfigError("levels, accuracies and latencies must be finite numbers (found NaN or inf)")
    order = np.argsort(arrays[0], kind="stable")
    arrays = [a[order] for a in arrays]
    if np.any(np.diff(arrays[0]) == 0):
        raise ConfigError("duplicate pruning levels; average repeats before looking for the breakpoint")
    return arrays


def _knee_index(x: np.ndarray, y: np.ndarray) -> int:
    """Kneedle for a decreasing, concave accuracy curve: max height above the first-to-last chord."""
    if y.size < 3 or y[-1] >= y[0] or np.ptp(y) == 0:
        return y.size - 1 if y[-1] >= y[0] else 0  # no drop at all / too few points for a knee
    xn = (x - x[0]) / (x[-1] - x[0])
    yn = (y - y.min()) / np.ptp(y)
    chord = yn[0] + (yn[-1] - yn[0]) * xn
    height = yn - chord
    # convex or linear: accuracy falls from the start, so no level is safe
    return int(np.argmax(height)) if height.max() > 0 else 0


def _within(y: np.ndarray, spreads: np.ndarray | None, tolerance: float) -> np.ndarray:
    """Per level: is its accuracy within `tolerance` of the lowest level's, given the noise of both?

    With repeats, a level counts as fallen out only when its drop exceeds the tolerance by more than the
    spread of the difference (the two standard deviations added in quadrature): a drop smaller than the
    noise is not evidence of a drop. Without repeats the spreads are zero and this is the plain rule.
    """
    noise = np.zeros_like(y) if spreads is None else np.hypot(spreads, spreads[0])
    return y >= y[0] - tolerance - noise


def _check_tolerance(tolerance: float) -> None:
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"tolerance must be a finite number >= 0 (accuracy points), got {tolerance!r}")


def find_breakpoint(levels: Sequence[float], accuracies: Sequence[float], tolerance: float = 1.0,
                    method: str = "tolerance", spreads: Sequence[float] | None = None) -> Breakpoint:
    """The pruning level after which accuracy falls faster than parameters.

    - "tolerance": the highest level such that it and every lower level stay within `tolerance` accuracy
      points of the lowest level's (the unpruned) accuracy; the level before the first one that falls out.
    - "knee": Kneedle on the normalised curve (the point farthest above the chord from the first to the last
      point); the last level if accuracy never drops, the first if the curve has no concave knee.
    Points are sorted by level first. `spreads` (standard deviations over repeats, per level) widen the
    tolerance by the noise of each comparison (see `_within`).
    """
    if method not in BREAKPOINT_METHODS:
        known = ", ".join(BREAKPOINT_METHODS)
        raise ConfigError(f"unknown breakpoint method {method!r}; choose one of: {known}")
    x, y, s = _curve(levels, accuracies, np.zeros(len(levels)) if spreads is None else spreads)
    if method == "knee":
        i = _knee_index(x, y)
        return Breakpoint(float(x[i]), i, float(y[i]), method, None)
    _check_tolerance(tolerance)
    out = np.flatnonzero(~_within(y, s, tolerance))
    i = int(out[0]) - 1 if out.size else y.size - 1
    return Breakpoint(float(x[i]), i, float(y[i]), method, float(tolerance))


def latency_breakpoint(levels: Sequence[float], accuracies: Sequence[float], latencies: Sequence[float],
                       tolerance: float = 1.0, spreads: Sequence[float] | None = None) -> Breakpoint:
    """The fastest level among all levels within `tolerance` points of the lowest level's accuracy.

    Ties in latency go to the higher level. Latencies are in milliseconds and must be > 0. `spreads` as in
    `find_breakpoint`.
    """
    _check_tolerance(tolerance)
    x, y, lat, s = _curve(levels, accuracies, latencies, np.zeros(len(levels)) if spreads is None else spreads)
    if np.any(lat <= 0):
        raise ConfigError("latencies must be > 0 ms")
    ok = np.flatnonzero(_within(y, s, tolerance))
    fastest = lat[ok].min()
    i = int(ok[lat[ok] == fastest][-1])
    return Breakpoint(float(x[i]), i, float(y[i]), "latency", float(tolerance))
