"""Model metrics: parameters, MACs, sizes, per-layer sparsity, the paper's efficiency and breakpoint.

Parameter counts follow Malihi & Heidemann (2024): a weight-pruned model is counted by its non-zero weights.
Tensors still under `torch.nn.utils.prune` masks (`weight_orig` * `weight_mask`) are counted as the masked
weight they compute, so counts are right during fine-tuning as well as after `prune.remove`.

Unit conventions (used by `kdexport.stats` too):
- accuracy is a percentage in [0, 100];
- `performance_efficiency` takes `params` as a raw count and divides it by 1e6 (params in millions), so that
  90 % at 4.2M parameters gives 21.4 with the default weights;
- latency is in milliseconds.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models import is_distilled

from .errors import ConfigError

PRUNABLE = (nn.Conv2d, nn.Linear)  # the layers whose weights are pruned, counted in MACs and in sparsity
PARAMS_UNIT = 1e6  # performance_efficiency divides parameter counts by this (millions)
BREAKPOINT_METHODS = ("tolerance", "knee")


# --------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts; `student` is the paper's convention, `deployed` is what actually runs."""

    total: int
    nonzero: int
    student: int
    student_nonzero: int
    deployed: int
    deployed_nonzero: int


def _effective_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every parameter, with pruning reparametrisations replaced by orig * mask."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            base = name[: -len("_orig")] if name.endswith("_orig") else None
            mask = getattr(module, f"{base}_mask", None) if base else None
            if isinstance(mask, torch.Tensor):
                yield f"{mod_name}.{base}".lstrip("."), p.detach() * mask
            else:
                yield f"{mod_name}.{name}".lstrip("."), p.detach()


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a (possibly prune-masked) layer computes with."""
    orig, mask = getattr(module, "weight_orig", None), getattr(module, "weight_mask", None)
    if isinstance(orig, torch.Tensor) and isinstance(mask, torch.Tensor):
        return (orig * mask).detach()
    return module.weight.detach()


def _count(model: nn.Module) -> tuple[int, int]:
    total = nonzero = 0
    for _, t in _effective_tensors(model):
        total += t.numel()
        nonzero += int(torch.count_nonzero(t))
    return total, nonzero


def param_counts(model: nn.Module) -> ParamCounts:
    """Total / non-zero parameters, for the student backbone alone and for the deployed module.

    For a DistilledStudent the backbone is `model.student` (its own classifier is an Identity); deployed is
    backbone + projector + teacher classifier, i.e. every parameter of the module, the same set as `total`.
    For a plain model all three are the same.
    """
    total, nonzero = _count(model)
    student, student_nz = _count(model.student) if is_distilled(model) else (total, nonzero)
    return ParamCounts(total, nonzero, student, student_nz, total, nonzero)


# ------------------------------------------------------------------------------------------------- MACs
@dataclass(frozen=True)
class Macs:
    """Multiply-accumulates of one forward pass of a single image (conv and linear layers only)."""

    dense: int
    effective: int  # skipping the zero weights: dense scaled by each layer's non-zero weight fraction


def _layer_macs(module: nn.Module, out: torch.Tensor) -> tuple[int, int]:
    w = _effective_weight(module)
    if isinstance(module, nn.Conv2d):
        # every output element reads in_channels/groups * kh * kw inputs
        kh, kw = module.kernel_size
        dense = out.numel() * (module.in_channels // module.groups) * kh * kw
    else:
        dense = out.numel() * module.in_features
    # each weight is used dense / numel times (once per output position), so this is exact
    return dense, dense // w.numel() * int(torch.count_nonzero(w))


def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> Macs:
    """MACs of a batch-1 forward pass at `input_size` (C, H, W), counted by hooks on Conv2d and Linear.

    Bias additions, BatchNorm, activations and pooling are not counted (the usual convention, which
    torchvision's documented GFLOPS follow). The model runs in eval mode; its train/eval flags are restored.
    """
    if not input_size or any(int(s) < 1 for s in input_size):
        raise ConfigError(f"input_size must be positive (C, H, W), got {tuple(input_size)}")
    totals = [0, 0]

    def hook(module: nn.Module, _inputs, out: torch.Tensor) -> None:
        dense, effective = _layer_macs(module, out)
        totals[0] += dense
        totals[1] += effective

    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    flags = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, PRUNABLE)]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *(int(s) for s in input_size), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in flags.items():
            m.training = training
    return Macs(totals[0], totals[1])


# ------------------------------------------------------------------------------------------------- sizes
def serialized_bytes(model: nn.Module) -> int:
    """Bytes of `torch.save(model.state_dict())`: the checkpoint size on disk, container included."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def _effective_state(model: nn.Module) -> Iterator[torch.Tensor]:
    """State tensors as deployed: masked parameters folded (orig * mask), masks themselves dropped."""
    params = dict(_effective_tensors(model))
    masked = {k[: -len("_orig")] for k, _ in model.named_parameters() if k.endswith("_orig")}
    yield from params.values()
    for name, buf in model.named_buffers():
        if not (name.endswith("_mask") and name[: -len("_mask")] in masked):
            yield buf


def payload_bytes(model: nn.Module) -> int:
    """Raw bytes of all parameters and buffers stored densely (no container): the sparse sizes' baseline."""
    return sum(t.numel() * t.element_size() for t in _effective_state(model))


def _index_bytes(n: int) -> int:
    """Width of the smallest unsigned integer type that holds values 0..n-1."""
    return next(b for b in (1, 2, 4, 8) if n <= 256**b)


def _tensor_encoded_bytes(t: torch.Tensor) -> int:
    dense = t.numel() * t.element_size()
    if t.dim() < 2 or not t.is_floating_point():
        return dense  # biases, BatchNorm, counters stay dense
    nnz = int(torch.count_nonzero(t))
    bitmap = math.ceil(t.numel() / 8) + nnz * t.element_size()
    rows, cols = t.shape[0], t.numel() // t.shape[0]
    csr = nnz * (t.element_size() + _index_bytes(cols)) + (rows + 1) * _index_bytes(nnz + 1)
    return min(dense, bitmap, csr)


def sparse_encoded_bytes(model: nn.Module) -> int:
    """Payload bytes when each weight tensor (>= 2-D float) is stored in its smallest encoding.

    Encodings: dense; bitmap (1 bit per element + the non-zero values); CSR over the (out, in*kh*kw) view
    (non-zero values + column indices in uint8/uint16/uint32 as the row length needs + row pointers sized
    for nnz). 1-D tensors and integer buffers stay dense. Names and shapes (a few bytes each) are not counted.
    """
    return sum(_tensor_encoded_bytes(t) for t in _effective_state(model))


# ---------------------------------------------------------------------------------------------- sparsity
def _prunable(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE)}


