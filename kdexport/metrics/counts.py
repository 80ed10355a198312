"""What a model costs: parameters (student / deployed, non-zero), MACs, bytes on disk and in sparse encodings,
per-layer sparsity.

Parameter counts follow Malihi & Heidemann (2024): a weight-pruned model is counted by its non-zero weights.
Tensors still under `torch.nn.utils.prune` masks (`weight_orig` * `weight_mask`) are counted as the masked
weight they compute, so counts are right during fine-tuning as well as after `prune.remove`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..models import is_distilled

PRUNABLE = (nn.Conv2d, nn.Linear)  # the layers whose weights are pruned, counted in MACs and in sparsity


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
