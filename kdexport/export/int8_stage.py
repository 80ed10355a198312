"""The INT8 stage of `export`: choose a QDQ model on validation, measure it where it will run, gate the drop.

Which runtime measures (and gates) an INT8 model, by recipe and format:
    --int8-target cpu                 onnxruntime-cpu: the runtime the U8S8 recipe is for
    --int8-target tensorrt (default)  openvino-cpu when openvino is installed, else onnxruntime-cpu (noted);
                                      ONNX Runtime's figure is reported beside it (TRUST says which to trust)
    --format openvino                 openvino-cpu
    --format tensorrt                 the choice as above, then the engine itself gates (tensorrt)
Accuracies are on the validation split (the checkpoint's own --val-fraction); calibration images come from the
training part; test accuracy is measured once, on the written model, and decides nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data import DEFAULT_VAL_FRACTION
from . import openvino_ir
from .calibrate import Int8Choice, choose_int8, layers_line
from .checks import Runner, accuracy, eval_images
from .formats import DEFAULT_CALIB, ExportConfig, Format, Int8DropError
from .int8 import RECIPES
from .onnx_io import OrtRunner

TRUST = ("trust openvino-cpu: like TensorRT it executes each Q/DQ pair as int8 arithmetic, while ONNX Runtime's "
         "x86 CPU kernels for symmetric int8 (S8S8) round differently (issue 15 measured 9 points lower for the "
         "same file); a TensorRT engine built from this file is measured by `--format tensorrt`")
NO_OPENVINO = ("the tensorrt recipe was measured with onnxruntime-cpu, whose x86 S8S8 kernels can lose points "
               f"TensorRT does not; {openvino_ir.INSTALL} to measure it with OpenVINO (true int8, as TensorRT)")


def _runtime_for(config: ExportConfig) -> tuple[str, list[str]]:
    """The gating runtime's name for the choice, and a note when a better one is missing."""
    if config.format is Format.OPENVINO:
        return "openvino-cpu", []
    if config.recipe == "cpu":
        return OrtRunner.runtime, []
    if openvino_ir.missing("CPU") is None:
        return "openvino-cpu", []
    return OrtRunner.runtime, [NO_OPENVINO]


def make_runner(runtime: str, model: bytes) -> Runner:
    return openvino_ir.OpenVINORunner(model) if runtime == "openvino-cpu" else OrtRunner(model)


def choose(result, fp32: bytes, ort_fp32: OrtRunner, spec: dict[str, Any], config: ExportConfig,
           static: int | None) -> tuple[bytes, Int8Choice, tuple[np.ndarray, np.ndarray]]:
    """Pick the INT8 model on validation; fill the result's accuracies; return (QDQ bytes, choice, val)."""
    fraction = spec.get("val_fraction", DEFAULT_VAL_FRACTION)
    size = spec["input_size"][1:]
    calib, _ = eval_images(spec["dataset"], "train", config.calib or DEFAULT_CALIB, config.data_dir, fraction, size)
    val = eval_images(spec["dataset"], "val", config.eval_limit, config.data_dir, fraction, size)
    runtime, notes = _runtime_for(config)
    result.accuracy_fp32 = accuracy(ort_fp32, *val)
    choice = choose_int8(fp32, calib, val, fp32_accuracy=result.accuracy_fp32, target=config.recipe,
                         batch=config.batch, fixed=static is not None, method=config.calib_method or "auto",
                         make_runner=lambda q: make_runner(runtime, q))
    result.notes += notes + choice.notes
    result.int8_target, result.calib_images, result.eval_images = config.recipe, len(calib), len(val[1])
    result.eval_split, result.max_drop = "val", config.drop_limit
    result.calibration = choice.summary()
    result.int8_accuracies = {runtime: choice.trial.accuracy}
    if config.recipe == "tensorrt" and runtime != OrtRunner.runtime:
        result.int8_accuracies[OrtRunner.runtime] = accuracy(OrtRunner(choice.model), *val)
        result.trust = TRUST
    set_gating(result, runtime, choice.trial.accuracy)
    return choice.model, choice, val


def set_gating(result, runtime: str, acc: float) -> None:
    """The accuracy that gates the export (the runtime it will run in, or its closest stand-in)."""
    result.int8_accuracies[runtime] = acc
    result.int8_runtime, result.accuracy_int8 = runtime, acc
    result.accuracy_delta = acc - result.accuracy_fp32


def gate(result, choice: Int8Choice, config: ExportConfig) -> None:
    """Int8DropError (exit 1, nothing written) when the drop exceeds --max-drop, unless --allow-drop."""
    drop = -result.accuracy_delta
    if drop <= config.drop_limit:
        return
    what = (f"INT8 ({result.int8_target} recipe, {result.calibration['method']}, "
            f"{len(choice.trial.fp32_nodes)} node(s) kept fp32) loses {drop:.2f} points on {result.eval_images} "
            f"validation images under {result.int8_runtime} (fp32 {result.accuracy_fp32:.2f}% -> "
            f"{result.accuracy_int8:.2f}%), more than --max-drop {config.drop_limit:g}")
    if config.allow_drop:
        result.notes.append(f"{what}; written anyway because of --allow-drop; {layers_line(choice)}")
        return
    raise Int8DropError(f"{what}; nothing was written. {layers_line(choice)}. Calibrate on more images (--calib), "
                        "try --int8-target cpu for a CPU, raise --max-drop, or pass --allow-drop to write it anyway")


def test_accuracy(result, ort_fp32: OrtRunner, runner: Runner, spec: dict[str, Any], config: ExportConfig) -> None:
    """Test top-1 of fp32 (ONNX Runtime) and of the written INT8 model (gating runtime), once, for the record."""
    test = eval_images(spec["dataset"], "test", config.eval_limit, config.data_dir,
                       image_size=spec["input_size"][1:])
    result.test_images = len(test[1])
    result.test_accuracy_fp32 = accuracy(ort_fp32, *test)
    result.test_accuracy_int8 = accuracy(runner, *test)


def meta(result, config: ExportConfig) -> dict[str, Any]:
    """metadata_props of an INT8 model: recipe, calibration, fp32-kept nodes and every measured accuracy."""
    quant = {"format": "QDQ", "target": config.recipe, **RECIPES[config.recipe],
             "calibration": result.calibration["method"], "per_channel_weights": True,
             "fp32_nodes": result.calibration["fp32_nodes"]}
    return dict(precision="int8", quantization=quant, calibration_search=result.calibration,
                calib_images=result.calib_images, eval_split=result.eval_split, eval_images=result.eval_images,
                accuracy_top1_onnx_fp32=result.accuracy_fp32, accuracy_top1_int8=result.accuracy_int8,
                accuracy_top1_int8_runtime=result.int8_runtime, accuracy_top1_int8_by_runtime=result.int8_accuracies,
                test_accuracy_top1_fp32=result.test_accuracy_fp32, test_accuracy_top1_int8=result.test_accuracy_int8,
                max_drop=config.drop_limit)
