"""What running compress's stages side by side saves (kdexport.jobs): pruned levels fine-tuned one at a time on
all threads against the same levels in forked workers with a share of the threads each.

    python benchmarks/bench_jobs.py RUN_DIR [--cases channel:0.3,channel:0.5,weight:0.5,weight:0.9]
                                            [--epochs 2] [--rounds 3] [--jobs N]

RUN_DIR is a `kdexport compress` run directory (its student.pt and teacher.pt). A first, untimed fine-tuning fills
the teacher memo, as distillation does in compress. Each round then makes every case twice, interleaved so that a
change of machine load hits both alike: "one at a time" (this process, torch's thread count) and "side by side"
(kdexport.jobs.run_side_by_side with N workers, default one per thread, each on threads / N threads). It prints
the median and range of the seconds of each, the ratio of medians, and each case's validation accuracy in both
modes (they may differ in the last images: the thread count changes the order of floating-point sums).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdexport.jobs import run_side_by_side
from kdexport.prune import PruneConfig, prune_checkpoint


def level(run_dir: str, out: str, method: str, amount: float, epochs: int) -> float:
    row = prune_checkpoint(Path(run_dir) / "student.pt", PruneConfig(method=method, amount=amount), Path(out),
                           finetune_epochs=epochs, teacher_ckpt=Path(run_dir) / "teacher.pt", seed=0)
    return row["val_top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--cases", default="channel:0.3,channel:0.5,weight:0.5,weight:0.9")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args()
    cases = [(m, float(a)) for m, a in (c.split(":") for c in args.cases.split(","))]
    jobs = args.jobs or torch.get_num_threads()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; side by side: {jobs} workers, "
          f"{max(1, torch.get_num_threads() // jobs)} thread(s) each; {args.epochs} fine-tuning epochs a case")
    with tempfile.TemporaryDirectory() as tmp:
        calls = [(level, (str(args.run_dir), f"{tmp}/{m}-{a}.pt", m, a, args.epochs)) for m, a in cases]
        level(*calls[0][1])  # fills the teacher memo, as distillation does before compress's levels
        times: dict[str, list[float]] = {"one at a time": [], "side by side": []}
        acc: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for mode, n in (("one at a time", 1), ("side by side", jobs)):
                t0 = time.perf_counter()
                acc[mode] = run_side_by_side(calls, n)
                times[mode].append(time.perf_counter() - t0)
    for mode, ts in times.items():
        print(f"{mode:14s} median {statistics.median(ts):6.2f} s  range {min(ts):.2f}-{max(ts):.2f} s  "
              f"({len(ts)} rounds of {len(cases)} levels)")
    one, side = (statistics.median(times[m]) for m in ("one at a time", "side by side"))
    print(f"one at a time / side by side: {one / side:.2f}x")
    for (m, a), one, side in zip(cases, acc["one at a time"], acc["side by side"], strict=True):
        print(f"  {m} {a:.0%}: validation top-1 {one:.2f} one at a time, {side:.2f} side by side")


if __name__ == "__main__":
    main()
