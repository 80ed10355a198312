"""One stage trained with training loaders that drop their last partial batch: the check behind RESULTS.md's
seventh round, ahead of the fix in kdexport.data.make_loader.

    python benchmarks/check_drop_last.py b2-student TEACHER_CKPT OUT   # effb3-effb2 seed 2's SimKD B2 student
    python benchmarks/check_drop_last.py b5-teacher OUT                # effb5-effb4 seed 0's B5 teacher

DataLoader is patched so that a shuffled loader (the training split) with at least one full batch sets
`drop_last=True`; everything else is the `compress` stage at its defaults (recipe, epochs, seed).
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch.utils.data import DataLoader

from kdexport.distill import DistillConfig, distill
from kdexport.train import train_classifier
from kdexport.vocab import STUDENT_EPOCHS, STUDENT_RECIPE, TEACHER_EPOCHS, TEACHER_RECIPE, model_recipe

_init = DataLoader.__init__


def _dropping_init(self, dataset, *args, shuffle=False, drop_last=False, **kwargs):
    full = shuffle and len(dataset) >= kwargs.get("batch_size", 1)
    _init(self, dataset, *args, shuffle=shuffle, drop_last=drop_last or full, **kwargs)


def main() -> None:
    DataLoader.__init__ = _dropping_init
    what, *paths = sys.argv[1:]
    if what == "b2-student":
        teacher, out = paths
        r = distill(teacher, "effb3-effb2", Path(out), config=DistillConfig(), epochs=STUDENT_EPOCHS, seed=2,
                    recipe=model_recipe(STUDENT_RECIPE, "efficientnet_b2"), device="cpu")
    elif what == "b5-teacher":
        r = train_classifier("efficientnet_b5", "digits", Path(paths[0]), epochs=TEACHER_EPOCHS, seed=0,
                             recipe=model_recipe(TEACHER_RECIPE, "efficientnet_b5"), device="cpu")
    else:
        raise SystemExit(f"unknown check {what!r}: b2-student or b5-teacher")
    print(what, f"val {r['val_top1']:.2f} test {r['top1']:.2f} best epoch {r.get('best_epoch')}")


if __name__ == "__main__":
    main()
