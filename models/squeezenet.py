"""SqueezeNet 1.1 on torchvision's definition (a conv classifier, applied before pooling; no ReLU on the logits)."""

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
        # torchvision applies a ReLU to the logits. All-zero logits are then a state that no gradient leaves, and
        # on the digits every recipe tried (SGD lr 0.0025-0.05, AdamW, either stem) fell into it within the first
        # epoch: loss exactly ln 10, chance accuracy. Logits need no sign constraint; no parameter changes.
        self.classifier[2] = nn.Identity()
        if stem == "cifar":
            self.features[0] = cifar_conv(self.features[0])
            self.features[2] = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_model
def squeezenet1_1(num_classes: int, stem: str, input_size) -> SqueezeNet:
    return SqueezeNet(num_classes, stem)


squeezenet1_1.revision = 1  # 1: no ReLU on the logits
