"""SimKD (Chen et al., CVPR 2022) and vanilla KD (Hinton et al. 2015).

SimKD trains a projector that maps the student's last feature map onto the teacher's, with an MSE loss, and
reuses the teacher's frozen classifier. The deployed `DistilledStudent` (a zoo model, kdexport.models.distilled)
is student backbone -> projector -> teacher classifier: unlike the official code, it never runs the teacher
backbone at inference. To make that possible the maps are aligned *after* the projector (adaptive average
pooling to the smaller map), so the deployed forward pass is exactly the one that was trained.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import models
from .checkpoint import load_model
from .data import DEFAULT_VAL_FRACTION, check_image_size, dataset_info
from .errors import CheckpointError, ConfigError
from .models import DistilledStudent, build_projector
from .preflight import check_device, check_output
from .runid import optional
from .train import fit, pick_device, seed_everything, split_loaders
from .vocab import DISTILL_METHODS


@dataclass(frozen=True)
class DistillConfig:
    method: str = "simkd"
    projector_factor: int = 2
    temperature: float = 4.0
    alpha: float = 0.9
    cls_weight: float = 1.0  # SimKD: cross-entropy through the frozen teacher classifier (official code: 0)
    match_bn: bool = True  # SimKD: start the projector's output BN at the teacher's moments (official code: no)

    def __post_init__(self):
        if self.method not in DISTILL_METHODS:
            raise ConfigError(f"unknown distillation method {self.method!r}; "
                              f"choose one of: {', '.join(DISTILL_METHODS)}")
        if self.projector_factor < 1:
            raise ConfigError(f"--projector-factor must be >= 1, got {self.projector_factor}")
        if not self.temperature > 0 or not 0 <= self.alpha <= 1:
            raise ConfigError("--temperature must be > 0 and --alpha in [0, 1]")
        if not self.cls_weight >= 0:
            raise ConfigError(f"--cls-weight must be >= 0, got {self.cls_weight}")

    @classmethod
    def official(cls, **kw: Any) -> DistillConfig:
        """SimKD exactly as the official code trains it: the feature MSE alone, no moment match."""
        return cls("simkd", cls_weight=0.0, match_bn=False, **kw)


@torch.no_grad()
def match_output_bn_(projector: nn.Sequential, teacher_features: torch.Tensor) -> None:
    """Start the projector's output BN -> ReLU at the teacher's per-channel feature statistics.

    For X = ReLU(g Z + b), Z ~ N(0, 1): P(X > 0) = Phi(r) and E[X] = g (phi(r) + r Phi(r)) with r = b / g.
    Solving with the teacher's non-zero fraction and mean per channel gives (g, b). With small maps the
    teacher's features are large (norm ~18 vs ~8 at init here), and SGD takes many epochs to grow BN's
    affine parameters that far; this moment match removes that delay without changing the objective.
    """
    bn = projector[-2]
    if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != teacher_features.shape[1]:
        raise ValueError("the projector must end in BatchNorm2d -> ReLU at the teacher's width")
    normal = torch.distributions.Normal(0.0, 1.0)
    feats = teacher_features.float().transpose(0, 1).flatten(1)  # (C, N*H*W)
    positive = (feats > 0).float().mean(1).clamp(0.02, 0.98)
    r = normal.icdf(positive)
    g = feats.mean(1) / (normal.log_prob(r).exp() + r * positive)
    g = g.clamp_min(1e-3)
    bn.weight.copy_(g)
    bn.bias.copy_(r * g)


def align(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two maps to the smaller one's spatial size."""
    ha, hb = a.shape[-2:], b.shape[-2:]
    if ha == hb:
        return a, b
    size = (min(ha[0], hb[0]), min(ha[1], hb[1]))
    return F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)


