"""The model zoo: torchvision architectures (and MobileNet v1, LeNets) behind one feature/head contract."""

from . import densenet, efficientnet, lenet, mobilenet, resnet, squeezenet  # noqa: F401  (registers the models)
from .base import ClassifierHead, classify
from .pairs import PAIRS, Pair, resolve_pair
from .registry import DEFAULT_STEM, STEMS, create_model, list_models, register_model

__all__ = [
    "ClassifierHead", "classify", "PAIRS", "Pair", "resolve_pair", "DEFAULT_STEM", "STEMS",
    "create_model", "list_models", "register_model",
]
