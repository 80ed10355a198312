"""EfficientNet-B0..B5 on torchvision's definition (same width/depth multipliers and norm layers; no dropout;
BatchNorm momentum 0.1 for B5, see EfficientNet.__init__)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision.models import efficientnet as tv

from .base import ClassifierContract
from .registry import register_model


class EfficientNet(ClassifierContract, tv.EfficientNet):
    def __init__(self, variant: str, width: float, depth: float, num_classes: int, stem: str):
        setting, last_channel = tv._efficientnet_conf(variant, width_mult=width, depth_mult=depth)
        # torchvision gives B5 and up BatchNorm eps 1e-3 and momentum 0.01 (TensorFlow's decay 0.99), a running
        # average over ~100 steps, sized for ImageNet's hundreds of thousands. In the digits' ~600 steps it trails
        # the weights: an EfficientNet-B5 teacher read 12.5% validation top-1 in eval mode at its last epoch, and
        # 74% once its statistics were re-estimated (benchmarks/RESULTS.md). B5 keeps eps 1e-3 (it is part of the
        # deployed model) and takes torch's momentum 0.1, as B0-B4 have; momentum acts only in training.
        norm = partial(nn.BatchNorm2d, eps=0.001) if variant >= "efficientnet_b5" else None
        # torchvision's stochastic depth (0.2) and dropout (0.2-0.4) are regularisers tuned for 350-epoch ImageNet
        # runs; in the digits' 10-12 epochs they only slow training (EfficientNet-B1's best validation accuracy
        # after 10 epochs: 66% with them, 82% without). Both act only in training: the deployed model is the same.
        super().__init__(setting, dropout=0.0, stochastic_depth_prob=0.0, num_classes=num_classes,
                         last_channel=last_channel, norm_layer=norm)
        self.num_features = self.classifier[-1].in_features
        # torchvision draws the head from U(+-1 / sqrt(num_classes)), sized for ImageNet's 1000 classes: with 10 the
        # initial logits have std ~5 and the loss starts at 6-7 instead of ln 10. torch's default Linear init,
        # U(+-1 / sqrt(in_features)), keeps them small for any class count (at 1000 classes it is the same scale).
        with torch.random.fork_rng(devices=[]):  # the seeded draws of whatever is built next stay as they were
            self.classifier[-1].reset_parameters()
        if stem == "cifar":
            self.features[0][0].stride = (1, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)



_VARIANTS = {  # name: (width_mult, depth_mult), as torchvision's builders
    "efficientnet_b0": (1.0, 1.0),
    "efficientnet_b1": (1.0, 1.1),
    "efficientnet_b2": (1.1, 1.2),
    "efficientnet_b3": (1.2, 1.4),
    "efficientnet_b4": (1.4, 1.8),
    "efficientnet_b5": (1.6, 2.2),
}


def _register(variant: str) -> None:
    width, depth = _VARIANTS[variant]

    def factory(num_classes: int, stem: str, input_size) -> EfficientNet:
        return EfficientNet(variant, width, depth, num_classes, stem)

    factory.__name__ = variant
    factory.__doc__ = f"{variant} (width {width}, depth {depth})."
    # 1: a head init independent of the class count; 2: no stochastic depth or dropout; 3 (B5): BN momentum 0.1
    factory.revision = 3 if variant >= "efficientnet_b5" else 2
    register_model(factory)


for _variant in _VARIANTS:
    _register(_variant)