class TeacherMemo:
    """A frozen teacher whose CPU outputs are remembered, keyed by its weights and the input batch's bytes.

    The answer is exact: a hit returns the very tensor the teacher computed for the same weights and the same
    input. It pays where stages of one process draw the same batches. In `compress`, distillation and every pruned
    level's fine-tuning start their loaders from the run's seed, and nothing random runs between the draws, so they
    shuffle and augment alike epoch by epoch, and the teacher runs once per distinct batch instead of once per
    stage (benchmarks/RESULTS.md). The memo is shared by every TeacherMemo of the process and holds at most
    `MAX_BYTES`, least recently used first out. CUDA inputs are passed through: there, the copy that would key
    them costs about what the teacher does. Returned tensors are shared: read them, never modify them in place.
    """

    MAX_BYTES = 1 << 30
    _store: OrderedDict[bytes, torch.Tensor] = OrderedDict()
    _bytes = 0
    hits = misses = 0

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher
        digest = hashlib.blake2b(digest_size=16)
        for name, t in teacher.state_dict().items():
            digest.update(name.encode())
            digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        self.fingerprint = digest.digest()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._remembered("features", x, self.teacher.forward_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._remembered("logits", x, self.teacher)

    def _remembered(self, kind: str, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]):
        if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or self.teacher.training:
            return compute(x)
        digest = hashlib.blake2b(self.fingerprint, digest_size=16)
        digest.update(f"{kind}{tuple(x.shape)}{x.dtype}".encode())
        digest.update(x.detach().contiguous().view(-1).view(torch.uint8).numpy())
        key, cls = digest.digest(), TeacherMemo
        if key in cls._store:
            cls.hits += 1
            cls._store.move_to_end(key)
            return cls._store[key]
        cls.misses += 1
        out = compute(x).detach()
        cls._store[key] = out
        cls._bytes += out.nbytes
        while cls._bytes > cls.MAX_BYTES and cls._store:
            cls._bytes -= cls._store.popitem(last=False)[1].nbytes
        return out

    @classmethod
    def clear(cls) -> None:
        cls._store.clear()
        cls._bytes = cls.hits = cls.misses = 0


def simkd_step(teacher: nn.Module | TeacherMemo, cls_weight: float = 0.0):
    """Training step for a DistilledStudent: MSE between projected student and teacher features.

    `cls_weight` > 0 adds cross-entropy on the deployed logits, i.e. through the projector and the frozen
    teacher classifier. This is kdexport's departure from the official objective (MSE alone); it is not the
    official framework's gamma, which puts cross-entropy on the student's own classifier. MSE weighs every
    channel alike, and on short runs with small maps the student fits the teacher's class-irrelevant variance
    first; the CE term points it at the classifier's subspace.
    """

    def step(student: DistilledStudent, x: torch.Tensor, y: torch.Tensor):
        with torch.no_grad():
            ft = teacher.forward_features(x)
        fs = student.forward_features(x)
        loss = F.mse_loss(*align(fs.float(), ft.float()))
        if cls_weight:
            logits = student.head(fs)
            return loss + cls_weight * F.cross_entropy(logits.float(), y), logits
        with torch.no_grad():
            logits = student.head(fs)
        return loss, logits

    return step


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, y: torch.Tensor, temperature: float,
            alpha: float) -> torch.Tensor:
    """Hinton KD: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""
    t = temperature
    kl = F.kl_div(F.log_softmax(logits_s.float() / t, 1), F.log_softmax(logits_t.float() / t, 1),
                  reduction="batchmean", log_target=True)
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(logits_s.float(), y)


def kd_step(teacher: nn.Module | TeacherMemo, temperature: float, alpha: float):
    def step(student: nn.Module, x: torch.Tensor, y: torch.Tensor):
        with torch.no_grad():
            logits_t = teacher(x)
        logits = student(x)
        return kd_loss(logits, logits_t, y, temperature, alpha), logits

    return step


def distillation_step(student: nn.Module, teacher: nn.Module, method: str, temperature: float = 4.0,
                      alpha: float = 0.9, cls_weight: float = 0.0, memo: bool = False):
    """The training objective of a student of either kind (also used for fine-tuning after pruning).

    `memo`: read the teacher's outputs through a TeacherMemo (exact; it pays when stages repeat batches).
    """
    teacher.eval().requires_grad_(False).to(memory_format=torch.channels_last)  # as the student (train.to_batch)
    if memo:
        teacher = TeacherMemo(teacher)
    if method == "simkd":
        if not isinstance(student, DistilledStudent):
            raise ConfigError("SimKD needs a DistilledStudent (a checkpoint written by `kdexport distill`)")
        return simkd_step(teacher, cls_weight)
    return kd_step(teacher, temperature, alpha)


def distill_run(pair: models.Pair, seed: int, epochs: int, recipe, config: DistillConfig,
                augmentation: str, pretrained: str | None = None) -> dict[str, Any]:
    """What identifies a distillation run (see train.train_run); the data split and image size are the teacher's."""
    return {"stage": "distill", "pair": pair.name, "seed": seed, "epochs": epochs, "recipe": recipe.to_dict(),
            "augmentation": augmentation, "distill": distill_settings(config),
            **optional(revision=models.model_revision(pair.student) or None, pretrained=pretrained)}


