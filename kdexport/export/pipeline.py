"""`export(checkpoint, config)`: checkpoint -> verified ONNX (fp32 or INT8 QDQ) or TensorRT engine.

Order: refuse what cannot run here (before any work); load; PyTorch reference logits on real test images;
fp32 ONNX + checker + parity under ONNX Runtime (always); then INT8 and/or the engine, each checked against
the same reference; finally one atomic write. A failed check leaves no file behind.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import atomic_write, build_model, load_model, nonfinite_tensors
from ..data import sample_batch
from ..errors import CheckpointError, ConfigError
from ..metrics import sparse_encoded_bytes
from ..preflight import check_output
from . import tensorrt_engine
from .checks import Parity, accuracy, compare, eval_images, torch_logits
from .formats import DEFAULT_CALIB, DEFAULT_WORKSPACE_MB, ExportConfig, Format, ParityError
from .int8 import RECIPES, quantize_int8
from .onnx_io import EXPORTER, OrtRunner, finalize, metadata, onnx_bytes

PARITY_IMAGES = 16  # at least; rounded up to whole static batches
DENSE_NOTE = "dense with zeros: ONNX Runtime and TensorRT do not exploit unstructured sparsity"
CONSTANT_NOTE = ("the model's logits do not depend on its input (dead or untrained?): the parity check on them "
                 "proves little")
CPU_NOTE = ("int8 recipe for TensorRT (symmetric, Q/DQ at weighted-layer inputs): ONNX Runtime on a CPU runs it "
            "slower than fp32; for CPU deployment export with --int8-target cpu")


@dataclass
class ExportResult:
    """What was written and what was measured. Sizes in bytes, accuracies in percent."""

    checkpoint: str
    out: str
    format: str
    precision: str
    opset: int
    batch: int | str  # the static batch, "dynamic", or "dynamic (profile 1..max, opt N)" for an engine
    exporter: str
    file_bytes: int
    onnx_fp32_bytes: int
    parity: list[Parity]
    unpruned_onnx_bytes: int | None = None  # channel-pruned: the same architecture before slimming
    sparse_encoded_bytes: int | None = None  # weight-pruned: the smallest sparse encoding of the weights
    accuracy_fp32: float | None = None  # int8: the fp32 ONNX model on the test split
    accuracy_int8: float | None = None  # the INT8 artifact (ONNX under ORT, or the engine)
    accuracy_delta: float | None = None  # int8 - fp32, percentage points
    eval_images: int | None = None
    calib_images: int | None = None
    int8_target: str | None = None  # the QDQ recipe: tensorrt or cpu
    build_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["parity"] = [p.to_dict() for p in self.parity]
        return d

    def rows(self) -> list[dict[str, Any]]:
        """(field, value) rows for a two-column table."""
        rows = [{"field": k, "value": v} for k, v in self.to_dict().items()
                if k not in ("parity", "notes") and v is not None]
        rows += [{"field": f"parity {p.runtime} {p.precision}", "value": ("ok: " if p.passed else "FAILED: ") +
                  p.describe()} for p in self.parity]
        rows += [{"field": "note", "value": n} for n in self.notes]
        return rows


def export(checkpoint: str | Path, config: ExportConfig | None = None) -> ExportResult:
    """Export a kdexport checkpoint as `config` says; ParityError / ExportFailed (exit 1) leave no file."""
    config = config or ExportConfig()
    trt = config.format is Format.TENSORRT
    if trt:
        tensorrt_engine.require()
    device = config.device or "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    checkpoint = Path(checkpoint)
    out = check_output(config.out or config.default_out(checkpoint), inputs=(checkpoint,))
    model, spec = load_model(checkpoint)
    if bad := nonfinite_tensors(model):
        raise CheckpointError(f"{checkpoint} holds NaN or inf in {len(bad)} tensor(s) (first: {bad[0]}); an export "
                              "of it would be meaningless, retrain or restore it")
    for key in ("dataset", "input_size", "num_classes"):
        if key not in spec:
            raise CheckpointError(f"{checkpoint} has no {key!r} in its spec; re-save it with this kdexport")
    images = sample_batch(spec["dataset"], config.batch * math.ceil(PARITY_IMAGES / config.batch),
                          root=config.data_dir)
    reference = torch_logits(model, images, device)
    model.cpu()
    meta = dict(opset=config.opset, batch="dynamic" if config.dynamic else config.batch)
    static = None if config.dynamic else config.batch

    fp32 = finalize(onnx_bytes(model, tuple(spec["input_size"]), opset=config.opset, batch=config.batch,
                               dynamic=config.dynamic, example=images),
                    metadata(spec, precision="fp32", **meta), num_classes=spec["num_classes"], batch=static)
    ort_fp32 = OrtRunner(fp32)
    fp32_check = compare(reference, ort_fp32(images.numpy()), runtime=OrtRunner.runtime, precision="fp32",
                         atol=config.tolerance("onnx-fp32"))
    _gate(fp32_check)
    batch_label = config.batch if not config.dynamic else (
        f"dynamic (profile 1..{max(2 * config.batch, 32)}, opt {config.batch})" if trt else "dynamic")
    result = ExportResult(str(checkpoint), str(out), config.format.value, config.precision, config.opset,
                          batch_label, EXPORTER, len(fp32), len(fp32), [fp32_check])
    if len(reference) > 1 and float(np.ptp(reference, axis=0).max()) < 1e-6:
        result.notes.append(CONSTANT_NOTE)
    _pruned_sizes(result, model, spec, config)

    artifact = fp32
    if config.int8:
        artifact, test = _quantize(result, fp32, ort_fp32, spec, config, meta, static, trt)
    if trt:
        artifact, runner = _engine(result, artifact, reference, images, spec, config)
    elif config.int8:
        runner = OrtRunner(artifact)
        result.parity.append(compare(reference, runner(images.numpy()), runtime=runner.runtime,
                                     precision="int8", atol=None))
    if config.int8:
        result.accuracy_int8 = accuracy(runner, *test)
        result.accuracy_delta = result.accuracy_int8 - result.accuracy_fp32
        if not trt:  # the measured accuracies travel with the file
            artifact = finalize(artifact, metadata(spec, **_int8_meta(result, config), **meta),
                                num_classes=spec["num_classes"], batch=static)
    result.file_bytes = len(artifact)
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(artifact))
    return result


def _pruned_sizes(result: ExportResult, model, spec: dict[str, Any], config: ExportConfig) -> None:
    """Channel-pruned: the ONNX size of the same architecture unslimmed; weight-pruned: the sparse encoding."""
    if spec.get("structure"):
        unpruned = build_model({k: v for k, v in spec.items() if k != "structure"}).eval()
        result.unpruned_onnx_bytes = len(onnx_bytes(unpruned, tuple(spec["input_size"]), opset=config.opset,
                                                     batch=config.batch, dynamic=config.dynamic))
    if (spec.get("prune") or {}).get("method") == "weight":
        result.sparse_encoded_bytes = sparse_encoded_bytes(model)
        result.notes.append(DENSE_NOTE)


def _int8_meta(result: ExportResult, config: ExportConfig) -> dict[str, Any]:
    quant = {"format": "QDQ", "target": config.recipe, "calibration": "MinMax", **RECIPES[config.recipe]}
    return dict(precision="int8", quantization=quant, calib_images=result.calib_images,
                accuracy_top1_onnx_fp32=result.accuracy_fp32, accuracy_top1_int8=result.accuracy_int8,
                eval_images=result.eval_images)


def _quantize(result: ExportResult, fp32: bytes, ort_fp32: OrtRunner, spec: dict[str, Any], config: ExportConfig,
              meta: dict[str, Any], static: int | None, trt: bool) -> tuple[bytes, tuple]:
    """The checked INT8 QDQ model, and the test images (x, y) on which the fp32 ONNX accuracy was taken."""
    calib, _ = eval_images(spec["dataset"], "train", config.calib or DEFAULT_CALIB, config.data_dir)
    q, notes = quantize_int8(fp32, calib, batch=config.batch, fixed=static is not None, target=config.recipe)
    result.notes += notes + ([CPU_NOTE] if not trt and config.recipe == "tensorrt" else [])
    result.int8_target, result.calib_images = config.recipe, len(calib)
    q = finalize(q, metadata(spec, **_int8_meta(result, config), **meta), num_classes=spec["num_classes"],
                 batch=static)
    test = eval_images(spec["dataset"], "test", config.eval_limit, config.data_dir)
    result.eval_images = len(test[1])
    result.accuracy_fp32 = accuracy(ort_fp32, *test)
    return q, test


def _engine(result: ExportResult, onnx: bytes, reference: np.ndarray, images: torch.Tensor,
            spec: dict[str, Any], config: ExportConfig) -> tuple[bytes, tensorrt_engine.EngineRunner]:
    """Build the engine from the verified ONNX (fp32 or QDQ), run it on the parity images, gate fp32/fp16."""
    plan, result.build_seconds = tensorrt_engine.build_engine(
        onnx, input_size=tuple(spec["input_size"]), batch=config.batch, dynamic=config.dynamic,
        half=config.half, int8=config.int8, workspace_mb=config.workspace or DEFAULT_WORKSPACE_MB)
    runner = tensorrt_engine.EngineRunner(plan)
    atol = None if config.int8 else config.tolerance(f"tensorrt-{config.precision}")
    result.parity.append(compare(reference, runner(images.numpy()), runtime=runner.runtime,
                                 precision=config.precision, atol=atol))
    _gate(result.parity[-1])
    return plan, runner


def _gate(parity: Parity) -> None:
    if not parity.passed:
        raise ParityError(f"{parity.runtime} {parity.precision} disagrees with PyTorch, nothing was written: "
                          f"{parity.describe()}; look for layers the "
                          "exporter changes, or pass a larger --atol if this difference is acceptable")
