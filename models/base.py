"""The contract every model keeps, which SimKD and pruning rely on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def classify(classifier: nn.Module, feat: torch.Tensor, pool_first: bool = True) -> torch.Tensor:
    """Logits from an unpooled map: pool, flatten, classifier (a conv classifier runs first, then flatten)."""
    if pool_first:
        return classifier(torch.flatten(F.adaptive_avg_pool2d(feat, 1), 1))
    return torch.flatten(classifier(feat), 1)


class ClassifierContract:
    """Mixin: `forward_features` -> unpooled map (final activation applied), `forward_head` -> logits.

    Subclasses set `classifier_attr` (the torchvision module name of the classifier) and `num_features`.
    """

    classifier_attr: str = "classifier"
    pool_first: bool = True
    num_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_attr)

    def reset_classifier(self) -> None:
        """Drop the classifier (a distilled student reuses the teacher's)."""
        setattr(self, self.classifier_attr, nn.Identity())

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        return classify(self.get_classifier(), feat, self.pool_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ClassifierHead(nn.Module):
    """A classifier detached from its backbone, applied the way its model applies it."""

    def __init__(self, classifier: nn.Module, pool_first: bool = True):
        super().__init__()
        self.classifier = classifier
        self.pool_first = pool_first

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return classify(self.classifier, feat, self.pool_first)


def cifar_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """The CIFAR stem's first conv: 3x3, stride 1, padding 1, same channels and bias."""
    return nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None)
