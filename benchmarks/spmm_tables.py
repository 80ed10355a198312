"""Markdown tables for benchmarks/bench_spmm.py, from its JSON (also a partial one, after a time-out):
`python benchmarks/spmm_tables.py RESULT.json` prints them without importing torch.

Rows are long-format cells: one per (dtype, layer, N, sparsity, method), method one of `dense` (cuBLAS),
`ours-bitmap` / `ours-index` (the Triton SpMM), `csr` / `bsr` (torch.sparse) and `semi24` (2:4 through
torch.sparse.to_sparse_semi_structured, at its own 50%). A cell that could not run has `error` and no `ms`;
every speedup is dense median / that method's median, from the same run.
"""

from __future__ import annotations

import statistics
from collections import Counter

TARGETS = {0.7: 1.4, 0.8: 1.7, 0.9: 2.1}  # speedup wanted for weight-heavy layers at N <= 16
LABELS = {"dense": "dense", "ours-bitmap": "ours (bitmap)", "ours-index": "ours (index)", "csr": "torch CSR",
          "bsr": "torch BSR", "semi24": "torch 2:4"}


def _us(q: dict) -> str:
    return f"{q['p50'] * 1e3:.1f}/{q['p90'] * 1e3:.1f}"


def _cell(c: dict | None, with_time: bool = False) -> str:
    if c is None:
        return ""
    if c.get("error"):
        return "n/a"
    if c.get("wrong"):
        return "WRONG"
    speed = f"{c['speedup']:.2f}x"
    return f"{_us(c['ms'])} ({speed})" if with_time else speed


def _groups(rows: list[dict]) -> list[tuple[str, str, int, int]]:
    return list(dict.fromkeys((r["dtype"], r["layer"], r["out_features"], r["in_features"]) for r in rows))


def speedup_table(rows: list[dict], dtype: str, method: str) -> str:
    """One (dtype, our encoding) table: layers x N, a column per sparsity, plus dense time and torch's 2:4."""
    mine = [r for r in rows if r["dtype"] == dtype]
    sparsities = sorted({r["sparsity"] for r in mine if r["method"] == method})
    cells = {(r["layer"], r["rows"], r["method"], r["sparsity"]): r for r in mine}
    lines = [f"{dtype}, {LABELS[method]}: speedup over dense cuBLAS (dense median/p90 in us)", "",
             "| layer | W (out x in) | N | dense us | " + " | ".join(f"{s:.0%}" for s in sparsities)
             + " | torch 2:4 (50%) |", "|---|---|---:|---:|" + "---:|" * (len(sparsities) + 1)]
    for _, name, out_f, in_f in _groups(mine):
        for n in sorted({r["rows"] for r in mine if r["layer"] == name}):
            dense = cells.get((name, n, "dense", None))
            timing = _us(dense["ms"]) if dense and dense.get("ms") else "n/a"
            lines.append(f"| {name} | {out_f}x{in_f} | {n} | {timing} | "
                         + " | ".join(_cell(cells.get((name, n, method, s))) for s in sparsities)
                         + f" | {_cell(cells.get((name, n, 'semi24', 0.5)))} |")
    heavy = [r for r in mine if r["method"] == method and "head" not in r["layer"] and r["rows"] <= 16
             and r.get("speedup") is not None]
    for sparsity, target in TARGETS.items():
        got = [r["speedup"] for r in heavy if r["sparsity"] == sparsity]
        if got:
            met = sum(x >= target for x in got)
            lines.append(f"- {sparsity:.0%}, weight-heavy layers, N <= 16: median {statistics.median(got):.2f}x, "
                         f"min {min(got):.2f}x, {met}/{len(got)} cells at or above the {target}x target")
    return "\n".join(lines)


