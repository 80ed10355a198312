"""CPU latency and MACs of channel-pruned students against their dense originals (PyTorch eager).

For each model and stem, a dense model (10 classes, seed 0) and a copy pruned by
`kdexport.prune.prune_channels_` (L1, Torch-Pruning, round_to 8; default 50%, per-layer scope) are timed in
the same run: after a warm-up, every iteration times the dense model, then the pruned one, on the same input
(batch 1 and 32, 3x32x32, torch.inference_mode, eval), so a load change on a shared machine hits both alike.
Reported: median and p10/p90 per model, speedup = dense median / pruned median, and MACs (batch 1, conv +
linear, kdexport.metrics.count_macs) with their ratio. The torch thread count is fixed and printed.
The cifar stem (3x3 stride-1 first conv, no max-pool) keeps 32x32 maps large; the imagenet stem shrinks them
to 1x1 in the last stages, so fixed per-layer overheads dominate there.

    python benchmarks/bench_channel.py                                   # 5 models, both stems
    python benchmarks/bench_channel.py --stems cifar --iters 50 --out benchmarks/channel.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kdexport import models  # noqa: E402
from kdexport.metrics import count_macs  # noqa: E402
from kdexport.profile import environment  # noqa: E402
from kdexport.prune import PruneConfig, prune_channels_  # noqa: E402

MODELS = ("resnet18", "mobilenet", "mobilenet_v2", "efficientnet_b0", "densenet169")
SIZE = (3, 32, 32)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=models.list_models(), metavar="MODEL")
    p.add_argument("--stems", nargs="+", default=["cifar", "imagenet"], choices=models.STEMS)
    p.add_argument("--amount", type=float, default=0.5, help="fraction of channels to remove")
    p.add_argument("--scope", choices=["layer", "global"], default="layer")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch threads [all usable cores]")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    return p.parse_args(argv)


def stats(ms: list[float]) -> dict[str, float]:
    p10, p50, p90 = np.percentile(ms, [10, 50, 90])
    return {"p10_ms": float(p10), "median_ms": float(p50), "p90_ms": float(p90)}


@torch.inference_mode()
def paired_latency(dense: torch.nn.Module, pruned: torch.nn.Module, batch: int, warmup: int,
                   iters: int) -> tuple[dict, dict]:
    """Interleaved timings of the two models on one input: (dense stats, pruned stats)."""
    x = torch.randn(batch, *SIZE)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + iters):
        for model, out in zip((dense, pruned), times, strict=True):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                out.append((time.perf_counter() - t0) * 1e3)
    return stats(times[0]), stats(times[1])


def bench(name: str, stem: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    dense = models.create_model(name, 10, stem=stem, input_size=SIZE).eval()
    pruned = copy.deepcopy(dense)
    t0 = time.perf_counter()
    prune_channels_(pruned, PruneConfig("channel", args.amount, scope=args.scope), torch.randn(1, *SIZE))
    prune_s = time.perf_counter() - t0
    pruned.eval()
    row = {"model": name, "stem": stem, "prune_s": prune_s,
           "params_dense": sum(p.numel() for p in dense.parameters()),
           "params_pruned": sum(p.numel() for p in pruned.parameters()),
           "macs_dense": count_macs(dense, SIZE).dense, "macs_pruned": count_macs(pruned, SIZE).dense}
    row["macs_reduction"] = row["macs_dense"] / row["macs_pruned"]
    for batch in args.batches:
        d, p = paired_latency(dense, pruned, batch, args.warmup, args.iters)
        row[f"b{batch}"] = {"dense": d, "pruned": p, "speedup": d["median_ms"] / p["median_ms"]}
    return row


def fmt_ms(s: dict) -> str:
    return f"{s['median_ms']:.2f} ({s['p10_ms']:.2f}-{s['p90_ms']:.2f})"


def table(rows: list[dict], batches: list[int]) -> str:
    head = ["model", "stem", "params dense -> pruned", "MACs dense", "MACs pruned", "MACs x"]
    for b in batches:
        head += [f"b{b} dense ms", f"b{b} pruned ms", f"b{b} speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["stem"], f"{r['params_dense'] / 1e6:.2f}M -> {r['params_pruned'] / 1e6:.2f}M",
                 f"{r['macs_dense'] / 1e6:.1f}M", f"{r['macs_pruned'] / 1e6:.1f}M", f"{r['macs_reduction']:.2f}"]
        for b in batches:
            cell = r[f"b{b}"]
            cells += [fmt_ms(cell["dense"]), fmt_ms(cell["pruned"]), f"{cell['speedup']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    env = environment("cpu", threads=threads)
    tp_version = importlib.metadata.version("torch-pruning")  # torch_pruning.__version__ says 1.6.0 in 1.6.1
    command = "python benchmarks/bench_channel.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = (f"command: `{command.strip()}`\n\nCPU: {env['cpu_model']} ({env['usable_cores']} usable cores), torch "
              f"threads {threads}, torch {torch.__version__}, torch-pruning {tp_version}; "
              f"{args.amount:.0%} channels, scope {args.scope}, round_to 8, 10 classes, 3x32x32, eager, "
              f"warm-up {args.warmup}, {args.iters} iterations; ms = median (p10-p90)")
    rows = []
    for stem in args.stems:
        for name in args.models:
            rows.append(bench(name, stem, args))
            print(f"{name} ({stem}): done", file=sys.stderr, flush=True)
    print(header + "\n\n" + table(rows, args.batches))
    if args.out:
        args.out.write_text(json.dumps({"command": command, "threads": threads, "environment": env,
                                        "settings": vars(args) | {"out": str(args.out)}, "results": rows},
                                       indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
