"""TensorRT engines with the TensorRT 10 Python API: build a serialised engine from verified ONNX, run it.

fp32 builds clear the TF32 flag (fp32 means fp32); --half sets BuilderFlag.FP16; an INT8 engine is built from
the QDQ model (explicit quantisation: the Q/DQ scales are used, no TensorRT calibrator) with BuilderFlag.INT8,
plus FP16 for the unquantised layers with --half. TensorRT 11 removed these weak-typing flags: there an INT8
QDQ model builds strongly typed and --half is refused. Engine I/O buffers are torch CUDA tensors.
"""

from __future__ import annotations

import functools
import importlib.util
import time

import numpy as np
import torch

from .checks import batches
from .formats import ExportFailed, TensorRTUnavailable

INSTALL = "pip install 'kdexport[tensorrt]' on a machine with an NVIDIA GPU (on Jetson use JetPack's TensorRT)"


def missing() -> list[str]:
    """What --format tensorrt lacks here (empty when it can run). Initialises no CUDA context."""
    lacks = []
    if not torch.cuda.is_available():
        lacks.append("a CUDA GPU")
    try:
        found = importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        lacks.append("the tensorrt package")
    return lacks


def require() -> None:
    """Refuse --format tensorrt up front, naming what is missing (exit 2, before any work)."""
    lacks = missing()
    if lacks:
        raise TensorRTUnavailable(f"--format tensorrt needs a CUDA GPU and the tensorrt package (missing here: "
                                  f"{' and '.join(lacks)}): {INSTALL}")


def _trt():
    """The tensorrt module, or one line saying it is broken (found by require(), but its libraries fail)."""
    try:
        import tensorrt  # lazy: optional (kdexport[tensorrt]), GPU machines only
    except ImportError as exc:
        raise TensorRTUnavailable(f"the tensorrt package is installed but does not import ({exc}): reinstall "
                                  "it, matching this machine's CUDA driver") from None
    return tensorrt


@functools.cache
def _logger():
    """One logger for the process: TensorRT keeps a pointer to it in every builder and runtime."""
    return _trt().Logger(_trt().Logger.WARNING)


def build_engine(onnx: bytes, *, input_size, batch: int, dynamic: bool, half: bool, int8: bool,
                 workspace_mb: int) -> tuple[bytes, float]:
    """Parse ONNX, build a serialised engine; returns (engine bytes, build seconds).

    dynamic: one optimisation profile with batch min 1 / opt `batch` / max max(2 * batch, 32)."""
    trt = _trt()
    major = int(trt.__version__.split(".")[0])
    weak_typing = hasattr(trt.BuilderFlag, "FP16")  # TensorRT <= 10
    if half and not weak_typing:
        raise TensorRTUnavailable(f"--half needs BuilderFlag.FP16, which TensorRT {trt.__version__} removed "
                                  "(strong typing only): pip install 'tensorrt>=10,<11', or export fp32 / --int8")
    logger = _logger()
    builder = trt.Builder(logger)
    # TensorRT 10 is explicit-batch only (the flag is deprecated); 8.x still needs it
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if major < 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportFailed(f"TensorRT's ONNX parser rejected the model: {errors[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if not half and not int8 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if half:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8 and weak_typing:
        config.set_flag(trt.BuilderFlag.INT8)  # with Q/DQ in the graph: explicit quantisation, no calibrator
    if dynamic:
        name = network.get_input(0).name
        profile = builder.create_optimization_profile()
        profile.set_shape(name, (1, *input_size), (batch, *input_size), (max(2 * batch, 32), *input_size))
        config.add_optimization_profile(profile)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise ExportFailed("TensorRT could not build the engine (see its log above); try a larger --workspace")
    return bytes(plan), seconds


class EngineRunner:
    """A serialised engine as a runner: torch CUDA tensors as I/O buffers, run on its own stream."""

    runtime = "tensorrt"

    def __init__(self, plan: bytes):
        trt = _trt()
        self.torch = torch
        self.runtime_ = trt.Runtime(_logger())
        self.engine = self.runtime_.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ExportFailed("TensorRT could not deserialise the engine it just built")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ExportFailed(f"the engine has {len(inputs)} inputs and {len(outputs)} outputs; expected 1 and 1")
        self.input, self.output = inputs[0], outputs[0]
        shape = list(self.engine.get_tensor_shape(self.input))
        if shape[0] == -1:  # dynamic batch: bounded by profile 0
            self.fixed, self.max_batch = None, list(self.engine.get_tensor_profile_shape(self.input, 0)[2])[0]
        else:
            self.fixed = self.max_batch = shape[0]
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def _dtype(self, name: str):
        table = {"FLOAT": self.torch.float32, "HALF": self.torch.float16, "BF16": self.torch.bfloat16,
                 "INT8": self.torch.int8, "INT32": self.torch.int32}
        return table[self.engine.get_tensor_dtype(name).name]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch, outs = self.torch, []
        for chunk, n in batches(x.astype(np.float32), self.max_batch, pad=self.fixed is not None):
            xi = torch.from_numpy(chunk).to("cuda", self._dtype(self.input))
            if not self.context.set_input_shape(self.input, tuple(xi.shape)):
                raise ExportFailed(f"TensorRT rejected input shape {tuple(xi.shape)}")
            out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), device="cuda",
                              dtype=self._dtype(self.output))
            self.context.set_tensor_address(self.input, xi.data_ptr())
            self.context.set_tensor_address(self.output, out.data_ptr())
            torch.cuda.current_stream().synchronize()  # xi was written on torch's stream
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise ExportFailed("TensorRT execution failed; see its log above")
            self.stream.synchronize()
            outs.append(out.float().cpu().numpy()[:n])
        return np.concatenate(outs)
