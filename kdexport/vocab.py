"""The shared vocabulary: methods, levels, file names, recipes, backends and formats, each defined once.

Every stage, orchestrator and the CLI import their names from here, so a change of vocabulary is a change in
this file. It sits on the ground floor: it imports only the zoo (`models`) and `errors`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from . import models
from .errors import ConfigError

# ------------------------------------------------------------------------------------------------ names
METHODS = ("weight", "channel")  # pruning methods
SCOPES = ("global", "layer")  # pruning scopes
FINETUNE_SCOPES = ("all", "head")
DISTILL_METHODS = ("simkd", "kd")
STEMS = models.STEMS
DEFAULT_STEM = models.DEFAULT_STEM
BREAKPOINT_METHODS = ("tolerance", "knee")
EXECUTORS = ("local", "ray")
PARAM_COLUMNS = {"student": "params_nonzero", "deployed": "deployed_params"}  # the efficiency's parameters
PARAM_KINDS = tuple(PARAM_COLUMNS)


# ----------------------------------------------------------------------------------------------- levels
DEFAULT_LEVELS = (0.0, 0.3, 0.5, 0.7, 0.9)  # compress's default


def norm_level(level: float) -> float:
    """Levels are keys: round them so that 0.1 * 3 and 0.3 are the same level."""
    return round(float(level), 6)


def parse_levels(text: str) -> tuple[float, ...]:
    """`START:STOP:STEP` (STOP included) or a comma list -> sorted levels, each in [0, 1), no duplicates."""
    try:
        if ":" in text:
            start, stop, step = (float(p) for p in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = int(round((stop - start) / step))
            levels = [norm_level(start + i * step) for i in range(n + 1) if start + i * step <= stop + 1e-9]
        else:
            levels = [norm_level(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--levels {text!r}: give START:STOP:STEP (e.g. 0:0.9:0.1) or a comma list "
                          "(e.g. 0,0.5,0.9)") from None
    return check_levels(levels)


def check_levels(levels: Iterable[float]) -> tuple[float, ...]:
    """Sorted, normalised levels; ConfigError when empty, outside [0, 1) or repeated."""
    levels = tuple(norm_level(v) for v in levels)
    if not levels:
        raise ConfigError("--levels is empty; give at least one pruning level in [0, 1)")
    if any(not 0 <= v < 1 for v in levels):
        raise ConfigError(f"--levels must lie in [0, 1), got {', '.join(map(str, levels))}")
    if len(set(levels)) != len(levels):
        raise ConfigError(f"--levels has duplicates: {', '.join(map(str, levels))}")
    return tuple(sorted(levels))


def split_csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_methods(text: str) -> tuple[str, ...]:
    """A comma list of pruning methods, each once, in the order given."""
    methods = tuple(dict.fromkeys(split_csv(text)))
    if not methods or any(m not in METHODS for m in methods):
        raise ConfigError(f"unknown method in --methods {text!r}; give a comma list of {', '.join(METHODS)}")
    return methods


def check_methods(methods: Iterable[str]) -> tuple[str, ...]:
    methods = tuple(methods)
    if not methods or any(m not in METHODS for m in methods):
        raise ConfigError(f"unknown method in --methods {methods}; give a subset of {', '.join(METHODS)}")
    return methods


def parse_pairs(text: str) -> tuple[str, ...]:
    """Comma list of pair names / TEACHER:STUDENT, or `all` (every registered pair, see `kdexport pairs`)."""
    return check_pairs(list(models.PAIRS) if text.strip() == "all" else split_csv(text))


def check_pairs(names: Iterable[str]) -> tuple[str, ...]:
    names = tuple(names)
    if not names:
        raise ConfigError("--pairs is empty; give pair names, TEACHER:STUDENT, or all")
    return tuple(models.resolve_pair(n).name for n in names)


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """--batch: a comma list of integers (ProfileConfig checks that they are distinct and positive)."""
    try:
        return tuple(int(b) for b in split_csv(text))
    except ValueError:
        raise ConfigError(f"--batch takes a comma list of integers, got {text!r}") from None


def finetune_epochs(method: str, epochs: int | None = None) -> int:
    """Fine-tuning epochs after pruning with `method`: `epochs` when given, else the method's default."""
    return FINETUNE_EPOCHS[method] if epochs is None else epochs


def check_epochs(**epochs: int | None) -> None:
    """ConfigError naming the first negative epoch count (keyword names become --kebab-case flags; None: default)."""
    for name, value in epochs.items():
        if value is not None and value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")


def check_repeats(repeats: int) -> None:
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")


