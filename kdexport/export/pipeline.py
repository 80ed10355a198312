"""`export(checkpoint, config)`: checkpoint -> verified ONNX (fp32 or INT8 QDQ) or TensorRT engine.

Order: refuse what cannot run here (before any work); load; PyTorch reference logits on real test images;
fp32 ONNX + checker + parity under ONNX Runtime (always); then INT8 and/or the engine, each checked against
the same reference; finally one atomic write. A failed check leaves no file behind.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import atomic_write, build_model, load_model, nonfinite_tensors
from ..data import check_image_size, sample_batch
from ..errors import CheckpointError, ConfigError
from ..metrics import sparse_encoded_bytes
from ..preflight import check_output
from . import int8_stage, openvino_ir, tensorrt_engine
from .checks import Parity, accuracy, compare, torch_logits
from .formats import DEFAULT_WORKSPACE_MB, ExportConfig, Format, ParityError
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
    accuracy_fp32: float | None = None  # int8: the fp32 ONNX model (ONNX Runtime) on eval_split
    accuracy_int8: float | None = None  # the INT8 artifact on eval_split, measured by int8_runtime (gated)
    accuracy_delta: float | None = None  # int8 - fp32, percentage points
    int8_runtime: str | None = None  # the runtime that measured accuracy_int8
    int8_accuracies: dict[str, float] | None = None  # every runtime that measured the INT8 model on eval_split
    trust: str | None = None  # which of those figures to trust, when they are several
    max_drop: float | None = None  # the gate on -accuracy_delta
    eval_split: str | None = None  # val: where the INT8 accuracy is measured and chosen
    eval_images: int | None = None
    test_accuracy_fp32: float | None = None  # measured once on the written model, for the record
    test_accuracy_int8: float | None = None
    test_images: int | None = None
    calib_images: int | None = None
    int8_target: str | None = None  # the QDQ recipe: tensorrt or cpu
    calibration: dict[str, Any] | None = None  # the calibration search: method, fp32 nodes, trials, budget
    build_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["parity"] = [p.to_dict() for p in self.parity]
        return d

    def rows(self) -> list[dict[str, Any]]:
        """(field, value) rows for a two-column table."""
        rows = [{"field": k, "value": v} for k, v in self.to_dict().items()
                if k not in ("parity", "notes", "calibration", "int8_accuracies") and v is not None]
        if self.int8_accuracies:
            rows.append({"field": "int8 accuracy by runtime", "value": ", ".join(
                f"{k} {v:.2f}%" for k, v in self.int8_accuracies.items()) + f" ({self.eval_split})"})
        if self.calibration:
            cal = self.calibration
            rows += [{"field": "calibration", "value": f"{cal['method']}, fp32 nodes: "
                      f"{', '.join(cal['fp32_nodes']) or 'none'}"},
                     {"field": "calibration search", "value": "; ".join(
                         f"{t['method']} +{len(t['fp32_nodes'])} fp32 {t['accuracy']:.2f}%" for t in cal["trials"])
                      + f" (budget: {cal['budget']})"}]
        rows += [{"field": f"parity {p.runtime} {p.precision}", "value": ("ok: " if p.passed else "FAILED: ") +
                  p.describe()} for p in self.parity]
        rows += [{"field": "note", "value": n} for n in self.notes]
        return rows


def export(checkpoint: str | Path, config: ExportConfig | None = None) -> ExportResult:
    """Export a kdexport checkpoint as `config` says; ParityError / ExportFailed (exit 1) leave no file."""
    config = config or ExportConfig()
    trt, ov = config.format is Format.TENSORRT, config.format is Format.OPENVINO
    if trt:
        tensorrt_engine.require()
    if ov:
        openvino_ir.require("CPU")
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
    check_image_size(config.image_size, spec["input_size"], checkpoint)
    images = sample_batch(spec["dataset"], config.batch * math.ceil(PARITY_IMAGES / config.batch),
                          root=config.data_dir, image_size=spec["input_size"][1:])
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

    artifact, runner = fp32, ort_fp32
    if config.int8:
        artifact, choice, val = int8_stage.choose(result, fp32, ort_fp32, spec, config, static)
        runner = int8_stage.make_runner(result.int8_runtime, artifact)
        result.notes += [CPU_NOTE] if config.format is Format.ONNX and config.recipe == "tensorrt" else []
    if trt:
        artifact, runner = _engine(result, artifact, reference, images, spec, config)
        if config.int8:  # the engine is what will run: its own accuracy gates
            int8_stage.set_gating(result, runner.runtime, accuracy(runner, *val))
    elif config.int8 and not ov:
        result.parity.append(compare(reference, runner(images.numpy()), runtime=runner.runtime,
                                     precision="int8", atol=None))
    if config.int8:
        int8_stage.gate(result, choice, config)
        int8_stage.test_accuracy(result, ort_fp32, runner, spec, config)
        if not trt:  # the measured accuracies travel with the file
            artifact = finalize(artifact, metadata(spec, **int8_stage.meta(result, config), **meta),
                                num_classes=spec["num_classes"], batch=static)
    if ov:
        xml, weights = _openvino(result, artifact, reference, images, config)
        result.file_bytes = len(xml) + len(weights)
        atomic_write(out.with_suffix(".bin"), lambda tmp: Path(tmp).write_bytes(weights))
        atomic_write(out, lambda tmp: Path(tmp).write_bytes(xml))
        return result
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


def _engine(result: ExportResult, onnx: bytes, reference: np.ndarray, images: torch.Tensor,
            spec: dict[str, Any], config: ExportConfig) -> tuple[bytes, tensorrt_engine.EngineRunner]:
    """Build the engine from the verified ONNX (fp32 or QDQ), run it on the parity images, gate fp32/fp16; on a
    failure the error carries Polygraphy's layer-wise comparison."""
    options = dict(input_size=tuple(spec["input_size"]), batch=config.batch, dynamic=config.dynamic,
                   half=config.half, int8=config.int8, workspace_mb=config.workspace or DEFAULT_WORKSPACE_MB)
    plan, result.build_seconds = tensorrt_engine.build_engine(onnx, **options)
    runner = tensorrt_engine.EngineRunner(plan)
    atol = None if config.int8 else config.tolerance(f"tensorrt-{config.precision}")
    result.parity.append(compare(reference, runner(images.numpy()), runtime=runner.runtime,
                                 precision=config.precision, atol=atol))
    if not result.parity[-1].passed:
        _gate(result.parity[-1], tensorrt_engine.layerwise(onnx, images.numpy(), options, atol or 1e-2))
    return plan, runner


