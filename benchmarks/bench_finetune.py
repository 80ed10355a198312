"""How much fine-tuning a pruned student needs: top-1 after each fine-tuning epoch, per lr and schedule.

    python benchmarks/bench_finetune.py RUN_DIR [--case METHOD:LEVEL:LR:SCHEDULE:EPOCHS ...]

RUN_DIR is a `kdexport compress` run directory (its student.pt and teacher.pt are used as they are). Each case
prunes the student (L1, the pipeline's default scope: global for weight, per layer for channel, round_to 8),
fine-tunes it with the paper's SGD recipe at LR under SCHEDULE (constant, cosine or step), EPOCHS epochs, and
reads top-1 after every epoch from the fine-tuning log (EPOCHS 0: pruning alone). Under a constant lr, epoch e
of a long case is the result of an e-epoch run (same seed, same data order), so one case gives the whole curve.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from kdexport.prune import PruneConfig, prune_checkpoint
from kdexport.train import get_recipe, seed_everything

DEFAULT_CASES = ["channel:0.5:0.01:constant:0", "weight:0.9:0.01:constant:0",
                 "channel:0.5:0.01:constant:6", "channel:0.5:0.05:constant:6", "channel:0.5:0.05:cosine:6",
                 "weight:0.9:0.01:constant:6", "weight:0.9:0.05:constant:6"]


def run_case(run_dir: Path, case: str, out: Path) -> dict:
    method, level, lr, schedule, epochs = case.split(":")
    config = PruneConfig(method=method, amount=float(level), round_to=8)
    path = out / f"{method}-{level}-{lr}-{schedule}-{epochs}.pt"
    seed_everything(0)
    t0 = time.perf_counter()
    row = prune_checkpoint(run_dir / "student.pt", config, path, finetune_epochs=int(epochs),
                           teacher_ckpt=run_dir / "teacher.pt", seed=0,
                           recipe=get_recipe("paper", lr=float(lr), schedule=schedule))
    log = path.with_name(path.stem + ".log.jsonl")
    curve = [json.loads(line)["top1"] for line in log.read_text().splitlines()] if log.is_file() else []
    return {"case": case, "curve": curve, "top1": row["top1"], "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--case", action="append", help="METHOD:LEVEL:LR:SCHEDULE:EPOCHS (repeatable)")
    args = parser.parse_args()
    cases = args.case or DEFAULT_CASES
    with tempfile.TemporaryDirectory() as out:
        rows = [run_case(args.run_dir, case, Path(out)) for case in cases]
    width = max(len(r["curve"]) for r in rows) or 1
    print("| method | level | lr | schedule | " + " | ".join(f"epoch {e}" for e in range(1, width + 1))
          + " | final top-1 | seconds |")
    print("|---|---:|---:|---|" + "---:|" * (width + 2))
    for r in rows:
        method, level, lr, schedule, _ = r["case"].split(":")
        cells = [f"{t:.2f}" for t in r["curve"]] + [""] * (width - len(r["curve"]))
        print(f"| {method} | {float(level):.0%} | {lr} | {schedule} | " + " | ".join(cells)
              + f" | {r['top1']:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
