"""The study's figures (PNG, matplotlib Agg) and one self-contained HTML page with them and their tables.

Figures, after Malihi & Heidemann (2024):
- fig1_accuracy_vs_params.png (Figures 1-2): accuracy against remaining student parameters per pair, weight
  and channel, mean over repeats with the standard deviation, the teacher and the unpruned student marked,
  and each method's breakpoint (`metrics.find_breakpoint` on the mean curve) circled;
- fig3_efficiency.png (Figures 3-4): performance efficiency at the breakpoint per student and method, with
  the paper's student parameters and with the deployed ones (SimKD projector and teacher head included);
- fig5_layer_sparsity.png (Figure 5): fraction of each backbone layer's parameters removed, weight against
  channel, at one level per pair (the highest level <= 0.5 that both methods ran);
- fig6_ttest.png (Figure 6): paired efficiencies per pair and the channel - weight difference with its 95% CI;
- fig7_latency.png (beyond the paper): accuracy against measured batch-1 latency per method and backend.
A figure whose data the results lack is left out with a note on the page.
"""

from __future__ import annotations

import base64
import html
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .metrics import find_breakpoint
from .preflight import check_output
from .stats import read_results_csv, run_stats
from .sweep.store import read_store
from .vocab import PARAM_COLUMNS

COLORS = {"weight": "tab:blue", "channel": "tab:orange"}
MARKERS = "osD^vP*X"