def layer_sparsity(model: nn.Module, reference: nn.Module | None = None) -> list[dict]:
    """Per conv/linear layer: {layer, kind, params, nonzero, sparsity} of its weight, in module order.

    With `reference` (the unpruned model), `params` is the reference layer's weight size, so a channel-pruned
    (slimmed) model reports the parameters it removed per layer, as in the paper's Figure 5; a layer missing
    from `model` counts as fully removed.
    """
    layers = _prunable(model)
    rows = []
    for name, ref in (_prunable(reference) if reference is not None else layers).items():
        params = ref.weight.numel()
        mod = layers.get(name)
        nonzero = int(torch.count_nonzero(_effective_weight(mod))) if mod is not None else 0
        kind = "conv" if isinstance(ref, nn.Conv2d) else "linear"
        rows.append({"layer": name, "kind": kind, "params": params, "nonzero": nonzero,
                     "sparsity": 1.0 - nonzero / params if params else 0.0})
    return rows


def global_sparsity(model: nn.Module, reference: nn.Module | None = None) -> float:
    """Fraction of conv + linear weights that are zero (or removed, relative to `reference`)."""
    rows = layer_sparsity(model, reference)
    params = sum(r["params"] for r in rows)
    return 1.0 - sum(r["nonzero"] for r in rows) / params if params else 0.0


