"""Unstructured L1 weight pruning with torch.nn.utils.prune: masks while fine-tuning, zeros baked in to save.

The scope is the trainable part of the deployed module: every Conv2d and Linear weight, a DistilledStudent's
projector included; its frozen teacher classifier stays whole (fine-tuning could not recover it).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import prune

from ..errors import ConfigError
from ..metrics import PRUNABLE
from .config import PruneConfig


def prunable_layers(model: nn.Module) -> list[nn.Module]:
    """The trainable conv and linear layers, in module order: those whose weights are pruned.

    A frozen layer (a DistilledStudent's teacher classifier) is left whole: fine-tuning could not recover it,
    and at 90% global L1 it lost 99.8% of its weights and took the student to 19% top-1.
    """
    # a masked layer's `weight` is recomputed by its hook (no grad under inference_mode): ask the parameter
    return [m for m in model.modules() if isinstance(m, PRUNABLE) and getattr(m, "weight_orig", m.weight).requires_grad]


def has_masks(model: nn.Module) -> bool:
    return any(prune.is_pruned(m) for m in prunable_layers(model))


def _mask_zeros_(layers: list[nn.Module]) -> None:
    """Put weights that are already exactly zero (a weight-pruned checkpoint) under a mask, so they stay zero."""
    for m in layers:
        if not prune.is_pruned(m) and not bool(m.weight.detach().all()):
            prune.custom_from_mask(m, "weight", m.weight.detach() != 0)


def prune_weights_(model: nn.Module, config: PruneConfig) -> None:
    """Mask the `config.amount` fraction of still-unpruned conv/linear weights with the smallest |w|.

    scope "global": one |w| ranking over all layers, except that every layer keeps at least
    `config.min_layer_density` of its weights (`_global_l1_with_floor_`); "layer": every layer loses
    `amount` of its own weights (prune.l1_unstructured). Masks stay in force (forward pre-hooks)
    until `remove_masks_`; pruning again prunes further. `config.steps` is not used here: without training
    between steps, k magnitude steps give exactly the same mask as one.
    """
    if config.method != "weight":
        raise ConfigError(f"prune_weights_ needs method 'weight', got {config.method!r}")
    layers = prunable_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no conv or linear layers to prune")
    _mask_zeros_(layers)
    if config.amount == 0:
        return
    if config.scope == "global":
        _global_l1_with_floor_(layers, config.amount, config.min_layer_density)
    else:
        for m in layers:
            prune.l1_unstructured(m, "weight", amount=config.amount)


@torch.no_grad()
def _global_l1_with_floor_(layers: list[nn.Module], amount: float, floor: float) -> None:
    """Global L1 (the paper's criterion) that cannot empty a layer: mask `amount` of the unpruned weights.

    Each layer first keeps its ceil(floor * size) largest unpruned weights (all of them if it has fewer left, so
    pruning again never goes below the floor); the rest of the budget goes to the largest remaining |w| over all
    layers, as in `prune.global_unstructured`. Plain global L1 ranks raw magnitudes, which differ in scale from
    layer to layer: at 90% it masked all of MobileNet's SimKD projector (1x1 convs with small weights), the
    student's output became a constant, and it stayed at chance after fine-tuning. With floor 0 this is exactly
    global L1.
    """
    weights = [m.weight.detach() for m in layers]  # masked weights read zero
    alive = [(m.weight_mask if prune.is_pruned(m) else torch.ones_like(w)).bool()
             for m, w in zip(layers, weights, strict=True)]
    counts = [int(a.sum()) for a in alive]
    keep_total = round((1.0 - amount) * sum(counts))
    scores = [torch.where(a, w.abs().float(), torch.full_like(w, -1.0, dtype=torch.float)).flatten()
              for a, w in zip(alive, weights, strict=True)]
    reserved = []
    for score, n in zip(scores, counts, strict=True):
        k = min(n, math.ceil(min(floor, 1.0 - amount) * score.numel()))
        mask = torch.zeros_like(score, dtype=torch.bool)
        if k:
            mask[score.topk(k).indices] = True
        reserved.append(mask)
    rest = keep_total - sum(int(r.sum()) for r in reserved)
    if rest > 0:
        pooled = torch.cat([torch.where(r, torch.full_like(s, -1.0), s) for r, s in zip(reserved, scores, strict=True)])
        chosen = torch.zeros_like(pooled, dtype=torch.bool)
        chosen[pooled.topk(rest).indices] = True
        chosen &= pooled >= 0  # never revive a pruned weight
        for r, c in zip(reserved, chosen.split([r.numel() for r in reserved]), strict=True):
            r |= c
    for m, w, r in zip(layers, weights, reserved, strict=True):
        prune.custom_from_mask(m, "weight", r.view_as(w))


def remove_masks_(model: nn.Module) -> None:
    """Bake the masks into the weights (prune.remove): plain zeros, plain `weight` parameters, no hooks."""
    for m in model.modules():
        for name, _ in list(m.named_parameters(recurse=False)):
            if name.endswith("_orig") and hasattr(m, name[: -len("_orig")] + "_mask"):
                prune.remove(m, name[: -len("_orig")])


@torch.no_grad()
def rewind_weights_(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Lottery-ticket rewinding: load `state_dict` (the unpruned model's) under the masks in force.

    Parameters and buffers take their values from `state_dict`; a masked weight's `weight_orig` takes the
    saved `weight`, so the surviving weights get their original values and the pruned ones stay zero.
    """
    own = model.state_dict(keep_vars=True)
    for key, value in state_dict.items():
        target = key if key in own else f"{key}_orig"
        if target not in own or own[target].shape != value.shape:
            raise ConfigError(f"cannot rewind: {key!r} does not match the pruned model (the architectures differ)")
        own[target].copy_(value)
    for m in model.modules():  # refresh each masked `weight` (recomputed by the hook at every forward anyway)
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                hook(m, None)