# ------------------------------------------------------------------------------------------- file names
RUNS_ROOT = Path("runs")
TEACHER_FILE = "teacher.pt"
STUDENT_FILE = "student.pt"
BASELINE_FILE = "baseline.pt"  # the student trained alone (CE only): what distillation is measured against
MANIFEST_FILE = "manifest.json"
RESULTS_FILE = "results.json"
STORE_NAME = "results.sqlite"


def run_directory(root: str | Path, dataset: str, pair: str) -> Path:
    """<root>/<dataset>/<pair>, a TEACHER:STUDENT pair written TEACHER-STUDENT."""
    return Path(root) / dataset / pair.replace(":", "-")


def trained_path(dataset: str, model: str) -> Path:
    """Where `kdexport train` writes a model by default: runs/<dataset>/<model>.pt."""
    return RUNS_ROOT / dataset / f"{model}.pt"


def student_file(seed: int, base_seed: int) -> str:
    """student.pt for the run's seed, student-s<seed>.pt for a repeat's."""
    return STUDENT_FILE if seed == base_seed else f"student-s{seed}.pt"


def level_file(method: str, level: float, seed: int | None = None, base_seed: int | None = None) -> str:
    """<method>-<level:.2f>.pt, with -s<seed> for a repeat's seed."""
    suffix = "" if seed == base_seed else f"-s{seed}"
    return f"{method}-{level:.2f}{suffix}.pt"


# ---------------------------------------------------------------------------------------------- recipes
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class Recipe:
    """Optimisation hyper-parameters. Warm-up and milestones are fractions of the run, so a recipe scales to any
    epoch count."""

    name: str
    lr: float
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    batch_size: int = 64
    schedule: str = "step"  # step | cosine | constant
    milestones: tuple[float, ...] = (0.625, 0.75, 0.875)  # SimKD's 150/180/210 of 240 epochs
    gamma: float = 0.1
    warmup: float = 0.0  # linear warm-up over this fraction of the run, before the schedule
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the KD term in vanilla KD
    # Drop the training split's partial last batch (when it holds a full one). Kept, that batch's BatchNorm update
    # rests on a few images; on the digits (1,221 training images, 5 left over at batch 32 or 64) it cost the
    # EfficientNets at 32 px 8-55 points of validation accuracy (benchmarks/RESULTS.md, seventh round).
    drop_last: bool = True

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.schedule not in ("step", "cosine", "constant"):
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose step, cosine or constant")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ConfigError("momentum must be in [0, 1) and weight decay >= 0")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warm-up must be a fraction of the run in [0, 1), got {self.warmup}")

    def to_dict(self) -> dict[str, Any]:
        """As JSON stores it (tuples as lists), so a run identity compares equal after a round trip."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


RECIPES = {
    # Malihi & Heidemann 2024: SGD, Nesterov momentum 0.9, lr 0.001, batch 64, weight decay 5e-4, T = 4
    "paper": Recipe("paper", lr=0.001, nesterov=True, schedule="constant"),
    # the official SimKD code: lr 0.05, step decay x0.1 at 62.5/75/87.5% of the run
    "simkd": Recipe("simkd", lr=0.05),
    # short runs (kdexport's default for students): Nesterov SGD at batch 32 (twice the steps of batch 64 for the
    # same compute), linear warm-up over the first 10% of the steps, then cosine to zero; see benchmarks/RESULTS.md
    "cosine": Recipe("cosine", lr=0.05, nesterov=True, batch_size=32, schedule="cosine", warmup=0.1),
    # short runs of large teachers: AdamW with the same warm-up and cosine; SGD at lr 0.05 left DenseNet-169
    # unstable on the digits (loss spikes, 95-99% from seed to seed)
    "adamw": Recipe("adamw", lr=0.002, optimizer="adamw", weight_decay=0.05, schedule="cosine", warmup=0.1),
}
RECIPE_NAMES = tuple(RECIPES)
TEACHER_RECIPE = "adamw"  # teachers: `train`, and the teacher stage of `compress` and `sweep`
STUDENT_RECIPE = "cosine"  # students: `distill`, the student-alone baseline, fine-tuning after pruning
# Fine-tuning after pruning: the student recipe (SGD, cosine) without warm-up, at lr 0.01, after the BatchNorm
# statistics are re-estimated. Epochs per method, from the recovery curves in benchmarks/RESULTS.md (validation):
# a 90%-weight-pruned student (every layer keeping >= 2%) gains 0.5-1.4 points of validation accuracy from 4
# epochs to 8 on each of three seeds (of 4 at lr 0.01 or 0.003, 8, and 3 iterative steps of 4); a
# 50%-channel-pruned one gains 2-5 points of validation accuracy from 10 epochs to 16, and 0.5 more at 20 (the
# students' own 20 epochs, whose teacher outputs the fine-tuning finds in distill.TeacherMemo).
FINETUNE_LR = 0.01  # lr 0.02 and the student recipe (0.05, warm-up) were within the noise on nine channel-50% runs
FINETUNE_EPOCHS = {"weight": 8, "channel": 20}
# Which epoch a training run saves (train.fit): the best on validation, or the last. Fine-tuning keeps the last: in
# 11 of 14 of the README pair's fine-tuning runs, the best epoch chosen on one half of validation scored lower on
# the other half than the last epoch (benchmarks/bench_keep_epoch.py; RESULTS.md, "Which fine-tuning epoch to keep").
KEEP_EPOCH = ("best", "last")
FINETUNE_KEEP = "last"
TEACHER_EPOCHS = 16  # the default run's teacher: at 10 its validation accuracy was still rising (RESULTS.md)
STUDENT_EPOCHS = 20  # distillation and the student-alone baseline


def get_recipe(name: str, **overrides: Any) -> Recipe:
    """A named recipe with individual flags (those not None) overriding it."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return dataclasses.replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


