"""INT8 by ONNX Runtime static quantisation (QDQ), with one of two recipes, by where the model will run.

    tensorrt  what TensorRT's explicit quantisation consumes and its Q/DQ placement guide recommends:
              symmetric QInt8 activations (zero point 0) and weights (per output channel), Q/DQ only on the
              inputs of Conv/Gemm/MatMul/Add, float biases. Under ONNX Runtime on a CPU this runs as
              dequantise + fp32 kernels: correct, but slower than fp32.
    cpu       ONNX Runtime's own CPU recipe (U8S8): asymmetric QUInt8 activations, symmetric QInt8 per-channel
              weights, its default placement, so the CPU runs real int8 kernels. TensorRT cannot build it
              (it takes only symmetric int8).

Measured with `kdexport.export.export` on digits (all 360 test images; MinMax on 128 train images), and ONNX
Runtime CPU p50 at batch 1, 1 thread (kdexport.profile.measure_onnx; shared, noisy 2-core x86 box):
    resnet18   fp32 95.83%  2.4 ms | tensorrt 95.83%  2.7 ms | cpu 94.17%  0.7 ms
    mobilenet  fp32 86.39%  0.5 ms | tensorrt 88.06%  3.1 ms | cpu 85.00%  0.3 ms
ORT's default placement with symmetric activations (neither recipe) lost 16 points on that mobilenet.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .checks import batches
from .formats import ExportFailed
from .onnx_io import INPUT, _first_line

_WEIGHTED = ["Conv", "Gemm", "MatMul", "Add"]
RECIPES = {
    "tensorrt": {"activations": "QInt8 symmetric", "weights": "QInt8 symmetric per-channel",
                 "placement": "inputs of Conv/Gemm/MatMul/Add", "bias": "float"},
    "cpu": {"activations": "QUInt8 asymmetric", "weights": "QInt8 symmetric per-channel",
            "placement": "onnxruntime default", "bias": "int32"},
}


def _reader(images: np.ndarray, batch: int, fixed: bool):
    # lazy: onnxruntime is heavy and only the ORT paths need it
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Feeds the calibration images in the model's batch size."""

        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self.it, None)
            return None if item is None else {INPUT: item[0]}

        def rewind(self) -> None:
            self.it = batches(images.astype(np.float32), batch, pad=fixed)

    return Reader()


def _recipe_args(target: str) -> dict:
    from onnxruntime.quantization import QuantType  # lazy: onnxruntime is heavy and only the ORT paths need it

    if target == "tensorrt":
        return dict(activation_type=QuantType.QInt8, op_types_to_quantize=_WEIGHTED,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                   "OpTypesToExcludeOutputQuantization": _WEIGHTED})
    return dict(activation_type=QuantType.QUInt8, extra_options={"WeightSymmetric": True})


def quantize_int8(fp32: bytes, images: np.ndarray, *, batch: int, fixed: bool,
                  target: str = "tensorrt") -> tuple[bytes, list[str]]:
    """A QDQ INT8 model of the verified fp32 ONNX `fp32`, calibrated (MinMax) on `images`; (bytes, notes)."""
    # lazy: onnxruntime is heavy and only the ORT paths need it
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # lazy: onnxruntime is heavy and only the ORT paths need it
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kdexport-int8-") as tmp:
        src, pre, dst = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(fp32)
        try:  # symbolic shape inference + ORT's basic graph optimisation (folds BatchNorm into Conv)
            quant_pre_process(str(src), str(pre))
        except Exception as exc:
            notes.append(f"quant_pre_process failed ({_first_line(exc)}); quantised the exported graph as is")
            pre = src
        try:
            quantize_static(str(pre), str(dst), _reader(images, batch if fixed else 32, fixed),
                            quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, **_recipe_args(target))
        except Exception as exc:
            raise ExportFailed(f"onnxruntime.quantization.quantize_static failed: {_first_line(exc)}") from None
        return dst.read_bytes(), notes
