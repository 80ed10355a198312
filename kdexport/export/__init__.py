"""Export: ONNX (fp32 or INT8 QDQ) and TensorRT engines, each verified against PyTorch on real images.

    export(checkpoint, ExportConfig(...)) -> ExportResult     the verified path (`kdexport export`)
    export_onnx(checkpoint_or_module, out, ...) -> Path      quick checked ONNX, dynamic batch (profiling)

onnx, onnxruntime and tensorrt load when a function needs them.
"""

from __future__ import annotations

from .formats import (
    ALIASES,
    DEFAULT_ATOL,
    FORMAT_NAMES,
    FORMATS,
    ExportConfig,
    ExportFailed,
    Format,
    FormatSpec,
    ParityError,
    TensorRTUnavailable,
)
from .onnx_io import export_onnx, onnx_metadata
from .pipeline import ExportResult, export

__all__ = ["ALIASES", "DEFAULT_ATOL", "FORMAT_NAMES", "FORMATS", "ExportConfig", "ExportFailed", "ExportResult",
           "Format", "FormatSpec", "ParityError", "TensorRTUnavailable", "export", "export_onnx",
           "onnx_metadata"]
