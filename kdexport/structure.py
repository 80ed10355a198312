"""Structure specs: the JSON record of a slimmed architecture, from which it is rebuilt before loading weights.

Torch-Pruning changes only the shapes of Conv2d (in/out channels, groups of depthwise convs), Linear and
BatchNorm2d layers on our models: torchvision's DenseNet concatenates whatever widths its layers have,
MobileNetV2/EfficientNet keep no other width that their forward uses. So a spec lists those layers'
constructor shapes, by module name, and `apply_structure` swaps in new layers of the same class with the
same kernel, stride, padding, dilation and bias flag. No module is ever pickled.

This module needs neither Torch-Pruning nor any stage, so `checkpoint.py` rebuilds slimmed models with it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import CheckpointError
from .metrics import PRUNABLE
from .models import is_distilled

VERSION = 1
_SHAPES: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm2d: ("num_features",),
}


def _shape(module: nn.Module | None) -> dict[str, Any] | None:
    keys = _SHAPES.get(type(module))
    if keys is None:
        return None
    return {"type": type(module).__name__, **{k: int(getattr(module, k)) for k in keys}}


def structure_of(model: nn.Module, reference: nn.Module | None = None) -> dict[str, Any]:
    """{"version", "modules": {name: {"type", shape fields}}} for every Conv2d/Linear/BatchNorm2d.

    With `reference` (the freshly built, unpruned architecture) only the layers whose shape differs are
    listed, which keeps specs small; without it, all of them.
    """
    ref = dict(reference.named_modules()) if reference is not None else {}
    modules = {}
    for name, module in model.named_modules():
        shape = _shape(module)
        if shape is not None and (reference is None or _shape(ref.get(name)) != shape):
            modules[name] = shape
    return {"version": VERSION, "modules": modules}


def _positive(spec: dict[str, Any], key: str, where: str) -> int:
    value = spec.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"structure spec: {where}.{key} must be a positive integer, got {value!r}; "
                              "the checkpoint is damaged or was edited")
    return value


def _rebuild(old: nn.Module, spec: dict[str, Any], name: str) -> nn.Module:
    if isinstance(old, nn.Conv2d):
        cin, cout, groups = (_positive(spec, k, name) for k in _SHAPES[nn.Conv2d])
        if cin % groups or cout % groups:
            raise CheckpointError(f"structure spec: {name} has groups={groups} that do not divide its channels")
        return nn.Conv2d(cin, cout, old.kernel_size, old.stride, old.padding, old.dilation, groups,
                         bias=old.bias is not None, padding_mode=old.padding_mode)
    if isinstance(old, nn.Linear):
        return nn.Linear(_positive(spec, "in_features", name), _positive(spec, "out_features", name),
                         bias=old.bias is not None)
    return nn.BatchNorm2d(_positive(spec, "num_features", name), eps=old.eps, momentum=old.momentum,
                          affine=old.affine, track_running_stats=old.track_running_stats)


def apply_structure(model: nn.Module, structure: dict[str, Any]) -> None:
    """Replace the listed layers of a freshly built `model` by layers of the recorded shapes, in place."""
    if not isinstance(structure, dict) or not isinstance(structure.get("modules"), dict):
        raise CheckpointError("structure spec is malformed (no 'modules' mapping); the checkpoint is damaged")
    if structure.get("version", VERSION) > VERSION:
        raise CheckpointError(f"structure spec version {structure['version']} is newer than this kdexport; upgrade")
    modules = dict(model.named_modules())
    for name, spec in structure["modules"].items():
        old = modules.get(name)
        if not name or _shape(old) is None or not isinstance(spec, dict) or spec.get("type") != type(old).__name__:
            found = type(old).__name__ if old is not None else "nothing"
            listed = spec.get("type") if isinstance(spec, dict) else spec
            raise CheckpointError(f"structure spec lists {name!r} as {listed!r}, but the architecture has {found} "
                                  "there; the checkpoint does not match its model")
        new = _rebuild(old, spec, name)
        if any(not p.requires_grad for p in old.parameters()):
            new.requires_grad_(False)  # a frozen layer stays frozen
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, new)
    sync_widths_(model)


def sync_widths_(model: nn.Module) -> None:
    """Keep `num_features` (the width forward_features returns) true after the layers changed shape."""
    def set_width(owner: nn.Module, consumer: nn.Module) -> None:
        first = next((m for m in consumer.modules() if isinstance(m, PRUNABLE)), None)
        if first is not None and hasattr(owner, "num_features"):
            owner.num_features = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features

    if is_distilled(model):
        set_width(model.student, model.projector)
    elif hasattr(model, "get_classifier"):
        set_width(model, model.get_classifier())
