"""How much fine-tuning a pruned student needs: validation top-1 after each fine-tuning epoch, per lr and schedule.

    python benchmarks/bench_finetune.py RUN_DIR [--case METHOD:LEVEL:LR:SCHEDULE:EPOCHS[:STEPS[:WARMUP]] ...]
        [--seeds 0,1,2]
    python benchmarks/bench_finetune.py runs_s0 runs_s1 runs_s2 --case channel:0.5:0.01:cosine:16

RUN_DIR is a `kdexport compress` run directory (its student.pt and teacher.pt are used as they are). With one,
the spread is over fine-tuning `--seeds` of that one student. With several (say one per `compress --seed`), each
is fine-tuned with its own run's seed (from its manifest), and the spread covers the whole pipeline. Each case
prunes the student (L1, the pipeline's default scope: global for weight, per layer for channel, round_to 8),
re-estimates BatchNorm statistics, fine-tunes it with the pipeline's fine-tuning recipe (kdexport.vocab.
finetune_recipe) at LR under SCHEDULE (constant, cosine or step), EPOCHS epochs, and reads the validation top-1
after every epoch from the fine-tuning log (EPOCHS 0: pruning and recalibration alone). STEPS (default 1) prunes
iteratively, as `kdexport prune --steps`: STEPS geometric steps to LEVEL, EPOCHS of fine-tuning after each (the
curve runs over all of them). The final columns are the kept epoch's (kdexport.vocab.FINETUNE_KEEP) validation and
test top-1, mean ± standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from kdexport.prune import PruneConfig, prune_checkpoint
from kdexport.summary import mean_sd, pm
from kdexport.train import seed_everything
from kdexport.vocab import finetune_recipe

DEFAULT_CASES = ["channel:0.5:0.01:cosine:0", "weight:0.9:0.01:cosine:0",
                 "channel:0.5:0.01:cosine:2", "channel:0.5:0.01:cosine:4", "channel:0.5:0.01:cosine:8",
                 "weight:0.9:0.01:cosine:2", "weight:0.9:0.01:cosine:4", "weight:0.9:0.01:cosine:8"]


def _fields(case: str) -> list[str]:
    """METHOD:LEVEL:LR:SCHEDULE:EPOCHS[:STEPS[:WARMUP]], STEPS defaulting to 1 and WARMUP to 0."""
    fields = case.split(":")
    if len(fields) not in (5, 6, 7):
        raise SystemExit(f"--case {case!r}: expected METHOD:LEVEL:LR:SCHEDULE:EPOCHS[:STEPS[:WARMUP]]")
    return fields + ["1", "0"][len(fields) - 5:]


def _each(runs: list[dict], key: str) -> str:
    """"mean ± sd (a / b / c)": the spread and every run's value, in RUN_DIR or seed order."""
    each = " / ".join(f"{r[key]:.2f}" for r in runs)
    return pm(*mean_sd(r[key] for r in runs)) + (f" ({each})" if len(runs) > 1 else "")


def run_case(run_dir: Path, case: str, out: Path, seed: int) -> dict:
    method, level, lr, schedule, epochs, steps, warmup = _fields(case)
    config = PruneConfig(method=method, amount=float(level), round_to=8, steps=int(steps))
    path = out / f"{method}-{level}-{lr}-{schedule}-{epochs}-{steps}-{warmup}-s{seed}.pt"
    seed_everything(seed)
    t0 = time.perf_counter()
    row = prune_checkpoint(run_dir / "student.pt", config, path, finetune_epochs=int(epochs),
                           teacher_ckpt=run_dir / "teacher.pt", seed=seed,
                           recipe=dataclasses.replace(finetune_recipe(float(lr)), schedule=schedule,
                                                     warmup=float(warmup)))
    log = path.with_name(path.stem + ".log.jsonl")
    curve = [json.loads(line)["val_top1"] for line in log.read_text().splitlines()] if log.is_file() else []
    return {"case": case, "curve": curve, "top1": row["top1"], "val_top1": row["val_top1"],
            "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    parser.add_argument("--case", action="append", help="METHOD:LEVEL:LR:SCHEDULE:EPOCHS[:STEPS] (repeatable)")
    parser.add_argument("--seeds", default="0", help="comma list of fine-tuning seeds (one RUN_DIR only)")
    args = parser.parse_args()
    cases = args.case or DEFAULT_CASES
    if len(args.run_dirs) == 1:
        jobs = [(args.run_dirs[0], int(s)) for s in args.seeds.split(",")]
    else:
        jobs = [(d, json.loads((d / "manifest.json").read_text())["config"]["seed"]) for d in args.run_dirs]
    with tempfile.TemporaryDirectory() as out:
        runs = {case: [run_case(d, case, Path(out), seed) for d, seed in jobs] for case in cases}
    width = max(len(r["curve"]) for rs in runs.values() for r in rs) or 1
    epochs = " | ".join(f"val epoch {e}" for e in range(1, width + 1))
    print(f"| method | level | lr | schedule | steps | warm-up | {epochs} | kept: val top-1 | kept: test top-1 "
          "| seconds |")
    print("|---|---:|---:|---|---:|---:|" + "---:|" * (width + 3))
    for case, rs in runs.items():
        method, level, lr, schedule, _, steps, warmup = _fields(case)
        curve = [pm(*mean_sd(r["curve"][e] for r in rs if e < len(r["curve"]))) for e in range(width)]
        print(f"| {method} | {float(level):.0%} | {lr} | {schedule} | {steps} | {warmup} | " + " | ".join(curve)
              + f" | {_each(rs, 'val_top1')} | {_each(rs, 'top1')} | "
              f"{sum(r['seconds'] for r in rs) / len(rs):.0f} |")


if __name__ == "__main__":
    main()
