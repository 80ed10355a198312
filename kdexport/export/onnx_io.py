"""PyTorch -> ONNX: the exporter call, metadata, structural checks, and ONNX Runtime as a runner.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`, stated explicitly. Measured at torch
2.14.1 on every student architecture of the pairs (DistilledStudent, 32x32): both exporters give identical
parity, but dynamo=True is 3-4x slower to export (densenet169: 92 s vs 23 s on a loaded 2-core box) and its
graph is ~2% larger; the TorchScript graph is also the one TensorRT's ONNX parser has consumed for years.
Its deprecation warnings (and only those) are silenced here.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..checkpoint import atomic_write, load_model
from ..errors import ConfigError
from ..imagefolder import eval_resize
from .checks import batches
from .formats import ExportFailed

INPUT, OUTPUT = "input", "logits"
EXPORTER = "torch.onnx.export(dynamo=False) (TorchScript)"


def onnx_bytes(model: nn.Module, input_size, *, opset: int = 18, batch: int = 1, dynamic: bool = True,
               example: torch.Tensor | None = None) -> bytes:
    """Export `model` (in eval mode) to ONNX bytes: input "input" [N,C,H,W], output "logits" [N,classes]."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    n = max(batch, 2) if dynamic else batch  # trace with >1 image so that nothing specialises on batch 1
    x = example[:n] if example is not None and len(example) >= n else torch.randn(n, *input_size)
    buf = io.BytesIO()
    axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}} if dynamic else None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                    category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            torch.onnx.export(model, (x.to(device),), buf, dynamo=False, opset_version=opset,
                              input_names=[INPUT], output_names=[OUTPUT], dynamic_axes=axes,
                              do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL)
    except Exception as exc:
        raise ExportFailed(f"{EXPORTER} failed on {type(model).__name__}: {_first_line(exc)}") from None
    return buf.getvalue()


def preprocessing(spec: dict[str, Any]) -> str | None:
    """How a deployed caller turns a photograph into the model's input (image folders; None for the others)."""
    if spec.get("dataset") != "imagefolder" or not spec.get("input_size"):
        return None
    h, w = spec["input_size"][1:]
    return (f"RGB; resize the shorter side to {eval_resize((h, w))} (bilinear, antialiased); centre crop {h}x{w}; "
            "scale to [0, 1]; subtract mean, divide by std; NCHW float32")


def metadata(spec: dict[str, Any] | None, **extra: Any) -> dict[str, str]:
    """metadata_props of an exported model: provenance, accuracy and the preprocessing a caller must apply."""
    meta: dict[str, Any] = {"kdexport_version": __version__, "exporter": EXPORTER}
    if spec:
        prune = spec.get("prune") or {}
        meta.update(
            kind=spec.get("kind"), pair=spec.get("pair"), model=spec.get("student") or spec.get("model"),
            teacher=spec.get("teacher") if spec.get("kind") == "distilled" else None,
            dataset=spec.get("dataset"), num_classes=spec.get("num_classes"),
            method=prune.get("method", "none"), amount=prune.get("amount", 0.0),
            accuracy_top1=(spec.get("metrics") or {}).get("top1"), input_size=spec.get("input_size"),
            mean=spec.get("mean"), std=spec.get("std"), preprocess=preprocessing(spec),
        )
    meta.update(extra)
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items() if v is not None}


def finalize(data: bytes, meta: dict[str, str], *, num_classes: int | None, batch: int | None) -> bytes:
    """Attach metadata, then onnx.checker (full) and strict shape inference; the output must be [batch, classes]
    (`batch` None: a symbolic batch dimension)."""
    import onnx  # lazy: onnx is heavy and only ONNX artefacts need it

    model = onnx.load_from_string(data)
    del model.metadata_props[:]
    for key, value in sorted(meta.items()):
        model.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise ExportFailed(f"the exported ONNX model fails onnx.checker: {_first_line(exc)}") from None
    dims = [d.dim_value or d.dim_param for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    want_batch = batch if batch is not None else "batch"
    if len(dims) != 2 or dims[0] != want_batch or (num_classes is not None and dims[1] != num_classes):
        raise ExportFailed(f"the exported ONNX output has shape {dims}, expected [{want_batch}, "
                           f"{num_classes or 'classes'}]")
    return model.SerializeToString()


def onnx_metadata(data: bytes | str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX model (bytes or file)."""
    import onnx  # lazy: onnx is heavy and only ONNX artefacts need it

    model = onnx.load_from_string(data) if isinstance(data, bytes) else onnx.load(str(data),
                                                                                  load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def export_onnx(source: str | Path | nn.Module, out: str | Path, *, opset: int = 18, batch: int = 1,
                dynamic: bool = True, input_size=None) -> Path:
    """A checkpoint or module as a checked ONNX file at `out` (written atomically), dynamic batch by default.

    The quick path (used by `kdexport profile` for ONNX Runtime): checker and shape inference, no parity
    check on data; `kdexport export` (`kdexport.export.export`) is the verified path."""
    if isinstance(source, nn.Module):
        model, spec = source, None
    else:
        model, spec = load_model(source)
    size = tuple(input_size) if input_size is not None else tuple(spec["input_size"]) if spec else None
    if size is None:
        raise ConfigError("the input size of an in-memory model is unknown: pass input_size=(C, H, W)")
    data = onnx_bytes(model, size, opset=opset, batch=batch, dynamic=dynamic)
    meta = metadata(spec, precision="fp32", opset=opset, batch="dynamic" if dynamic else batch)
    data = finalize(data, meta, num_classes=spec["num_classes"] if spec else None,
                    batch=None if dynamic else batch)
    out = Path(out)
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
    return out


class OrtRunner:
    """ONNX Runtime on the CPU (all graph optimisations on, as deployed) as a runner; pads a fixed batch."""

    runtime = "onnxruntime-cpu"

    def __init__(self, model: bytes | str | Path):
        import onnxruntime as ort  # lazy: onnxruntime is heavy and only the ORT paths need it

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: the fp32 initialiser warnings of QDQ models are noise
        self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                            providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input = inp.name
        self.fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        outs = []
        for chunk, n in batches(x.astype(np.float32), self.fixed or 64, pad=self.fixed is not None):
            outs.append(self.session.run(None, {self.input: chunk})[0][:n])
        return np.concatenate(outs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]
