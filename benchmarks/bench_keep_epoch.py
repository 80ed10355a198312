"""Which epoch should fine-tuning after pruning keep? The best on validation, the lowest validation loss, or the last.

    python benchmarks/bench_keep_epoch.py RUN_DIR:SEED [RUN_DIR:SEED ...] --out DIR [--splits 500]

Each RUN_DIR is a `kdexport compress` run directory (student.pt, teacher.pt) and SEED its --seed. For every level
compress fine-tunes (weight and channel 30-90%, for vocab.FINETUNE_EPOCHS; weight first, so that the first run fills
the teacher memo for the rest), the fine-tuning is redone as compress does it, recording after each epoch which
validation images the model gets right and their cross-entropy (DIR/s<SEED>-<method>-<level>.npz; existing files
are reused, so an interrupted run continues). The test split is never read.

Then, for each run and each of SPLITS random halvings of the validation images, each rule chooses an epoch on one
half and is scored on the other (both ways round): a rule that picks a lucky epoch scores worse on the held-out
half. Choosing on half of validation is noisier than choosing on all of it, so the differences are an upper bound
of what the full split would show. It prints each run's held-out accuracy per rule and, per method, the mean
difference to the best-top-1 rule and how many runs each rule won or lost.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import kdexport.train as train
from kdexport.prune import PruneConfig, prune_checkpoint
from kdexport.vocab import finetune_epochs, finetune_recipe

CASES = [("weight", 0.3), ("weight", 0.5), ("weight", 0.7), ("weight", 0.9),
         ("channel", 0.5), ("channel", 0.3), ("channel", 0.7), ("channel", 0.9)]
RULES = {
    "best top-1": lambda c, nll: max(range(len(c)), key=lambda e: (c[e].mean(), -nll[e].mean(), e)),  # fit's "best"
    "lowest loss": lambda c, nll: int(np.argmin(nll.mean(1))),
    "last epoch": lambda c, nll: len(c) - 1,
}


def record_epochs(run_dir: Path, seed: int, out: Path) -> None:
    """Fine-tune every case of one run, saving per-epoch, per-image validation results."""
    evaluate, seen = train.evaluate, []
    val_size = len(train.split_loaders("digits", 256, None, train.DEFAULT_VAL_FRACTION)[1].dataset)

    @torch.no_grad()
    def recording(model, loader, device="cpu"):
        if len(loader.dataset) == val_size:  # the validation split; the test split is never looked at
            model.eval()
            right, nll = [], []
            for x, y in loader:
                logits = model(x.to(device)).float().cpu()
                right.append((logits.argmax(1) == y).numpy())
                nll.append(F.cross_entropy(logits, y, reduction="none").numpy())
            seen.append((np.concatenate(right), np.concatenate(nll)))
        return evaluate(model, loader, device)

    train.evaluate = recording
    try:
        for method, level in CASES:
            path = out / f"s{seed}-{method}-{level}.npz"
            if path.exists():
                continue
            seen.clear()
            epochs = finetune_epochs(method)
            prune_checkpoint(run_dir / "student.pt", PruneConfig(method=method, amount=level), out / "tmp.pt",
                             finetune_epochs=epochs, teacher_ckpt=run_dir / "teacher.pt", recipe=finetune_recipe(),
                             seed=seed)
            np.savez(path, correct=np.stack([r for r, _ in seen[:epochs]]), nll=np.stack([n for _, n in seen[:epochs]]))
            print(f"{path.name}: validation top-1 per epoch "
                  f"{[round(100 * r.mean(), 2) for r, _ in seen[:epochs]]}", flush=True)
    finally:
        train.evaluate = evaluate
        for name in ("tmp.pt", "tmp.log.jsonl"):
            (out / name).unlink(missing_ok=True)


def split_half(out: Path, splits: int) -> None:
    rng = np.random.default_rng(0)
    by_method: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for path in sorted(out.glob("s*-*-*.npz")):
        data = np.load(path)
        correct, nll = data["correct"].astype(float), data["nll"]
        n = correct.shape[1]
        scores: dict[str, list[float]] = collections.defaultdict(list)
        for _ in range(splits):
            order = rng.permutation(n)
            for a, b in ((order[: n // 2], order[n // 2:]), (order[n // 2:], order[: n // 2])):
                for rule, choose in RULES.items():
                    scores[rule].append(100 * correct[choose(correct[:, a], nll[:, a]), b].mean())
        method = path.stem.split("-")[1]
        print(f"{path.stem:18s} " + "  ".join(f"{rule} {np.mean(s):6.2f}" for rule, s in scores.items()))
        for rule, s in scores.items():
            by_method[method][rule].append(float(np.mean(s)))
            by_method["all"][rule].append(float(np.mean(s)))
    for method, rules in by_method.items():
        base = np.array(rules["best top-1"])
        for rule, values in rules.items():
            diff = np.array(values) - base
            print(f"{method:8s} {rule:12s} runs {len(values):2d}  held-out mean {np.mean(values):6.2f}  vs best "
                  f"top-1 {diff.mean():+.2f}  (better / worse / same: {(diff > 0.005).sum()} / "
                  f"{(diff < -0.005).sum()} / {(abs(diff) <= 0.005).sum()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="RUN_DIR:SEED")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--splits", type=int, default=500)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        run_dir, seed = run.rsplit(":", 1)
        record_epochs(Path(run_dir), int(seed), args.out)
    split_half(args.out, args.splits)


if __name__ == "__main__":
    main()
