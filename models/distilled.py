"""SimKD's deployed model: student backbone -> projector -> the teacher's frozen classifier.

A model like any other in the zoo (forward_features / forward_head / get_classifier / num_features, under the
zoo's contract test), so checkpoints rebuild it without importing the distillation stage. Unlike the official
SimKD code it never runs the teacher backbone at inference.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .base import ClassifierHead
from .errors import ModelError
from .registry import create_model


def build_projector(s_channels: int, t_channels: int, factor: int = 2, kernel: int = 3) -> nn.Sequential:
    """conv1x1 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv1x1 -> BN -> ReLU, inner width t / factor.

    `kernel` 1 makes the middle conv 1x1: on a 1x1 map a padded 3x3 conv is exactly its centre tap, and the
    other eight taps only multiply padding (see `projector_kernel`). The 1x1 conv starts as the centre tap of
    the 3x3 conv the method specifies (same random draws, same scale), so training follows the same path.
    """
    if kernel not in (1, 3):
        raise ModelError(f"the projector's middle conv is 1x1 or 3x3, got kernel {kernel!r}")
    mid = max(1, t_channels // factor)
    first = nn.Conv2d(s_channels, mid, 1, bias=False)
    middle = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
    if kernel == 1:  # the 3x3 conv's centre tap, drawn from the same initialisation: the same training, fewer weights
        centre = middle.weight.detach()[:, :, 1:2, 1:2].clone()
        middle = nn.utils.skip_init(nn.Conv2d, mid, mid, 1, bias=False)  # draws nothing: later layers keep theirs
        with torch.no_grad():
            middle.weight.copy_(centre)
    return nn.Sequential(
        first, nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        middle, nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, t_channels, 1, bias=False), nn.BatchNorm2d(t_channels), nn.ReLU(inplace=True),
    )


@torch.no_grad()
def projector_kernel(student: nn.Module, input_size) -> int:
    """SimKD's 3x3 middle conv, or 1x1 where the student's last map is 1x1 at `input_size`.

    At 32 px with the ImageNet stem every zoo student ends at 1x1: a 3x3 conv there computes only with its centre
    tap, and its other eight ninths are parameters that are stored, counted, pruned and exported but never change
    an output (their gradients are zero). The 1x1 conv computes the same function without them.
    """
    was_training = student.training
    fmap = student.eval().forward_features(torch.zeros(1, *input_size))
    student.train(was_training)
    return 1 if tuple(fmap.shape[-2:]) == (1, 1) else 3


class DistilledStudent(nn.Module):
    """student.forward_features -> projector -> the teacher's (frozen) classifier. No teacher backbone inside."""

    def __init__(self, student: nn.Module, projector: nn.Module, head: ClassifierHead):
        super().__init__()
        student.reset_classifier()  # its own classifier never runs: do not ship or count it
        self.student, self.projector, self.head = student, projector, head
        self.head.requires_grad_(False)

    @classmethod
    def from_models(cls, teacher: nn.Module, student: nn.Module, projector_factor: int = 2,
                    projector_kernel: int = 3) -> DistilledStudent:
        head = ClassifierHead(copy.deepcopy(teacher.get_classifier()), teacher.pool_first)
        projector = build_projector(student.num_features, teacher.num_features, projector_factor, projector_kernel)
        return cls(student, projector, head)

    @classmethod
    def from_names(cls, teacher: str, student: str, *, num_classes: int, stem: str, input_size,
                   projector_factor: int = 2, projector_kernel: int = 3) -> DistilledStudent:
        t = create_model(teacher, num_classes, stem=stem, input_size=input_size)
        s = create_model(student, num_classes, stem=stem, input_size=input_size)
        return cls.from_models(t, s, projector_factor, projector_kernel)

    @property
    def num_features(self) -> int:
        """The width of the projected map: the teacher's (the projector's output conv is never pruned)."""
        return [m for m in self.projector.modules() if isinstance(m, nn.Conv2d)][-1].out_channels

    def get_classifier(self) -> nn.Module:
        return self.head.classifier

    def train(self, mode: bool = True) -> DistilledStudent:
        super().train(mode)
        self.head.eval()  # frozen: its dropout stays off
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The projected map, in the teacher's feature space."""
        return self.projector(self.student.forward_features(x))

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        return self.head(feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def is_distilled(model: nn.Module) -> bool:
    """A SimKD DistilledStudent: its backbone is `model.student`, its classifier the teacher's."""
    return isinstance(model, DistilledStudent)
