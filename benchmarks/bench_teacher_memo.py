"""What the teacher memo (kdexport.distill.TeacherMemo) saves in compress's fine-tuning stages, and that it
changes no result.

    python benchmarks/bench_teacher_memo.py RUN_DIR [--epochs 2] [--rounds 3] [--case channel:0.5]

RUN_DIR is a `kdexport compress` run directory (its student.pt and teacher.pt). Each round prunes the student and
fine-tunes it for EPOCHS epochs three times, as compress fine-tunes its levels: "off" (the memo keeps nothing:
every step runs the teacher, the hashing is still paid), "cold" (an empty memo: the first level of a run) and
"warm" (the memo as the previous level left it: every later level, and every level after distillation). The
rounds interleave the three, so a change of machine load hits all alike. It prints the median and the range of
the seconds of each, the ratios of medians, the memo's hits and misses, and whether the three fine-tuned models
have the same validation and test accuracy (they must: a hit is the teacher's own output).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdexport.distill import TeacherMemo
from kdexport.prune import PruneConfig, prune_checkpoint


def timed(run_dir: Path, out: Path, config: PruneConfig, epochs: int, seed: int) -> tuple[float, dict]:
    t0 = time.perf_counter()
    row = prune_checkpoint(run_dir / "student.pt", config, out, finetune_epochs=epochs,
                           teacher_ckpt=run_dir / "teacher.pt", seed=seed)
    return time.perf_counter() - t0, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--case", default="channel:0.5", help="METHOD:LEVEL")
    args = parser.parse_args()
    method, level = args.case.split(":")
    config = PruneConfig(method=method, amount=float(level))
    seed = json.loads((args.run_dir / "manifest.json").read_text())["config"]["seed"]
    seconds: dict[str, list[float]] = {"off": [], "cold": [], "warm": []}
    accuracy: dict[str, set] = {k: set() for k in seconds}
    default_max = TeacherMemo.MAX_BYTES
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for kind in seconds:
                if kind != "warm":
                    TeacherMemo.clear()
                TeacherMemo.MAX_BYTES = 0 if kind == "off" else default_max
                s, row = timed(args.run_dir, Path(tmp) / f"{kind}-{r}.pt", config, args.epochs, seed)
                seconds[kind].append(s)
                accuracy[kind].add((row["val_top1"], row["top1"]))
                if kind == "warm":
                    hits, misses = TeacherMemo.hits, TeacherMemo.misses
    med = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"{args.case}, {args.epochs} fine-tuning epochs, {args.rounds} rounds, {torch.get_num_threads()} torch "
          f"threads")
    print("| memo | median s | min s | max s | × off |")
    print("|---|---:|---:|---:|---:|")
    for k, v in seconds.items():
        print(f"| {k} | {med[k]:.1f} | {min(v):.1f} | {max(v):.1f} | {med[k] / med['off']:.2f} |")
    print(f"cold + warm (the last round): {hits} hits, {misses} misses")
    same = len(set().union(*accuracy.values())) == 1
    print(f"(val, test) top-1 of all {3 * args.rounds} runs: {sorted(set().union(*accuracy.values()))} — "
          f"{'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