# -------------------------------------------------------------------------------------------- efficiency
def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not (isinstance(v, (int, float, np.number)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")


def _check_accuracy(accuracy: float) -> None:
    if not (isinstance(accuracy, (int, float, np.number)) and 0 <= accuracy <= 100):
        raise ConfigError(f"accuracy must be a percentage in [0, 100], got {accuracy!r}")


def performance_efficiency(accuracy: float, params: float, w1: float = 0.5, w2: float = 0.5) -> float:
    """The paper's Performance Efficiency (w1 * accuracy) / (w2 * params), accuracy in %, params in millions.

    `params` is a raw parameter count (e.g. 4_200_000); it is divided by 1e6 here.
    """
    _check_accuracy(accuracy)
    _check_positive(params=params, w1=w1, w2=w2)
    return float(w1 * accuracy / (w2 * params / PARAMS_UNIT))


def latency_efficiency(accuracy: float, latency_ms: float, w1: float = 0.5, w2: float = 0.5) -> float:
    """(w1 * accuracy) / (w2 * latency_ms): the efficiency metric with measured latency instead of params."""
    _check_accuracy(accuracy)
    _check_positive(latency_ms=latency_ms, w1=w1, w2=w2)
    return float(w1 * accuracy / (w2 * latency_ms))


# -------------------------------------------------------------------------------------------- breakpoint
@dataclass(frozen=True)
class Breakpoint:
    """The chosen pruning level; `index` refers to the curve sorted by level."""

    level: float
    index: int
    accuracy: float
    method: str
    tolerance: float | None  # None for "knee"


def _curve(levels: Sequence[float], accuracies: Sequence[float], *extra: Sequence[float]):
    """Validated float arrays sorted by level (levels need not arrive sorted; duplicates are an error)."""
    arrays = [np.asarray(a, dtype=float).ravel() for a in (levels, accuracies, *extra)]
    if len({a.size for a in arrays}) != 1:
        raise ConfigError(f"levels, accuracies (and latencies) differ in length: {[a.size for a in arrays]}")
    if arrays[0].size == 0:
        raise ConfigError("no pruning levels given; pass at least one (level, accuracy) point")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ConfigError("levels, accuracies and latencies must be finite numbers (found NaN or inf)")
    order = np.argsort(arrays[0], kind="stable")
    arrays = [a[order] for a in arrays]
    if np.any(np.diff(arrays[0]) == 0):
        raise ConfigError("duplicate pruning levels; average repeats before looking for the breakpoint")
    return arrays


def _knee_index(x: np.ndarray, y: np.ndarray) -> int:
    """Kneedle for a decreasing, concave accuracy curve: max height above the first-to-last chord."""
    if y.size < 3 or y[-1] >= y[0] or np.ptp(y) == 0:
        return y.size - 1 if y[-1] >= y[0] else 0  # no drop at all / too few points for a knee
    xn = (x - x[0]) / (x[-1] - x[0])
    yn = (y - y.min()) / np.ptp(y)
    chord = yn[0] + (yn[-1] - yn[0]) * xn
    height = yn - chord
    # convex or linear: accuracy falls from the start, so no level is safe
    return int(np.argmax(height)) if height.max() > 0 else 0


def find_breakpoint(levels: Sequence[float], accuracies: Sequence[float], tolerance: float = 1.0,
                    method: str = "tolerance") -> Breakpoint:
    """The pruning level after which accuracy falls faster than parameters.

    - "tolerance": the highest level such that it and every lower level stay within `tolerance` accuracy
      points of the lowest level's (the unpruned) accuracy; the level before the first one that falls out.
    - "knee": Kneedle on the normalised curve (the point farthest above the chord from the first to the last
      point); the last level if accuracy never drops, the first if the curve has no concave knee.
    Points are sorted by level first.
    """
    if method not in BREAKPOINT_METHODS:
        known = ", ".join(BREAKPOINT_METHODS)
        raise ConfigError(f"unknown breakpoint method {method!r}; choose one of: {known}")
    x, y = _curve(levels, accuracies)
    if method == "knee":
        i = _knee_index(x, y)
        return Breakpoint(float(x[i]), i, float(y[i]), method, None)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"tolerance must be a finite number >= 0 (accuracy points), got {tolerance!r}")
    out = np.flatnonzero(y < y[0] - tolerance)
    i = int(out[0]) - 1 if out.size else y.size - 1
    return Breakpoint(float(x[i]), i, float(y[i]), method, float(tolerance))


def latency_breakpoint(levels: Sequence[float], accuracies: Sequence[float], latencies: Sequence[float],
                       tolerance: float = 1.0) -> Breakpoint:
    """The fastest level among all levels within `tolerance` points of the lowest level's accuracy.

    Ties in latency go to the higher level. Latencies are in milliseconds and must be > 0.
    """
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"tolerance must be a finite number >= 0 (accuracy points), got {tolerance!r}")
    x, y, lat = _curve(levels, accuracies, latencies)
    if np.any(lat <= 0):
        raise ConfigError("latencies must be > 0 ms")
    ok = np.flatnonzero(y >= y[0] - tolerance)
    fastest = lat[ok].min()
    i = int(ok[lat[ok] == fastest][-1])
    return Breakpoint(float(x[i]), i, float(y[i]), "latency", float(tolerance))


__all__ = [
    "ParamCounts", "param_counts", "Macs", "count_macs", "serialized_bytes", "payload_bytes",
    "sparse_encoded_bytes", "layer_sparsity", "global_sparsity", "performance_efficiency",
    "latency_efficiency", "Breakpoint", "find_breakpoint", "latency_breakpoint", "PRUNABLE", "PARAMS_UNIT",
]