def _figure(nplots: int, width: float = 4.2, height: float = 3.2, ncols: int = 3):
    """A matplotlib Figure (no pyplot: no global backend state) with a grid of at least `nplots` axes."""
    from matplotlib.figure import Figure  # lazy: matplotlib is heavy and only the report draws

    ncols = max(1, min(ncols, nplots))
    nrows = math.ceil(nplots / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=90, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[nplots:]:
        ax.set_visible(False)
    return fig, axes[:nplots]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _mean_curves(rows: list[dict], value: str) -> dict[tuple[str, str], dict[float, list[float]]]:
    curves: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get(value) is not None:
            curves[(r["pair"], r["method"])][r["level"]].append(float(r[value]))
    return curves


# ----------------------------------------------------------------------------------------------- figures
def fig_accuracy(rows: list[dict], stages: list[dict], params: str, tolerance: float, path: Path) -> Path:
    acc, size = _mean_curves(rows, "top1"), _mean_curves(rows, params)
    pairs = sorted({r["pair"] for r in rows})
    teachers = {s["pair"]: s for s in stages if s["stage"] == "teacher"}
    fig, axes = _figure(len(pairs))
    for ax, pair in zip(axes, pairs, strict=True):
        for method in ("weight", "channel"):
            if (pair, method) not in acc:
                continue
            levels = sorted(acc[(pair, method)])
            y = np.array([np.mean(acc[(pair, method)][lv]) for lv in levels])
            sd = np.array([np.std(acc[(pair, method)][lv]) for lv in levels])
            x = np.array([np.mean(size[(pair, method)][lv]) for lv in levels]) / 1e6
            ax.errorbar(x, y, yerr=sd, color=COLORS[method], marker="o", ms=3, capsize=2, label=method)
            bp = find_breakpoint(levels, y, tolerance)
            ax.plot(x[bp.index], y[bp.index], "o", ms=11, mfc="none", mec=COLORS[method], mew=2)
            ax.annotate(f"{bp.level:.2f}", (x[bp.index], y[bp.index]), textcoords="offset points",
                        xytext=(6, -12), color=COLORS[method], fontsize=8)
            if levels[0] == 0:
                ax.plot(x[0], y[0], "*", ms=12, color="black", zorder=5,
                        label="student (unpruned)" if method == "weight" else None)
        if pair in teachers and teachers[pair].get("top1") is not None:
            t = teachers[pair]
            ax.axhline(t["top1"], color="gray", ls="--", lw=1,
                       label=f"teacher {t.get('model') or ''} ({(t.get('params') or 0) / 1e6:.2f}M)")
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, max(hi, min(100.5, t["top1"] + 2)))  # keep the teacher line off the frame
        ax.set_title(pair, fontsize=10)
        ax.set_xlabel("remaining student parameters, non-zero (millions)" if params == "params_nonzero" else
                      f"remaining {params} (millions)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def fig_efficiency(results: dict[str, dict], path: Path) -> Path:
    """Grouped bars of per-pair efficiency (mean, sd over repeats), one panel per parameter convention."""
    fig, axes = _figure(len(results), width=max(4.5, 1.1 * len(next(iter(results.values()))["pairs"])),
                        height=3.6, ncols=2)
    for ax, (label, res) in zip(axes, results.items(), strict=True):
        entries = res["pairs"]
        x = np.arange(len(entries))
        for k, method in enumerate(("weight", "channel")):
            vals = [e[method]["efficiency"] if e[method] else 0.0 for e in entries]
            err = [np.std(e[method]["efficiencies"]) if e[method] else 0.0 for e in entries]
            ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, yerr=err, capsize=2, color=COLORS[method], label=method)
        ax.set_xticks(x, [e["pair"] for e in entries], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("efficiency (acc % / M params)")
        ax.set_title(f"efficiency at the breakpoint ({label} params)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _sparsity_level(rows: list[dict], pair: str) -> float | None:
    by_method = defaultdict(set)
    for r in rows:
        if r["pair"] == pair and r.get("layer_sparsity") and r["level"] > 0:
            by_method[r["method"]].add(r["level"])
    common = sorted(by_method["weight"] & by_method["channel"]) or sorted(by_method["weight"] |
                                                                          by_method["channel"])
    if not common:
        return None
    low = [lv for lv in common if lv <= 0.5]
    return low[-1] if low else common[0]


def fig_layer_sparsity(rows: list[dict], path: Path) -> Path | None:
    pairs = [p for p in sorted({r["pair"] for r in rows}) if _sparsity_level(rows, p) is not None]
    if not pairs:
        return None
    fig, axes = _figure(len(pairs), width=5.0)
    for ax, pair in zip(axes, pairs, strict=True):
        level = _sparsity_level(rows, pair)
        names: list[str] = []
        for k, method in enumerate(("weight", "channel")):
            per = [r["layer_sparsity"] for r in rows if r["pair"] == pair and r["method"] == method and
                   r["level"] == level and r.get("layer_sparsity")]
            if not per:
                continue
            names = [lay["layer"] for lay in per[0]]
            frac = np.mean([[lay["sparsity"] for lay in layers] for layers in per], axis=0)
            x = np.arange(len(frac))
            ax.bar(x + (k - 0.5) * 0.42, 100 * frac, 0.42, color=COLORS[method], label=method)
        if len(names) <= 24:
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{pair}: removed per layer at level {level:.2f}", fontsize=9)
        ax.set_xlabel("conv / linear layer of the student backbone")
        ax.set_ylabel("parameters removed (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def fig_ttest(res: dict[str, Any], path: Path) -> Path:
    fig, (ax1, ax2) = _figure(2, width=4.6, ncols=2)
    entries = [e for e in res["pairs"] if e["in_test"]]
    for i, e in enumerate(entries):
        w, c = e["weight"]["efficiency"], e["channel"]["efficiency"]
        ax1.plot([0, 1], [w, c], "-o", color=f"C{i % 10}", lw=1.2, label=e["pair"])
        ax2.plot(e["diff"], i, "o", color="black")
    effs = [e[m]["efficiency"] for e in entries for m in ("weight", "channel")]
    if effs and min(effs) > 0 and max(effs) / min(effs) > 10:
        ax1.set_yscale("log")  # students of very different sizes
    ax1.set_xticks([0, 1], ["weight", "channel"])
    ax1.set_xlim(-0.3, 1.3)
    ax1.legend(fontsize=7)
    ax1.set_ylabel("efficiency at the breakpoint")
    ax1.set_title("paired efficiencies per pair", fontsize=10)
    ax2.set_yticks(range(len(entries)), [e["pair"] for e in entries], fontsize=7)
    ax2.axvline(0, color="gray", lw=1)
    lo, hi = res["ci95"]
    if res["mean_diff"] is not None and lo is not None:
        ax2.axvspan(lo, hi, color="tab:green", alpha=0.15, label="95% CI of the mean")
        ax2.axvline(res["mean_diff"], color="tab:green", lw=2, label=f"mean {res['mean_diff']:.3g}")
    t, p = res["t"], res["p"]
    ax2.set_title(f"channel - weight: t={_g(t)}, p={_g(p)}, df={res['df']}", fontsize=10)
    ax2.set_xlabel("efficiency difference")
    ax2.legend(fontsize=7)
    return _save(fig, path)


def fig_latency(rows: list[dict], path: Path) -> Path | None:
    rows = [r for r in rows if r.get("latency_b1_ms") is not None]
    if not rows:
        return None
    pairs = sorted({r["pair"] for r in rows})
    backends = sorted({str(r.get("backend")) for r in rows})
    fig, axes = _figure(len(pairs))
    for ax, pair in zip(axes, pairs, strict=True):
        for method in ("weight", "channel"):
            for b, backend in enumerate(backends):
                sel = [r for r in rows if r["pair"] == pair and r["method"] == method and
                       str(r.get("backend")) == backend]
                if sel:
                    ax.plot([r["latency_b1_ms"] for r in sel], [r["top1"] for r in sel], MARKERS[b % 8],
                            color=COLORS[method], ls="none", label=f"{method} / {backend}")
        ax.set_title(pair, fontsize=10)
        ax.set_xlabel("latency, batch 1 (ms, p50)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


# -------------------------------------------------------------------------------------------------- HTML
def _g(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p><em>no rows</em></p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_g(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.name)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{name}" title="{name}">'
            f'<figcaption>{html.escape(caption)} (<a href="{name}">{name}</a>)</figcaption></figure>')


CSS = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}table{border-collapse:collapse;"
       "margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:right}"
       "img{max-width:100%}figure{margin:1em 0}.note{color:#a50}")


def _accuracy_table(rows: list[dict], params: str) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["pair"], r["method"], r["level"])].append(r)
    out = []
    for (pair, method, level), g in sorted(groups.items()):
        def mean(k: str, g=g) -> float | None:
            vals = [r[k] for r in g if r.get(k) is not None]
            return float(np.mean(vals)) if vals else None

        out.append({"pair": pair, "method": method, "level": level, "repeats": len(g), "top1": mean("top1"),
                    "top1_sd": float(np.std([r["top1"] for r in g])), params: mean(params),
                    "deployed_params": mean("deployed_params"), "effective_macs": mean("effective_macs"),
                    "latency_b1_ms": mean("latency_b1_ms")})
    return out


def _efficiency_table(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for e in res["pairs"]:
        for method in ("weight", "channel"):
            m = e[method]
            if m:
                out.append({"pair": e["pair"], "method": method, "breakpoint_level": m["level"],
                            "accuracy": m["accuracy"], "params": m["params"], "efficiency": m["efficiency"],
                            "repeats": m["repeats"], "welch_p": (e["welch"] or {}).get("p")})
    return out


def _test_row(label: str, res: dict[str, Any]) -> dict[str, Any]:
    return {"parameters": label, "t": res["t"], "p": res["p"], "df": res["df"], "n_pairs": res["n_pairs"],
            "mean_diff": res["mean_diff"], "ci95_lo": res["ci95"][0], "ci95_hi": res["ci95"][1],
            "effect_size_dz": res["effect_size"]}


def build_report(results: str | Path, out: str | Path, *, dataset: str | None = None, w1: float = 0.5,
                 w2: float = 0.5, tolerance: float = 1.0) -> dict[str, Any]:
    """Write the figures and index.html under `out`; return {html, figures, notes}."""
    results, out = Path(results), Path(out)
    if results.suffix.lower() == ".csv":
        rows = [{"pair": r["pair"], "method": r["method"], "level": r.get("level", 0.0),
                 "repeat": r.get("repeat", 0), "top1": r["accuracy"], "params_nonzero": r["params"]}
                for r in read_results_csv(results)]
        stages, conventions = [], {"student": PARAM_COLUMNS["student"]}
    else:
        rows, stages = read_store(results, dataset)
        conventions = dict(PARAM_COLUMNS)
    check_output(out, inputs=(results,), directory=True)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[Path, str]] = []
    notes: list[str] = []
    params = PARAM_COLUMNS["student"]

    figures.append((fig_accuracy(rows, stages, params, tolerance, out / "fig1_accuracy_vs_params.png"),
                    "Accuracy vs remaining student parameters (Figures 1-2); circles: breakpoints, "
                    "star: unpruned student, dashed: teacher"))
    tests: dict[str, dict] = {}
    for label, column in conventions.items():
        srows = [{"pair": r["pair"], "method": r["method"], "accuracy": r["top1"], "params": r[column],
                  "repeat": r["repeat"], "level": r["level"]} for r in rows]
        try:
            tests[label] = run_stats(srows, w1, w2, tolerance)
        except DataError as exc:
            notes.append(f"efficiency and t-test ({label} parameters) skipped: {exc}")
    if tests:
        figures.append((fig_efficiency(tests, out / "fig3_efficiency.png"),
                        "Performance efficiency at the breakpoint per student and method (Figures 3-4)"))
    sparsity = fig_layer_sparsity(rows, out / "fig5_layer_sparsity.png")
    if sparsity:
        figures.append((sparsity, "Parameters removed per layer, weight vs channel pruning (Figure 5)"))
    else:
        notes.append("per-layer sparsity figure skipped: the results carry no per-layer sparsity")
    if "student" in tests:
        figures.append((fig_ttest(tests["student"], out / "fig6_ttest.png"),
                        "Paired t-test of channel vs weight efficiency across pairs (Figure 6)"))
    latency = fig_latency(rows, out / "fig7_latency.png")
    if latency:
        figures.append((latency, "Accuracy vs measured latency per method and backend (beyond the paper)"))
    else:
        notes.append("latency figure skipped: no latency columns (run the sweep with --profile BACKEND)")

    parts = [f"<h1>kdexport study: {html.escape(results.name)}</h1>",
             f"<p>{len(rows)} result rows, pairs: {html.escape(', '.join(sorted({r['pair'] for r in rows})))}; "
             f"efficiency weights w1={w1}, w2={w2}; breakpoint tolerance {tolerance} accuracy points.</p>"]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    if tests:
        parts += ["<h2>Paired t-test: channel - weight efficiency</h2>",
                  _table([_test_row(k, v) for k, v in tests.items()])]
    for path, caption in figures:
        parts.append(_img(path, caption))
        if path.name.startswith("fig3") and tests:
            for label, res in tests.items():
                parts += [f"<h3>Efficiency at the breakpoint ({label} parameters)</h3>",
                          _table(_efficiency_table(res))]
    if stages:
        parts += ["<h2>Teachers and distilled students</h2>",
                  _table([{k: s[k] for k in ("pair", "stage", "repeat", "seed", "model", "top1", "top5",
                                             "params", "deployed_params", "duration_s")} for s in stages])]
    parts += ["<h2>Accuracy per pair, method and level (mean over repeats)</h2>",
              _table(_accuracy_table(rows, params))]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>kdexport study</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return {"html": str(index), "figures": [str(p) for p, _ in figures], "notes": notes}


__all__ = ["build_report", "fig_accuracy", "fig_efficiency", "fig_layer_sparsity", "fig_ttest", "fig_latency"]
