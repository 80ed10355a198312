"""MobileNet v1 (written here: torchvision has none) and MobileNet v2 (torchvision's)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import mobilenetv2 as tv

from .base import ClassifierContract
from .registry import register_model


def _conv_bn(cin: int, cout: int, stride: int, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv -> BN -> ReLU, then 1x1 pointwise conv -> BN -> ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(_conv_bn(cin, cin, stride, groups=cin), _conv_bn(cin, cout, 1, kernel=1))


# (out_channels, stride) of the 13 depthwise-separable blocks, Howard et al. 2017, Table 1
_V1_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


class MobileNetV1(ClassifierContract, nn.Module):
    """MobileNet v1 (width 1.0): 4.23M parameters with 1000 classes."""

    def __init__(self, num_classes: int, stem: str):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 1 if stem == "cifar" else 2)]
        cin = 32
        for cout, stride in _V1_BLOCKS:
            layers.append(DepthwiseSeparable(cin, cout, stride))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.num_features = cin
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class MobileNetV2(ClassifierContract, tv.MobileNetV2):
    def __init__(self, num_classes: int, stem: str):
        super().__init__(num_classes=num_classes)
        self.num_features = self.last_channel
        if stem == "cifar":
            self.features[0][0].stride = (1, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_model
def mobilenet(num_classes: int, stem: str, input_size) -> MobileNetV1:
    return MobileNetV1(num_classes, stem)


@register_model
def mobilenet_v2(num_classes: int, stem: str, input_size) -> MobileNetV2:
    return MobileNetV2(num_classes, stem)