def baseline_table(rows: list[dict], dtype: str) -> str:
    """Every method side by side per (layer, N, sparsity): median/p90 us and the speedup over dense."""
    mine = [r for r in rows if r["dtype"] == dtype]
    methods = [m for m in ("ours-bitmap", "ours-index", "csr", "bsr") if any(r["method"] == m for r in mine)]
    cells = {(r["layer"], r["rows"], r["method"], r["sparsity"]): r for r in mine}
    lines = [f"{dtype}: every method, median/p90 us (speedup over dense)", "",
             "| layer | N | sparsity | dense | " + " | ".join(LABELS[m] for m in methods) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(methods)]
    for _, name, _, _ in _groups(mine):
        for n in sorted({r["rows"] for r in mine if r["layer"] == name}):
            dense = cells.get((name, n, "dense", None))
            for s in sorted({r["sparsity"] for r in mine if r["layer"] == name and r["method"] in methods}):
                lines.append(f"| {name} | {n} | {s:.0%} | {_us(dense['ms']) if dense and dense.get('ms') else 'n/a'}"
                             " | " + " | ".join(_cell(cells.get((name, n, m, s)), True) for m in methods) + " |")
    return "\n".join(lines)


def failures(rows: list[dict]) -> str:
    """What could not run (or ran wrong), each reason once with its count of cells."""
    counted = Counter((r["dtype"], LABELS.get(r["method"], r["method"]), r["error"]) for r in rows if r.get("error"))
    wrong = [r for r in rows if r.get("wrong")]
    lines = [f"- {label}, {dtype}: not run in {n} cells: {error}" for (dtype, label, error), n in counted.items()]
    lines += [f"- WRONG: {LABELS.get(r['method'], r['method'])}, {r['dtype']}, {r['layer']} N={r['rows']} at "
              f"{r['sparsity']:.0%}: relative error {r['rel_err']:.2e}" for r in wrong]
    return "\n".join(lines)


def conv_markdown(rows: list[dict]) -> str:
    lines = ["3x3 convolutions: median/p90 us (speedup over dense cuDNN)", "",
             "| layer | dtype | batch | sparsity | dense cuDNN | implicit GEMM | unfold + SpMM |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = []
        for k in ("dense", "implicit", "unfold"):
            q = r["ms"].get(k)
            if q is None:
                cells.append("n/a")
            elif k == "dense":
                cells.append(_us(q))
            else:
                cells.append(f"{_us(q)} ({r[f'{k}_speedup']:.2f}x)" + (" WRONG" if k in r.get("wrong", ()) else ""))
        lines.append(f"| {r['layer']} ({r['size']}x{r['size']}) | {r['dtype']} | {r['batch']} | {r['sparsity']:.0%} | "
                     + " | ".join(cells) + " |")
    errors = Counter(f"{k}: {e}" for r in rows for k, e in r.get("errors", {}).items())
    lines += [f"- not run in {n} cells: {e}" for e, n in errors.items()]
    return "\n".join(lines)


def e2e_markdown(e2e: dict) -> str:
    lines = [f"ResNet-18, batch 1, {e2e['input_size'][1]}x{e2e['input_size'][2]}, {e2e['dtype']}, "
             "90% weight-pruned: median latency (ms)", "",
             "| model | layers sparse | eager | CUDA graph | rel. error |", "|---|---|---|---|---|"]
    for label, t in e2e["latency_ms"].items():
        lines.append(f"| {label} | {e2e['layers_sparse'][label]} | {t['eager']['p50']:.3f} | "
                     f"{t['cuda_graph']['p50']:.3f} | {t['rel_err']:.1e} |")
    return "\n".join(lines)


def render(result: dict) -> str:
    """All tables of one bench_spmm JSON (complete or partial)."""
    rows, parts = result.get("layers", []), []
    if result.get("note"):
        parts.append(f"**{result['note']}**")
    parts.append(f"`{result.get('command', 'bench_spmm.py')}`; timer: {result.get('timer', '?')}")
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for method in ("ours-bitmap", "ours-index"):
            if any(r["dtype"] == dtype and r["method"] == method for r in rows):
                parts.append(speedup_table(rows, dtype, method))
        parts.append(baseline_table(rows, dtype))
    if rows and failures(rows):
        parts.append("Not run or wrong:\n" + failures(rows))
    if result.get("convs"):
        parts.append(conv_markdown(result["convs"]))
    if result.get("e2e"):
        parts.append(e2e_markdown(result["e2e"]))
    if not result.get("complete", True):
        parts.append("**Incomplete: the run stopped before it finished (time-out or crash); the cells above are "
                     "those measured.**")
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":  # python benchmarks/spmm_tables.py RESULT.json: the tables, without importing torch
    import json
    import sys

    with open(sys.argv[1]) as f:
        print(render(json.load(f)), end="")
