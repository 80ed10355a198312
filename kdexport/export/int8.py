"""INT8 by ONNX Runtime static quantisation (QDQ), with one of two recipes, by where the model will run.

    tensorrt  what TensorRT's explicit quantisation consumes and its Q/DQ placement guide recommends:
              symmetric QInt8 activations (zero point 0) and weights (per output channel), Q/DQ only on the
              inputs of Conv/Gemm/MatMul/Add, float biases. Under ONNX Runtime on a CPU this runs as
              dequantise + fp32 kernels: correct, but slower than fp32.
    cpu       ONNX Runtime's own CPU recipe (U8S8): asymmetric QUInt8 activations, symmetric QInt8 per-channel
              weights, its default placement, so the CPU runs real int8 kernels. TensorRT cannot build it
              (it takes only symmetric int8).

Calibration: MinMax, Entropy or Percentile (onnxruntime.quantization), weights per output channel; which
one, and which nodes stay fp32, is chosen in kdexport.export.calibrate.

Measured before issue 15 (MinMax only) with `kdexport.export.export` on digits (all 360 test images; MinMax
on 128 train images), and ONNX Runtime CPU p50 at batch 1, 1 thread (kdexport.profile.measure_onnx; shared,
noisy 2-core x86 box):
    resnet18   fp32 95.83%  2.4 ms | tensorrt 95.83%  2.7 ms | cpu 94.17%  0.7 ms
    mobilenet  fp32 86.39%  0.5 ms | tensorrt 88.06%  3.1 ms | cpu 85.00%  0.3 ms
ORT's default placement with symmetric activations (neither recipe) lost 16 points on that mobilenet.
"""

from __future__ import annotations

import contextlib
import inspect
import io
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


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod  # lazy: onnxruntime is heavy (ORT paths only)

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def preprocess(fp32: bytes, tmp: Path) -> tuple[Path, list[str]]:
    """ORT's quantisation pre-processing (symbolic shape inference, BatchNorm folded into Conv) into `tmp`."""
    # lazy: onnxruntime is heavy and only the ORT paths need it
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, pre = tmp / "fp32.onnx", tmp / "pre.onnx"
    src.write_bytes(fp32)
    try:
        quant_pre_process(str(src), str(pre))
    except Exception as exc:
        return src, [f"quant_pre_process failed ({_first_line(exc)}); quantised the exported graph as is"]
    return pre, []


def quantize_int8(pre: Path, images: np.ndarray, *, batch: int, fixed: bool, target: str = "tensorrt",
                  method: str = "minmax", exclude: tuple[str, ...] = (), cache: Path | None = None) -> bytes:
    """A QDQ INT8 model of the pre-processed fp32 ONNX at `pre`, calibrated with `method` on `images`.

    `exclude`: node names left in fp32. `cache`: a JSON file of calibrated ranges; the first call with it
    calibrates and writes it, later calls with the same method re-use it and run no calibration."""
    # lazy: onnxruntime is heavy and only the ORT paths need it
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if cache is not None and "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        cache = None  # onnxruntime before the calibration cache (2026): every call calibrates
    reader = None if cache is not None and cache.is_file() else _reader(images, batch if fixed else 32, fixed)
    args = _recipe_args(target)
    if cache is not None:
        args["calibration_cache_path"] = cache
    with tempfile.TemporaryDirectory(prefix="kdexport-int8-") as tmp:
        dst = Path(tmp, "int8.onnx")
        try:  # its calibrators print progress to stdout, which belongs to --json
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                                weight_type=QuantType.QInt8, calibrate_method=_method(method),
                                nodes_to_exclude=list(exclude), **args)
        except Exception as exc:
            raise ExportFailed(f"onnxruntime.quantization.quantize_static failed: {_first_line(exc)}") from None
        return dst.read_bytes()