def finetune_recipe(lr: float | None = None) -> Recipe:
    """The fine-tuning recipe after pruning: the student recipe without warm-up, at `lr` (default FINETUNE_LR)."""
    return get_recipe(STUDENT_RECIPE, lr=FINETUNE_LR if lr is None else lr, warmup=0.0)


# Per-family departures from the shared recipes: {model-name prefix: {recipe asked for: (recipe used, its fields
# changed)}}, applied by model_recipe() to the model being trained (a distilled student's family, not its
# teacher's). They change the recipe, so they are part of every run identity and checkpoint spec. Measured on the
# digits' validation split: EfficientNets diverge at the students' SGD lr 0.05 (training loss climbing after the
# warm-up, 2.5 to 3.9) and stay near chance under the teachers' AdamW at lr 0.002 (B1: 10% after 3 of 10 epochs);
# SGD at lr 0.01, the linear-scaling rule's 0.1 x 32 / 256 for batch 32, trains B0 to 96% in 12 epochs.
# SqueezeNet has no BatchNorm: under SGD at lr 0.05 (0.01 and 0.02 too) its features shrink towards zero within the
# first epoch and stay there; AdamW at lr 0.001, batch 32, trains it to 90% in 12 epochs.
FAMILY_RECIPES: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "efficientnet_": {"cosine": ("cosine", {"lr": 0.01}), "adamw": ("cosine", {"lr": 0.01})},
    "squeezenet": {"cosine": ("adamw", {"lr": 0.001, "batch_size": 32}),
                   "adamw": ("adamw", {"lr": 0.001, "batch_size": 32})},
}


def model_recipe(name: str, model: str, **overrides: Any) -> Recipe:
    """Recipe `name` for training `model`: its family's departure (FAMILY_RECIPES), then the user's flags."""
    used, fields = name, {}
    for prefix, departures in FAMILY_RECIPES.items():
        if model.startswith(prefix) and name in departures:
            used, fields = departures[name]
    return get_recipe(used, **{**fields, **{k: v for k, v in overrides.items() if v is not None}})


# ------------------------------------------------------------------------------------ backends, formats
class Backend(str, Enum):
    """Runtimes that `kdexport profile` measures (auto: the fastest that runs here)."""

    TORCH = "torch"
    TORCH_SPARSE = "torch-sparse"
    ORT_CPU = "ort-cpu"
    ORT_CUDA = "ort-cuda"
    ORT_TRT = "ort-trt"
    TENSORRT = "tensorrt"
    OPENVINO = "openvino"
    AUTO = "auto"


BACKENDS = tuple(b.value for b in Backend)


class Format(str, Enum):
    """What `kdexport export` writes; `trt` is an alias of tensorrt."""

    ONNX = "onnx"
    TENSORRT = "tensorrt"
    OPENVINO = "openvino"

    @classmethod
    def _missing_(cls, value: object) -> Format | None:
        alias = ALIASES.get(str(value).lower())
        return cls(alias) if alias else None


ALIASES = {"trt": "tensorrt"}
FORMAT_NAMES = tuple(f.value for f in Format) + tuple(ALIASES)  # what --format accepts
INT8_TARGETS = ("tensorrt", "cpu")  # the QDQ recipes of kdexport.export.int8
CALIB_METHODS = ("auto", "minmax", "entropy", "percentile")  # onnxruntime.quantization calibrators; auto: chosen
OV_DEVICES = ("CPU", "GPU", "NPU")  # OpenVINO devices (`profile --backend openvino --ov-device`)