def distill_settings(config: DistillConfig) -> dict[str, Any]:
    return {"method": config.method, "temperature": config.temperature, "alpha": config.alpha,
            "cls_weight": config.cls_weight, "match_bn": config.match_bn}


def student_spec(teacher_spec: dict[str, Any], pair: models.Pair, config: DistillConfig) -> dict[str, Any]:
    """The checkpoint spec of a student distilled from a teacher checkpoint."""
    keep = {k: teacher_spec[k] for k in ("num_classes", "stem", "input_size", "dataset", "mean", "std")}
    keep["val_fraction"] = teacher_spec.get("val_fraction", DEFAULT_VAL_FRACTION)
    common = {"pair": pair.name, "teacher": pair.teacher, "student": pair.student,
              "distill": distill_settings(config)}
    if config.method == "simkd":
        student = models.create_model(pair.student, keep["num_classes"], stem=keep["stem"],
                                      input_size=tuple(keep["input_size"]))
        return {"kind": "distilled", **keep, **common, "projector_factor": config.projector_factor,
                "projector_kernel": models.projector_kernel(student, tuple(keep["input_size"]))}
    return {"kind": "model", **keep, **common, "model": pair.student}


def new_student(spec: dict[str, Any], teacher: nn.Module, pretrained: str | Path | None = None) -> nn.Module:
    """A freshly initialised student for `spec` (its backbone from a local torchvision state_dict `pretrained`),
    carrying the trained teacher's classifier for SimKD."""
    s = models.create_model(spec["student"], spec["num_classes"], stem=spec["stem"],
                            input_size=tuple(spec["input_size"]), pretrained=pretrained)
    if spec["kind"] == "distilled":
        return DistilledStudent.from_models(teacher, s, spec["projector_factor"], spec["projector_kernel"])
    return s


__all__ = ["DistillConfig", "DistilledStudent", "TeacherMemo", "build_projector", "align", "kd_loss",
           "distillation_step",
           "student_spec", "new_student"]


def distill(teacher_ckpt: str | Path, pair_name: str | None, out: str | Path, *, config: DistillConfig, recipe,
            epochs: int, seed: int = 0, data_dir: str | Path | None = None, device: str | None = None,
            resume: bool | None = None, image_size=None, workers: int | None = None,
            pretrained: str | Path | None = None) -> dict[str, float]:
    """Distil the pair's student from a trained teacher checkpoint; writes a student checkpoint at `out`.

    The student works at the teacher's image size (an explicit `image_size` must agree); `pretrained` is a local
    torchvision state_dict for the student's backbone."""
    check_output(out, inputs=(teacher_ckpt, pretrained))
    check_device(device)
    teacher, tspec = load_model(teacher_ckpt)
    if tspec["kind"] != "model":
        raise CheckpointError(f"{teacher_ckpt} is a {tspec['kind']} checkpoint; the teacher must be a trained "
                              "classifier (`kdexport train`)")
    if pair_name is None:
        raise ConfigError("--pair is required (a pair name or TEACHER:STUDENT)")
    pair = models.resolve_pair(pair_name)
    if tspec["model"] != pair.teacher:
        raise CheckpointError(f"{teacher_ckpt} holds {tspec['model']}, but pair {pair.name} needs teacher "
                              f"{pair.teacher}; pass the matching --teacher")
    size = check_image_size(image_size, tspec["input_size"], teacher_ckpt)
    spec = student_spec(tspec, pair, config)
    spec["run"] = distill_run(pair, seed, epochs, recipe, config, dataset_info(tspec["dataset"], data_dir).augmentation,
                              pretrained)
    spec["recipe"] = recipe.to_dict()
    spec["metrics"] = {"teacher_top1": tspec.get("metrics", {}).get("top1")}
    seed_everything(seed)
    student = new_student(spec, teacher, pretrained)
    dev = pick_device(device)
    train, val, test = split_loaders(tspec["dataset"], recipe.batch_size, data_dir, spec["val_fraction"],
                                     image_size=size, workers=workers, device=dev, drop_last=recipe.drop_last)
    if config.method == "simkd" and config.match_bn:
        with torch.no_grad():
            calib = torch.cat([x for x, _ in itertools.islice(iter(train), 4)])
            match_output_bn_(student.projector, teacher.forward_features(calib))
    teacher.to(dev)
    step = distillation_step(student, teacher, config.method, config.temperature, config.alpha, config.cls_weight,
                             memo=True)
    return fit(student, step, train, val, test, recipe, epochs, Path(out), spec, device=dev, seed=seed, resume=resume,
               label=f"distill {pair.student}")
