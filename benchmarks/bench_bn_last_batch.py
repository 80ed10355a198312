"""What the training loader's last, partial batch does to a checkpoint's BatchNorm running statistics.

    python benchmarks/bench_bn_last_batch.py CHECKPOINT [CHECKPOINT ...] [--full 20]

Training loaders kept their last batch before recipes dropped it (`Recipe.drop_last`), so on the digits' 1,221
training images every epoch ended with a batch of 1221 mod 32 = 5 (batch 32) or 5 (batch 64), and validation
followed it. This reads the loader with its partial batch kept. For each checkpoint
this prints validation top-1 (eval mode):
- as saved;
- after `--full` full training batches in train mode, from the saved statistics at each BatchNorm's own
  momentum, as training updates them (no weight changes);
- after that, one forward pass of the epoch's partial batch, as at the end of every training epoch;
- after one more full batch on top of it;
- with a cumulative average over `--full` full batches (kdexport.train.recalibrate_bn_, what pruning uses).
"""

from __future__ import annotations

import argparse

import torch

from kdexport.checkpoint import load_model
from kdexport.train import evaluate, recalibrate_bn_, seed_everything, split_loaders


@torch.no_grad()
def _feed(model: torch.nn.Module, batches) -> None:
    model.train()
    for x in batches:
        model(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--full", type=int, default=20, help="full training batches to re-estimate from")
    parser.add_argument("--batch-size", type=int, default=32, help="the training batch size (the students' 32)")
    args = parser.parse_args()
    print("| checkpoint | partial batch | as saved | after full batches | + the partial batch | + one full batch "
          "| cumulative, full batches |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path in args.checkpoints:
        seed_everything(0)
        model, spec = load_model(path)
        train, val, _ = split_loaders(spec["dataset"], args.batch_size, None, spec["val_fraction"],
                                      image_size=spec["input_size"][1:], workers=0, drop_last=False)
        batches = [x for x, _ in train]
        full = [x for x in batches if len(x) == args.batch_size]
        partial = [x for x in batches if len(x) < args.batch_size]
        if not partial:
            print(f"| {path} | none | | | | | |")
            continue
        cells = [evaluate(model, val)["top1"]]
        _feed(model, full[:args.full])
        cells.append(evaluate(model, val)["top1"])
        _feed(model, partial)
        cells.append(evaluate(model, val)["top1"])
        _feed(model, full[-1:])
        cells.append(evaluate(model, val)["top1"])
        recalibrate_bn_(model, [(x, None) for x in full], batches=args.full)
        cells.append(evaluate(model, val)["top1"])
        print(f"| {path} | {len(partial[0])} images | " + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
