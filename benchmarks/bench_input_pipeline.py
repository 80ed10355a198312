"""The training input pipeline of an image folder at 224 px: images/s per worker count, peak memory per dataset size,
and the model step it feeds.

    python benchmarks/bench_input_pipeline.py --root /work/scratch/i14/bench [--sizes 2000,20000] [--workers 0,1,2]

A folder of N generated photographs (kdexport.imagefolder.write_image_folder: 10 classes, JPEG and PNG, about
256x192, every size different) is written under ROOT once per N and reused. Each configuration (N, workers) runs
in its own process, so that its peak RSS is its own: it builds the training loader exactly as `kdexport train
--dataset imagefolder --image-size 224` does (lazy decode, RandomResizedCrop + flip, normalisation, batch 64),
reads `--warmup` batches untimed, then `--batches` timed ones, with torch at `--threads` intra-op threads (1, as
in DataLoader workers: with 2 on a loaded 2-core machine the main process's small tensor ops spin against each
other). Images/s: over all timed batches, and the median and 10th/90th percentiles over windows of
max(1, workers) batches (workers deliver in turns, so single intervals alternate between ~0 and a whole round).
Peak RSS is the process's high-water mark and the largest worker's; both include torch's own ~0.3 GB. Last, one
training step (forward, backward, SGD) of a model at 224 px on this CPU gives the rate the pipeline has to keep
up with.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kdexport import models
from kdexport.data import make_loader
from kdexport.imagefolder import write_image_folder

SIZE, BATCH, CLASSES = 224, 64, 10


def folder(root: Path, n: int) -> Path:
    """ROOT/nN: N training images in 10 classes (and one test image per class), written once."""
    path, done = root / f"n{n}", root / f"n{n}" / ".complete"
    if not done.is_file():
        t0 = time.perf_counter()
        write_image_folder(path, classes=CLASSES, per_class={"train": n // CLASSES, "test": 1}, size=(256, 192))
        done.write_text(f"{time.perf_counter() - t0:.1f} s\n")
    return path


def child(path: Path, workers: int, warmup: int, batches: int, threads: int) -> dict:
    """One configuration, in this process: rates and peak memory of the training loader."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    loader = make_loader("imagefolder", "train", BATCH, path, image_size=SIZE, workers=workers)
    build_s = time.perf_counter() - t0
    if len(loader) < warmup + batches + 1:
        raise SystemExit(f"{path} has {len(loader)} batches of {BATCH}; use more images or fewer --batches")
    it = iter(loader)
    stamps = []
    for i in range(warmup + batches + 1):
        x, _ = next(it)
        assert x.shape == (BATCH, 3, SIZE, SIZE)
        if i >= warmup:
            stamps.append(time.perf_counter())
    del it  # shuts the workers down, so that RUSAGE_CHILDREN holds them
    # workers deliver their batches in turns, in bursts of `workers`: rate over windows of that many batches
    k = max(1, workers)
    rates = BATCH * k / np.diff(stamps[::k])
    return {"images": len(loader.dataset), "workers": workers, "threads": threads, "build_s": build_s,
            "ips_overall": BATCH * (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "ips_median": float(np.median(rates)), "ips_p10": float(np.percentile(rates, 10)),
            "ips_p90": float(np.percentile(rates, 90)),
            "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if workers else None}


def model_step(name: str, batch: int, warmup: int, iters: int) -> dict:
    """Median images/s of one SGD training step of `name` at 224 px on this CPU."""
    model = models.create_model(name, CLASSES, input_size=(3, SIZE, SIZE)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, SIZE, SIZE), torch.randint(0, CLASSES, (batch,))
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"model": name, "batch": batch, "threads": torch.get_num_threads(),
            "ips_median": batch / statistics.median(times), "ips_p10": batch / np.percentile(times, 90),
            "ips_p90": batch / np.percentile(times, 10)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="where the generated folders go (not the repo)")
    parser.add_argument("--sizes", default="2000,20000", help="comma list of training-image counts")
    parser.add_argument("--workers", default="0,1,2", help="comma list of DataLoader worker counts")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches")
    parser.add_argument("--batches", type=int, default=20, help="timed batches (of 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the loading process")
    parser.add_argument("--models", default="squeezenet1_1,resnet18", help="models whose step is timed")
    parser.add_argument("--model-batch", type=int, default=16, help="batch of the timed model step")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), int(args.child[1]), args.warmup, args.batches, args.threads)))
        return
    rows, counts = [], []
    for n in (int(s) for s in args.sizes.split(",")):
        path = folder(args.root, n)
        for w in (int(s) for s in args.workers.split(",")):
            out = subprocess.run([sys.executable, __file__, "--root", str(args.root), "--child", str(path), str(w),
                                  "--threads", str(args.threads), "--warmup",
                                  str(args.warmup), "--batches", str(args.batches)],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"n={n}, workers={w} failed:\n{out.stderr}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            counts.append(n)
            print(json.dumps(rows[-1]), file=sys.stderr)
    steps = [model_step(m, args.model_batch, 1, 3) for m in args.models.split(",")]
    load = os.getloadavg()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load[0]:.1f} "
          f"{load[1]:.1f} {load[2]:.1f} at the end; torch {torch.__version__}, batch {BATCH}, {SIZE} px, "
          f"{args.threads} torch thread(s) in the loading process, {args.warmup} + {args.batches} batches\n")
    print("| generated | training split | workers | loader built in | images/s overall | median | p10 | p90 | "
          "peak RSS main | largest worker |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in zip(counts, rows, strict=True):
        worker = f"{r['rss_worker_mb']:.0f} MiB" if r["rss_worker_mb"] else "-"
        print(f"| {n:,} | {r['images']:,} | {r['workers']} | {r['build_s']:.2f} s | {r['ips_overall']:.0f} | "
              f"{r['ips_median']:.0f} | "
              f"{r['ips_p10']:.0f} | {r['ips_p90']:.0f} | {r['rss_main_mb']:.0f} MiB | {worker} |")
    print("\n| model step (fwd + bwd + SGD), 224 px | batch | threads | images/s median | p10 | p90 |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in steps:
        print(f"| {s['model']} | {s['batch']} | {s['threads']} | {s['ips_median']:.1f} | {s['ips_p10']:.1f} | "
              f"{s['ips_p90']:.1f} |")


if __name__ == "__main__":
    main()
