"""Model registry in the timm pattern: small factory functions decorated with @register_model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError, PretrainedWeightsError

STEMS = ("cifar", "imagenet")
DEFAULT_STEM = "imagenet"  # at 32x32 input it costs ~1/16 of the cifar stem's MACs: the README run stays fast

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory `fn(num_classes, stem, input_size) -> nn.Module` under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_revision(name: str) -> int:
    """How often a registered model's construction changed what it trains to (0: never); part of run identities,
    so that a checkpoint trained from an older construction is not reused as if it were current."""
    return getattr(_MODELS[name], "revision", 0)


def create_model(
    name: str,
    num_classes: int = 10,
    stem: str = DEFAULT_STEM,
    pretrained: str | Path | None = None,
    input_size: tuple[int, int, int] = (3, 32, 32),
) -> nn.Module:
    """Build a registered model; `pretrained` is a local torchvision-format state_dict (never downloaded)."""
    if name not in _MODELS:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if stem not in STEMS:
        raise ModelError(f"unknown stem {stem!r}; choose one of: {', '.join(STEMS)}")
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    model = _MODELS[name](num_classes=num_classes, stem=stem, input_size=tuple(input_size))
    if pretrained is not None:
        load_pretrained_(model, pretrained)
    return model


def load_pretrained_(model: nn.Module, path: str | Path) -> None:
    """Load a torchvision-format state_dict; tensors whose shape differs (a new head or a cifar stem) are skipped."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights not found: {path}; pass a local torchvision state_dict file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or pickled files
        raise PretrainedWeightsError(f"{path} is not a loadable state_dict ({type(exc).__name__}); "
                              "save one with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{path} does not hold a state_dict")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise PretrainedWeightsError(f"{path} does not match {type(model).__name__}: unexpected keys such as "
                                     f"{unknown[0]!r}")
    model.load_state_dict(usable, strict=False)


def count_params(name: str, num_classes: int = 10) -> int:
    """Parameters of a registered model, counted on the meta device (shapes only: nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(name, num_classes).parameters())
