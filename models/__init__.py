"""The model zoo: torchvision architectures (and MobileNet v1, LeNets) behind one feature/head contract."""

from . import densenet, efficientnet, lenet, mobilenet, resnet, squeezenet  # noqa: F401  (registers the models)
from .base import ClassifierHead, classify
from .distilled import DistilledStudent, build_projector, is_distilled, projector_kernel
from .errors import ModelError, PretrainedWeightsError
from .pairs import PAIRS, Pair, resolve_pair
from .registry import DEFAULT_STEM, STEMS, count_params, create_model, list_models, model_revision, register_model

__all__ = [
    "ClassifierHead", "classify", "DistilledStudent", "build_projector", "is_distilled", "projector_kernel",
    "ModelError", "PretrainedWeightsError", "PAIRS", "Pair", "resolve_pair", "DEFAULT_STEM", "STEMS",
    "count_params", "create_model", "list_models", "model_revision", "register_model",
]
