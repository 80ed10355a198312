"""CPU cost of one SimKD training step against one plain (cross-entropy) training step of the same student.

SimKD step: teacher.forward_features (no grad) + student backbone + projector + MSE + backward + SGD step.
Plain step: student forward + cross-entropy + backward + SGD step. Teacher step: the same for the teacher, the
cost of the first stage. The projector's middle conv is what `kdexport distill` builds (`--projector-kernel auto`:
1x1 where the student's map is 1x1), or forced to 1 or 3. All use the project's own step functions
(`kdexport.distill.distillation_step`, `kdexport.train.ce_step`) on a batch of real digits images (32x32).
The two are interleaved step by step after a warm-up, so load changes on a shared machine hit both alike;
the ratio is of medians from the same run.

    python benchmarks/bench_distill_step.py                      # dens169-mobilenet, batch 64, imagenet stem
    python benchmarks/bench_distill_step.py --stem both --steps 10
    python benchmarks/bench_distill_step.py --projector-kernel both --teacher-step   # 1x1 vs 3x3 projector
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from kdexport import models
from kdexport.data import sample_batch
from kdexport.distill import DistilledStudent, distillation_step
from kdexport.train import ce_step, get_recipe, make_optimizer


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def train_step(model, step, opt, sched, x, y) -> None:
    loss, _ = step(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def bench_stem(pair: models.Pair, stem: str, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int,
               factor: int, kernel: str, teacher_step: bool) -> list[dict]:
    torch.manual_seed(0)
    teacher = models.create_model(pair.teacher, 10, stem=stem)
    student = models.create_model(pair.student, 10, stem=stem)
    auto = models.projector_kernel(student, tuple(x.shape[1:]))
    kernels = {"auto": [auto], "both": [1, 3]}.get(kernel) or [int(kernel)]
    distilled = {k: DistilledStudent.from_models(teacher, models.create_model(pair.student, 10, stem=stem), factor, k)
                 for k in kernels}
    plain = models.create_model(pair.student, 10, stem=stem)
    trained_teacher = models.create_model(pair.teacher, 10, stem=stem)
    recipe = get_recipe("simkd")
    runs = {}
    kinds = [(f"SimKD step ({k}x{k} projector{', the default' if k == auto else ''})", d,
              distillation_step(d, teacher, "simkd")) for k, d in distilled.items()]  # the teacher: eval, frozen
    kinds.append(("plain CE step", plain, ce_step))
    if teacher_step:
        kinds.append(("teacher CE step", trained_teacher, ce_step))
    for name, model, step in kinds:
        model.train()
        opt, sched = make_optimizer([p for p in model.parameters() if p.requires_grad], recipe, 1, steps + warmup)
        runs[name] = (model, step, opt, sched)

    def teacher_forward(*_):
        with torch.no_grad():
            teacher.forward_features(x)

    times: dict[str, list[float]] = {name: [] for name in [*runs, "teacher forward (no grad)"]}
    for i in range(warmup + steps):
        for name, (model, step, opt, sched) in runs.items():
            t0 = time.perf_counter()
            train_step(model, step, opt, sched, x, y)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        teacher_forward()
        if i >= warmup:
            times["teacher forward (no grad)"].append(time.perf_counter() - t0)

    base = statistics.median(times["plain CE step"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"stem": stem, "step": name, "median_ms": 1e3 * med, "p10_ms": 1e3 * percentile(ts, 10),
                     "p90_ms": 1e3 * percentile(ts, 90), "images_per_s": len(x) / med, "ratio": med / base})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pair", default="dens169-mobilenet")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--stem", choices=["imagenet", "cifar", "both"], default="imagenet")
    parser.add_argument("--projector-factor", type=int, default=2)
    parser.add_argument("--projector-kernel", choices=["auto", "1", "3", "both"], default="auto",
                        help="the projector's middle conv: auto is what `kdexport distill` builds; both times 1 and 3")
    parser.add_argument("--teacher-step", action="store_true", help="also time the teacher's own training step")
    parser.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pair = models.resolve_pair(args.pair)
    x = sample_batch("digits", args.batch, split="train")
    y = torch.arange(len(x)) % 10
    stems = ["imagenet", "cifar"] if args.stem == "both" else [args.stem]
    rows = [r for stem in stems for r in bench_stem(pair, stem, x, y, args.steps, args.warmup,
                                                     args.projector_factor, args.projector_kernel, args.teacher_step)]

    load = " / ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"### {pair.name} ({pair.teacher} -> {pair.student}): one training step, batch {len(x)}, "
          f"32x32 digits, CPU\n")
    print("| stem | step | median ms | p10 ms | p90 ms | images/s | x plain step |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stem']} | {r['step']} | {r['median_ms']:.1f} | {r['p10_ms']:.1f} | {r['p90_ms']:.1f} | "
              f"{r['images_per_s']:.0f} | {r['ratio']:.2f} |")
    print(f"\nCommand: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`".rstrip() + "  ")
    print(f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {load} (1/5/15 min)  ")
    print(f"Versions: Python {platform.python_version()}, torch {torch.__version__}; "
          f"{args.warmup} warm-up + {args.steps} timed steps of each kind, interleaved; "
          f"SGD (simkd recipe), projector factor {args.projector_factor}")


if __name__ == "__main__":
    main()
