"""Export: ONNX (fp32 or INT8 QDQ) and TensorRT engines, each verified against PyTorch on real images.

    export(checkpoint, ExportConfig(...)) -> ExportResult     the verified path (`kdexport export`)
    export_onnx(checkpoint_or_module, out, ...) -> Path      quick checked ONNX, dynamic batch (profiling)

Importing this package is cheap: torch, onnx, onnxruntime and tensorrt load when a function needs them.
"""

from __future__ import annotations

from typing import Any

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

__all__ = ["ALIASES", "DEFAULT_ATOL", "FORMAT_NAMES", "FORMATS", "ExportConfig", "ExportFailed", "ExportResult",
           "Format", "FormatSpec", "ParityError", "TensorRTUnavailable", "export", "export_onnx",
           "onnx_metadata"]
_LAZY = {"export": "pipeline", "ExportResult": "pipeline", "export_onnx": "onnx_io", "onnx_metadata": "onnx_io"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
