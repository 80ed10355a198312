"""What `kdexport export` can produce: the format table, ExportConfig and the errors of this stage.

Cheap to import (no torch, onnx or tensorrt), so the CLI can use it while parsing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import CheckFailed, ConfigError, KdexportError
from ..vocab import ALIASES, CALIB_METHODS, FORMAT_NAMES, INT8_TARGETS, Format  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class FormatSpec:
    """One row of the format table."""

    suffixes: tuple[str, ...]  # the first is the default
    device: str  # where the artifact runs: "cpu or gpu" / "gpu"
    options: frozenset[str]  # ExportConfig fields this format accepts besides the common ones


COMMON_OPTIONS = frozenset({"format", "out", "data_dir", "eval_limit", "image_size"})
_INT8 = frozenset({"int8", "calib", "calib_method", "max_drop", "allow_drop"})
FORMATS: dict[Format, FormatSpec] = {
    Format.ONNX: FormatSpec((".onnx",), "cpu or gpu",
                            frozenset({"opset", "batch", "dynamic", "int8_target", "atol", "device"}) | _INT8),
    Format.TENSORRT: FormatSpec((".engine", ".plan", ".trt"), "gpu",
                                frozenset({"opset", "batch", "dynamic", "half", "atol", "workspace"}) | _INT8),
    # the IR (.xml, with its weights in a .bin beside it) converted from the verified ONNX
    Format.OPENVINO: FormatSpec((".xml",), "Intel CPU, GPU or NPU",
                                frozenset({"opset", "batch", "dynamic", "int8_target", "atol", "device"}) | _INT8),
}

MIN_OPSET, MAX_OPSET = 13, 20  # QDQ per-channel needs 13; the TorchScript exporter stops at 20
DEFAULT_CALIB = 128
DEFAULT_MAX_DROP = 1.0  # accuracy points an INT8 model may lose against fp32 on validation
DEFAULT_WORKSPACE_MB = 1024
# Parity: max |diff| of the logits must stay within atol x max(1, max |PyTorch logit|) (fp32 also needs 100%
# top-1 agreement); int8 is reported (agreement, test-set accuracy delta), not gated. Scaled, not absolute,
# because fp32 rounding grows with the logits: on 64 digits images PyTorch's own fp32 logits differ from its
# fp64 ones by 1.8e-4 (resnet50 student, logits up to 1.7) and 3.1e-3 (efficientnet_b4, up to 25), and ONNX
# Runtime's by 2.2e-4 and 5.0e-3, i.e. <= 2e-4 scaled. 1e-3 keeps 5x headroom; an exporter bug (padding,
# pooling, a layer left in training mode) moves logits by 1e-2 of their scale or more. TensorRT fp32 (TF32 off)
# sums in other orders (Winograd, split-K): 2e-3. fp16 has an 11-bit mantissa: 5e-2.
# OpenVINO CPU fp32 (INFERENCE_PRECISION_HINT f32) is held to ONNX Runtime's tolerance.
DEFAULT_ATOL = {"onnx-fp32": 1e-3, "openvino-fp32": 1e-3, "tensorrt-fp32": 2e-3, "tensorrt-fp16": 5e-2}

_FLAG = {f: "--" + f.replace("_", "-") for f in ("opset", "batch", "dynamic", "half", "int8", "int8_target",
                                                 "calib", "calib_method", "max_drop", "allow_drop", "atol",
                                                 "device", "workspace", "eval_limit",
                                                 "data_dir", "out", "image_size")}


class ParityError(CheckFailed):
    """The exported artifact and PyTorch disagree on real images beyond the tolerance (exit 1)."""


class ExportFailed(CheckFailed):
    """The exporter, a checker or the TensorRT builder rejected the model (exit 1)."""


class Int8DropError(CheckFailed):
    """The INT8 model loses more validation accuracy than --max-drop allows (exit 1, nothing written)."""


class TensorRTUnavailable(KdexportError):
    """--format tensorrt on a machine without a CUDA GPU or without the tensorrt package (exit 2)."""


@dataclass(frozen=True)
class ExportConfig:
    """Options of one export. A field left at its default counts as "not given"; a given field the format
    does not accept is refused (see FORMATS), so no option is ever silently ignored."""

    format: Format | str = Format.ONNX
    out: Path | None = None  # None: <checkpoint dir>/exports/<stem>[-int8|-fp16]<suffix>
    opset: int = 18
    batch: int = 1  # the static batch, or the optimisation batch with dynamic=True
    dynamic: bool = False  # dynamic batch axis
    half: bool = False  # fp16 engine (TensorRT)
    int8: bool = False  # QDQ static quantisation (ONNX Runtime); TensorRT builds it with explicit quantisation
    int8_target: str | None = None  # the QDQ recipe: tensorrt (symmetric, TensorRT's placement) or cpu [tensorrt]
    calib: int | None = None  # calibration images from the train split [128]
    calib_method: str | None = None  # auto (chosen on validation), minmax, entropy or percentile [auto]
    max_drop: float | None = None  # INT8 accuracy points allowed below fp32 on validation [1.0]
    allow_drop: bool = False  # write an INT8 model that loses more than max_drop (said in the output)
    atol: float | None = None  # parity tolerance, in units of max(1, max |logit|) [DEFAULT_ATOL]
    device: str | None = None  # where the PyTorch reference runs [cpu]
    workspace: int | None = None  # TensorRT workspace limit in MiB [1024]
    eval_limit: int | None = None  # validation (and test) images for the int8 accuracies [all]
    data_dir: Path | None = None  # dataset root (not needed for digits)
    image_size: int | str | tuple[int, int] | None = None  # must agree with the checkpoint's (it decides)

    def __post_init__(self) -> None:
        try:
            fmt = Format(self.format)
        except ValueError:
            raise ConfigError(f"unknown format {self.format!r}; choose one of: {', '.join(FORMAT_NAMES)}") from None
        object.__setattr__(self, "format", fmt)
        spec = FORMATS[fmt]
        refused = [f.name for f in fields(self) if f.name not in COMMON_OPTIONS | spec.options
                   and getattr(self, f.name) != f.default]
        if refused:
            accepted = ", ".join(sorted(_FLAG[o] for o in spec.options))
            raise ConfigError(f"{_FLAG[refused[0]]} is not accepted by --format {fmt.value} (it accepts {accepted})")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ConfigError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET}, got {self.opset}")
        if not 1 <= self.batch <= 4096:
            raise ConfigError(f"--batch must be in 1..4096, got {self.batch}")
        if self.int8_target is not None and self.int8_target not in INT8_TARGETS:
            raise ConfigError(f"--int8-target must be one of {', '.join(INT8_TARGETS)}, got {self.int8_target!r}")
        if self.int8_target is not None and not self.int8:
            raise ConfigError("--int8-target picks the int8 recipe: pass it together with --int8")
        for name, given in (("calib", self.calib is not None), ("calib_method", self.calib_method is not None),
                            ("max_drop", self.max_drop is not None), ("allow_drop", self.allow_drop)):
            if given and not self.int8:
                raise ConfigError(f"{_FLAG[name]} is an int8 option: pass it together with --int8")
        if self.calib_method is not None and self.calib_method not in CALIB_METHODS:
            raise ConfigError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, got {self.calib_method!r}")
        if self.max_drop is not None and not 0 <= self.max_drop <= 100:
            raise ConfigError(f"--max-drop is in accuracy points and must be in 0..100, got {self.max_drop}")
        if self.calib is not None and self.calib < 1:
            raise ConfigError(f"--calib must be >= 1, got {self.calib}")
        if self.atol is not None and not self.atol >= 0:
            raise ConfigError(f"--atol must be >= 0, got {self.atol}")
        if self.device not in (None, "cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.workspace is not None and self.workspace < 1:
            raise ConfigError(f"--workspace is in MiB and must be >= 1, got {self.workspace}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"--eval-limit must be >= 1, got {self.eval_limit}")
        if self.eval_limit is not None and not self.int8:
            raise ConfigError("--eval-limit caps the int8 accuracy evaluation: pass it together with --int8")
        if self.out is not None:
            out = Path(self.out)
            object.__setattr__(self, "out", out)
            if out.suffix.lower() not in spec.suffixes:
                raise ConfigError(f"--out must end in {' or '.join(spec.suffixes)} for --format {fmt.value}, "
                                  f"got {out.name}")

    @property
    def precision(self) -> str:
        """fp32, fp16, int8 or int8+fp16 (an int8 engine whose unquantised layers may run in fp16)."""
        if self.int8:
            return "int8+fp16" if self.half else "int8"
        return "fp16" if self.half else "fp32"

    @property
    def recipe(self) -> str | None:
        """The int8 QDQ recipe (None for float exports); a TensorRT engine always takes "tensorrt"."""
        return (self.int8_target or "tensorrt") if self.int8 else None

    @property
    def drop_limit(self) -> float:
        return DEFAULT_MAX_DROP if self.max_drop is None else self.max_drop

    def tolerance(self, stage: str) -> float:
        """The parity tolerance of a stage ("onnx-fp32", "tensorrt-fp32", "tensorrt-fp16"): --atol or default."""
        return self.atol if self.atol is not None else DEFAULT_ATOL[stage]

    def default_out(self, checkpoint: Path) -> Path:
        tag = "" if self.precision == "fp32" else "-" + self.precision.replace("+", "-")
        return checkpoint.parent / "exports" / f"{checkpoint.stem}{tag}{FORMATS[self.format].suffixes[0]}"