def _openvino(result: ExportResult, onnx: bytes, reference: np.ndarray, images: torch.Tensor,
              config: ExportConfig) -> tuple[bytes, bytes]:
    """The IR (.xml, .bin) of the verified ONNX (fp32 or QDQ), run by OpenVINO on the CPU on the parity images;
    fp32 is gated, int8 reported (its accuracy was gated under OpenVINO already)."""
    xml, weights = openvino_ir.to_ir(onnx)
    with tempfile.TemporaryDirectory(prefix="kdexport-ov-") as tmp:
        Path(tmp, "model.bin").write_bytes(weights)
        Path(tmp, "model.xml").write_bytes(xml)
        runner = openvino_ir.OpenVINORunner(Path(tmp, "model.xml"))
    atol = None if config.int8 else config.tolerance("openvino-fp32")
    result.parity.append(compare(reference, runner(images.numpy()), runtime=runner.runtime,
                                 precision=config.precision, atol=atol))
    _gate(result.parity[-1])
    return xml, weights


def _gate(parity: Parity, diagnostic: str | None = None) -> None:
    if not parity.passed:
        where = f"; {diagnostic}" if diagnostic else "; look for layers the exporter changes"
        raise ParityError(f"{parity.runtime} {parity.precision} disagrees with PyTorch, nothing was written: "
                          f"{parity.describe()}{where}, or pass a larger --atol if this difference is acceptable")
