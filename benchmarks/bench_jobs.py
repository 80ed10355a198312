"""What running compress's stages side by side saves (kdexport.jobs): pruned levels fine-tuned one at a time on
all threads against the same levels in forked workers with a share of the threads each.

    python benchmarks/bench_jobs.py RUN_DIR [--cases channel:0.3,channel:0.5,weight:0.5,weight:0.9]
                                            [--epochs 2] [--rounds 3] [--jobs N]
    python benchmarks/bench_jobs.py --steps     (only the training-step times below)

`--steps` times one training step (SGD, cross-entropy, random 32 px batches) of the README pair's models on all
of torch's threads and on one, in alternating blocks of 8 steps (3 warm-up steps each), median of 16: MobileNet
at batch 32 (the student's fine-tuning and the baseline) and DenseNet-169 at batch 64 (the teacher). The ratio
says how much a stage gains from a second thread, and so whether stages are better run side by side.

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
from kdexport.models import create_model
from kdexport.prune import PruneConfig, prune_checkpoint


def level(run_dir: str, out: str, method: str, amount: float, epochs: int) -> float:
    row = prune_checkpoint(Path(run_dir) / "student.pt", PruneConfig(method=method, amount=amount), Path(out),
                           finetune_epochs=epochs, teacher_ckpt=Path(run_dir) / "teacher.pt", seed=0)
    return row["val_top1"]


def step_times(rounds: int = 16) -> None:
    threads = torch.get_num_threads()
    for name, batch in (("mobilenet", 32), ("densenet169", 64)):
        model = create_model(name, num_classes=10).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        times: dict[int, list[float]] = {threads: [], 1: []}
        for _ in range(2):  # blocks of one thread count, alternating: switching it every step costs time itself
            for n in times:
                torch.set_num_threads(n)
                for i in range(rounds // 2 + 3):
                    t0 = time.perf_counter()
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(x), y).backward()
                    opt.step()
                    if i >= 3:
                        times[n].append(time.perf_counter() - t0)
        torch.set_num_threads(threads)
        ms = {n: 1000 * statistics.median(t) for n, t in times.items()}
        p90 = {n: 1000 * sorted(t)[int(0.9 * len(t))] for n, t in times.items()}
        print(f"{name} batch {batch}: {ms[threads]:.1f} ms/step on {threads} threads, {ms[1]:.1f} ms on 1 "
              f"(p90 {p90[threads]:.1f} / {p90[1]:.1f}); {threads} threads are "
              f"{ms[1] / ms[threads]:.2f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--steps", action="store_true", help="only time training steps on all threads and on one")
    parser.add_argument("--cases", default="channel:0.3,channel:0.5,weight:0.5,weight:0.9")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args()
    if args.steps:
        step_times()
        return
    if args.run_dir is None:
        parser.error("RUN_DIR is required unless --steps")
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
