"""ResNet-18/34/50/101/152 on torchvision's definition."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv

from .base import ClassifierContract, cifar_conv
from .registry import register_model


class ResNet(ClassifierContract, tv.ResNet):
    classifier_attr = "fc"

    def __init__(self, block, layers, num_classes: int, stem: str):
        super().__init__(block, layers, num_classes=num_classes)
        self.num_features = self.fc.in_features
        if stem == "cifar":
            self.conv1 = cifar_conv(self.conv1)
            self.maxpool = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))



@register_model
def resnet18(num_classes: int, stem: str, input_size) -> ResNet:
    return ResNet(tv.BasicBlock, [2, 2, 2, 2], num_classes, stem)


@register_model
def resnet34(num_classes: int, stem: str, input_size) -> ResNet:
    return ResNet(tv.BasicBlock, [3, 4, 6, 3], num_classes, stem)


@register_model
def resnet50(num_classes: int, stem: str, input_size) -> ResNet:
    return ResNet(tv.Bottleneck, [3, 4, 6, 3], num_classes, stem)


@register_model
def resnet101(num_classes: int, stem: str, input_size) -> ResNet:
    return ResNet(tv.Bottleneck, [3, 4, 23, 3], num_classes, stem)


@register_model
def resnet152(num_classes: int, stem: str, input_size) -> ResNet:
    return ResNet(tv.Bottleneck, [3, 8, 36, 3], num_classes, stem)
