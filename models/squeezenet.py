"""SqueezeNet 1.1 on torchvision's definition (a conv classifier, applied before pooling)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import squeezenet as tv

from .base import ClassifierContract, cifar_conv
from .registry import register_model


class SqueezeNet(ClassifierContract, tv.SqueezeNet):
    pool_first = False

    def __init__(self, num_classes: int, stem: str):
        super().__init__(version="1_1", num_classes=num_classes)
        self.num_features = self.classifier[1].in_channels
        if stem == "cifar":
            self.features[0] = cifar_conv(self.features[0])
            self.features[2] = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_model
def squeezenet1_1(num_classes: int, stem: str, input_size) -> SqueezeNet:
    return SqueezeNet(num_classes, stem)
