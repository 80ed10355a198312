"""Per-seed figures of `kdexport compress` runs, as RESULTS.md tables: test top-1 (validation in brackets) for
the teacher, the student trained alone, the SimKD student and every pruned level, with the test mean ± sd.

    python benchmarks/seed_table.py k0 k1 k2                 # one compress run directory per seed
    python benchmarks/seed_table.py --pairs effb3-effb2-s0 effb3-effb2-s1 effb1-effb0-s0 ...

`--pairs` prints one row per pair instead (its run directories grouped by the name before `-sN`): teacher,
SimKD student and student alone, mean ± sd with each seed's figure, and the KD gain on test.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from kdexport.summary import mean_sd, pm


def _load(run_dir: str) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def _student(results: dict) -> dict:
    return next(r for r in results["rows"] if r["level"] == 0)


def seeds_table(run_dirs: list[str]) -> list[str]:
    runs = [_load(d) for d in run_dirs]
    lines = ["| model | " + " | ".join(Path(d).name for d in run_dirs) + " | test mean ± sd | vs student (each) |",
             "|---|" + "---:|" * (len(runs) + 1) + "---|"]

    def line(name: str, cells: list[dict], vs_student: bool) -> None:
        diffs = [c["top1"] - _student(r)["top1"] for c, r in zip(cells, runs, strict=True)]
        lines.append(f"| {name} | " + " | ".join(f"{c['top1']:.2f} ({c['val_top1']:.2f})" for c in cells)
                     + f" | {pm(*mean_sd(c['top1'] for c in cells))} | "
                     + (" / ".join(f"{d:+.2f}" for d in diffs) if vs_student else "") + " |")

    line("teacher", [r["teacher"] for r in runs], False)
    line("student trained alone", [r["baseline"] for r in runs], True)
    line("SimKD student", [_student(r) for r in runs], False)
    keys = sorted({(r["method"], r["level"]) for r in runs[0]["rows"] if r["level"] > 0})
    for method, level in keys:
        line(f"{method} {level:.0%}", [next(x for x in r["rows"] if (x["method"], x["level"]) == (method, level))
                                       for r in runs], True)
    for d, r in zip(run_dirs, runs, strict=True):
        lines += [f"{Path(d).name}: {s}" for s in r["summary"] if s.startswith(("ship:", "warning:"))]
    return lines


def pairs_table(run_dirs: list[str]) -> list[str]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for d in sorted(run_dirs):
        groups[re.sub(r"-s\d+$", "", Path(d).name)].append(_load(d))
    lines = ["| pair | seeds | teacher | SimKD student | student alone | KD gain (test) | warnings |",
             "|---|---|---|---|---|---|---|"]
    for pair, runs in groups.items():
        cols = [[r["teacher"]["top1"] for r in runs], [_student(r)["top1"] for r in runs],
                [r["baseline"]["top1"] for r in runs]]
        gain = [s - b for s, b in zip(cols[1], cols[2], strict=True)]
        cells = [f"{pm(*mean_sd(c))} ({' / '.join(f'{v:.2f}' for v in c)})" for c in cols]
        warned = sum(any(s.startswith("warning:") for s in r["summary"]) for r in runs)
        lines.append(f"| {pair} | {', '.join(str(r['config']['seed']) for r in runs)} | " + " | ".join(cells)
                     + f" | {statistics.mean(gain):+.2f} ({' / '.join(f'{g:+.2f}' for g in gain)}) | {warned} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--pairs", action="store_true", help="one row per pair (run directories named PAIR-sN)")
    args = parser.parse_args()
    print("\n".join(pairs_table(args.run_dirs) if args.pairs else seeds_table(args.run_dirs)))


if __name__ == "__main__":
    main()
