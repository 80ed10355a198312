"""LeNet-5 (conv C5 layer, so the features stay a map) and LeNet-300-100 (an MLP; features are a 1x1 map)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import ClassifierContract
from .registry import register_model


class LeNet5(ClassifierContract, nn.Module):
    """LeCun et al. 1998 with ReLU and max-pooling; at 32x32 input the C5 map is 1x1, as in the paper."""

    def __init__(self, num_classes: int, in_chans: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 120, 5), nn.ReLU(inplace=True),
        )
        self.num_features = 120
        self.classifier = nn.Sequential(nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class LeNet300100(ClassifierContract, nn.Module):
    """The 300-100 MLP of the pruning literature, on the flattened image."""

    def __init__(self, num_classes: int, input_size: tuple[int, int, int]):
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(input_size), 300), nn.ReLU(inplace=True),
            nn.Linear(300, 100), nn.ReLU(inplace=True),
        )
        self.num_features = 100
        self.classifier = nn.Linear(100, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[:, :, None, None]


@register_model
def lenet5(num_classes: int, stem: str, input_size) -> LeNet5:
    return LeNet5(num_classes, in_chans=input_size[0])


@register_model
def lenet300_100(num_classes: int, stem: str, input_size) -> LeNet300100:
    return LeNet300100(num_classes, input_size)
