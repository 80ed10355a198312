"""DenseNet-161/169/201 on torchvision's definition."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import densenet as tv

from .base import ClassifierContract, cifar_conv
from .registry import register_model


class DenseNet(ClassifierContract, tv.DenseNet):
    def __init__(self, growth_rate: int, block_config, num_init_features: int, num_classes: int, stem: str):
        super().__init__(growth_rate, tuple(block_config), num_init_features, num_classes=num_classes)
        self.num_features = self.classifier.in_features
        if stem == "cifar":
            self.features.conv0 = cifar_conv(self.features.conv0)
            self.features.pool0 = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x))  # torchvision applies this ReLU in forward(), after the last norm



@register_model
def densenet161(num_classes: int, stem: str, input_size) -> DenseNet:
    return DenseNet(48, (6, 12, 36, 24), 96, num_classes, stem)


@register_model
def densenet169(num_classes: int, stem: str, input_size) -> DenseNet:
    return DenseNet(32, (6, 12, 32, 32), 64, num_classes, stem)


@register_model
def densenet201(num_classes: int, stem: str, input_size) -> DenseNet:
    return DenseNet(32, (6, 12, 48, 32), 64, num_classes, stem)
