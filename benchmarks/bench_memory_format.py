"""Training-step cost of the zoo's models in NCHW against channels-last memory format, on this machine's CPU.

One step is what `kdexport.train.fit` runs: forward, cross-entropy, backward, an SGD step (the models in train
mode, at the digits' 32x32 with the ImageNet stem). The NCHW copy and the channels-last copy of each model (the
same weights) alternate step by step after a warm-up, so load changes on a shared machine hit both alike; the
ratio is of the two medians from the same run. `fit` trains in channels-last since this measurement.

    python benchmarks/bench_memory_format.py                                  # the README pair, default threads
    OMP_NUM_THREADS=1 python benchmarks/bench_memory_format.py --models mobilenet,efficientnet_b0 --steps 20
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from bench_distill_step import cpu_model, percentile, train_step  # the benchmarks folder is on sys.path

from kdexport import models
from kdexport.data import sample_batch
from kdexport.train import ce_step, get_recipe, make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="densenet169,mobilenet")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    x = sample_batch("digits", args.batch, split="train")
    y = torch.arange(len(x)) % 10
    print(f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, "
          f"{args.steps} steps after {args.warmup} of warm-up")
    print("| model | NCHW ms/step (p50, p90) | channels-last ms/step (p50, p90) | speed-up (p50 ratio) |")
    print("|---|---:|---:|---:|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        nchw = models.create_model(name, 10, stem="imagenet", input_size=(3, 32, 32)).train()
        last = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
        runs = {}
        for key, model, batch in (("nchw", nchw, x), ("last", last, x.contiguous(memory_format=torch.channels_last))):
            runs[key] = (model, *make_optimizer(list(model.parameters()), get_recipe("cosine"), 1, 10 ** 6), batch)
        times = {"nchw": [], "last": []}
        for i in range(args.warmup + args.steps):
            for key, (model, opt, sched, batch) in runs.items():
                t0 = time.perf_counter()
                train_step(model, ce_step, opt, sched, batch, y)
                if i >= args.warmup:
                    times[key].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {name} | {med['nchw']:.0f} ({percentile(times['nchw'], 90):.0f}) | {med['last']:.0f} "
              f"({percentile(times['last'], 90):.0f}) | {med['nchw'] / med['last']:.2f}x |")


if __name__ == "__main__":
    main()
