"""Decisions over measured rows, one set of rules for `compress`, `sweep` and `stats`.

- Repeats of a (method, level) are averaged; with two or more the table shows mean ± standard deviation.
- Every choice (the breakpoint, the fastest level within tolerance, the `ship:` line) is made on the
  validation accuracy; the test accuracy of the chosen model is only reported. Rows without a validation
  accuracy (results from before the split existed, or a user's CSV) fall back to top-1 and say so.
- With repeats, a level counts as fallen out only when its drop exceeds the tolerance by more than the noise
  (see `metrics.efficiency`), so a difference inside the spread decides nothing.
- `ship:` ranks by what deploys: measured latency when there is one, else the parameters the exported file
  really holds, where a weight-pruned model is as large as the unpruned one.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from .metrics import find_breakpoint, latency_breakpoint

AVERAGED = ("top1", "top5", "val_top1", "params_nonzero", "deployed_params", "deployed_dense", "macs",
            "effective_macs", "perf_efficiency", "deployed_efficiency", "latency_b1_ms", "latency_bN_ms",
            "latency_efficiency")
WITH_SPREAD = ("top1", "val_top1")
DENSE_NOTE = ("weight-pruned files stay dense (as large and, under ONNX Runtime or TensorRT, as slow as the "
              "unpruned student) unless they run on kdexport's sparse kernels (`--profile torch-sparse`, CUDA)")


def mean_sd(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of the values that are not None; sd 0 for one value."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def pm(mean: float | None, sd: float | None, digits: int = 2) -> str:
    """"97.22 ± 0.40" (or "97.22" without a spread)."""
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd else f"{mean:.{digits}f}"


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{method: one row per level, sorted}, each the mean over its repeats plus `<key>_sd` for accuracies."""
    table: dict[str, list[dict[str, Any]]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        by_level: dict[float, list[dict[str, Any]]] = {}
        for r in rows:
            if r["method"] == method:
                by_level.setdefault(r["level"], []).append(r)
        out = []
        for level in sorted(by_level):
            group = by_level[level]
            avg: dict[str, Any] = {"level": level, "repeats": len(group)}
            for k in AVERAGED:
                avg[k], sd = mean_sd(g.get(k) for g in group)
                if k in WITH_SPREAD:
                    avg[f"{k}_sd"] = sd
            out.append(avg)
        table[method] = out
    return table


def selection_key(table: dict[str, list[dict[str, Any]]]) -> str:
    """The accuracy every choice is made on: val_top1 when every row has it, else top1."""
    return "val_top1" if all(r.get("val_top1") is not None for out in table.values() for r in out) else "top1"


def _spreads(out: list[dict[str, Any]], key: str) -> list[float] | None:
    return [r[f"{key}_sd"] for r in out] if all(r["repeats"] > 1 for r in out) else None


def summarise(rows: Sequence[dict[str, Any]], tolerance: float = 1.0, breakpoint_method: str = "tolerance",
              backend: str | None = None) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Average repeats, mark breakpoints, and answer "which student should I ship?"."""
    table = aggregate(rows)
    key = selection_key(table)
    on = "validation" if key == "val_top1" else "top-1 (no validation accuracy recorded)"
    summary: list[str] = []
    chosen: list[tuple[str, dict[str, Any]]] = []
    fastest: list[tuple[str, dict[str, Any]]] = []
    for method, out in table.items():
        levels, accs, spreads = [r["level"] for r in out], [r[key] for r in out], _spreads(out, key)
        bp = find_breakpoint(levels, accs, tolerance, breakpoint_method, spreads)
        for r in out:
            r["breakpoint"] = r["level"] == bp.level
        row = out[bp.index]
        chosen.append((method, row))
        noise = " and its repeats' spread" if spreads else ""
        summary.append(f"{method}: breakpoint at {bp.level:.0%} ({bp.method} on {on}, tolerance {tolerance:g} pt"
                       f"{noise}): test top-1 {pm(row['top1'], row['top1_sd'])}%, "
                       f"{row['params_nonzero']:,.0f} non-zero student params, {row['deployed_params']:,.0f} "
                       f"deployed, efficiency {row['perf_efficiency']:.3g}")
        if all(r.get("latency_b1_ms") for r in out):
            for r in out:
                r["speedup_b1"] = out[0]["latency_b1_ms"] / r["latency_b1_ms"]
                r["speedup_bN"] = (out[0]["latency_bN_ms"] / r["latency_bN_ms"]) if r.get("latency_bN_ms") else None
            lb = latency_breakpoint(levels, accs, [r["latency_b1_ms"] for r in out], tolerance, spreads)
            fast = out[lb.index]
            fastest.append((method, fast))
            summary.append(f"{method} on {backend}: fastest within tolerance is {lb.level:.0%}: "
                           f"{fast['latency_b1_ms']:.3f} ms at batch 1 ({fast['speedup_b1']:.2f}x), "
                           f"test top-1 {pm(fast['top1'], fast['top1_sd'])}%")
    summary.append(ship_line(chosen, fastest, backend))
    return table, summary


def ship_line(chosen: list[tuple[str, dict[str, Any]]], fastest: list[tuple[str, dict[str, Any]]],
              backend: str | None) -> str:
    """The level to ship: the fastest measured within tolerance, else the smallest file within tolerance."""
    if fastest and len(fastest) == len(chosen):
        method, row = min(fastest, key=lambda c: (c[1]["latency_b1_ms"], -c[1]["level"]))
        why = f"fastest on {backend} within tolerance, {row['latency_b1_ms']:.3f} ms at batch 1"
        note = ""
    else:  # the same file size: the better validation accuracy, then the simpler (less pruned) model
        method, row = min(chosen, key=lambda c: (c[1]["deployed_dense"] or c[1]["deployed_params"],
                                                 -(c[1].get("val_top1") or c[1]["top1"]), c[1]["level"]))
        why = f"smallest deployed file within tolerance, {row['deployed_dense'] or row['deployed_params']:,.0f} params"
        note = f"; {DENSE_NOTE}" if any(m == "weight" and r["level"] > 0 for m, r in chosen) else ""
    what = "unpruned student" if row["level"] == 0 else f"{method}-pruned student at {row['level']:.0%}"
    return f"ship: {what} ({why}): test top-1 {pm(row['top1'], row['top1_sd'])}%{note}"


def reference_lines(references: dict[str, dict[str, Any]], student: dict[str, Any], pair,
                    tolerance: float = 1.0) -> list[str]:
    """The teacher, and the student trained alone beside the distilled one: what distillation is worth.

    A warning follows when the student trained alone beats the distilled one on validation by more than
    `tolerance` points, since every pruned level (and `ship:`) starts from the distilled student; it names the
    teacher as the likely cause when the teacher, too, is below the student trained alone.
    """
    lines = []
    teacher = references.get("teacher")
    if teacher:
        lines.append(f"teacher {pair.teacher}: test top-1 {teacher['top1']:.2f}% (val {_acc(teacher)}), "
                     f"{teacher['deployed_params']:,.0f} params, {teacher['macs']:,.0f} MACs")
    base = references.get("baseline")
    if base:
        gain = student["top1"] - base["top1"]
        val_gain = (f", {student['val_top1'] - base['val_top1']:+.2f} on val"
                    if None not in (student.get("val_top1"), base.get("val_top1")) else "")
        lines.append(f"student {pair.student} trained alone: test top-1 {base['top1']:.2f}% (val {_acc(base)}), "
                     f"{base['deployed_params']:,.0f} params; distilled: test top-1 {student['top1']:.2f}% "
                     f"(val {_acc(student)}), {student['deployed_params']:,.0f} deployed params: distillation "
                     f"{gain:+.2f} pt on test{val_gain}")
        lines += _distillation_warning(teacher, base, student, tolerance)
    return lines


def _distillation_warning(teacher: dict[str, Any] | None, base: dict[str, Any], student: dict[str, Any],
                          tolerance: float) -> list[str]:
    """[a warning] when distillation lost more than `tolerance` validation points, else []."""
    if None in (student.get("val_top1"), base.get("val_top1")) or \
            base["val_top1"] - student["val_top1"] <= tolerance:
        return []
    line = (f"warning: distillation lost {base['val_top1'] - student['val_top1']:.2f} pt on val, more than the "
            f"{tolerance:g}-pt tolerance, and every pruned level starts from the distilled student: the student "
            "trained alone (baseline.pt) is the better model to start from")
    if teacher and teacher.get("val_top1") is not None and teacher["val_top1"] < base["val_top1"]:
        line += (f"; the teacher (val {teacher['val_top1']:.2f}%) is below it too, and the distilled student "
                 "classifies through the teacher's head: train the teacher longer (--teacher-epochs) or pass a "
                 "better one (--teacher)")
    return [line]


def _acc(row: dict[str, Any]) -> str:
    return "-" if row.get("val_top1") is None else f"{row['val_top1']:.2f}%"


__all__ = ["AVERAGED", "DENSE_NOTE", "aggregate", "mean_sd", "pm", "reference_lines", "selection_key", "ship_line",
           "summarise"]
