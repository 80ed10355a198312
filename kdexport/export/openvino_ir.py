"""OpenVINO: the IR (.xml + .bin) of a verified ONNX model, and OpenVINO as a runner (Intel CPUs, iGPUs, NPUs).

OpenVINO reads ONNX directly; `to_ir` converts it with `openvino.save_model(compress_to_fp16=False)` (the
default would halve the weights to fp16, which the fp32 parity gate would then measure). Runners compile with
`INFERENCE_PRECISION_HINT=f32` where the precision is float: on CPUs with AMX OpenVINO otherwise runs bf16.
A QDQ (int8) model runs as real int8 arithmetic: OpenVINO folds each Q/DQ pair into its int8 kernels, as
TensorRT's explicit quantisation does.
"""

from __future__ import annotations

import functools
import importlib.util
import tempfile
from pathlib import Path

import numpy as np

from ..errors import KdexportError
from .checks import batches
from .onnx_io import onnx_metadata

INSTALL = "pip install 'kdexport[openvino]'"


class OpenVINOUnavailable(KdexportError):
    """The openvino package or the asked-for OpenVINO device is missing (exit 2)."""


def missing(device: str = "CPU") -> str | None:
    """Why OpenVINO cannot run on `device` here (one line naming the extra), or None."""
    try:
        found = importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return f"OpenVINO needs the openvino package (missing here): {INSTALL}"
    devices = _core().available_devices
    if not any(d.split(".")[0] == device for d in devices):
        return (f"OpenVINO sees no {device} device here (available: {', '.join(devices) or 'none'}): install "
                f"the {device} driver for OpenVINO ({INSTALL}), or use --ov-device "
                f"{devices[0].split('.')[0] if devices else 'CPU'}")
    return None


def require(device: str = "CPU") -> None:
    reason = missing(device)
    if reason:
        raise OpenVINOUnavailable(reason)


def version() -> str:
    import openvino  # lazy: optional (kdexport[openvino])

    return openvino.__version__.split("-")[0]


@functools.cache
def _core():
    """The process's one openvino.Core, never released before exit. Each Core's CPU plugin swaps in an
    alternate signal stack of its own (mmap'd) and unmaps it when released, restoring the one it found only if
    its own is still current. Two Cores released first-made-first (as garbage collection may) leave the
    thread on an unmapped stack, and the next signal with a handler (SIGCHLD of a subprocess, Ctrl-C) kills
    the process with SIGSEGV. Seen in OpenVINO 2026.4; tests/kdexport/test_runtimes.py reproduces it."""
    import openvino  # lazy: optional (kdexport[openvino])

    return openvino.Core()


def to_ir(onnx: bytes) -> tuple[bytes, bytes]:
    """OpenVINO IR of an ONNX model: (.xml bytes, .bin bytes), weights kept in their precision; the ONNX
    metadata_props go into the IR's rt_info under "kdexport"."""
    import openvino  # lazy: optional (kdexport[openvino])

    with tempfile.TemporaryDirectory(prefix="kdexport-ov-") as tmp:
        src, xml = Path(tmp, "model.onnx"), Path(tmp, "model.xml")
        src.write_bytes(onnx)
        model = _core().read_model(str(src))
        for key, value in onnx_metadata(onnx).items():
            model.set_rt_info(value, ["kdexport", key])
        openvino.save_model(model, str(xml), compress_to_fp16=False)
        return xml.read_bytes(), xml.with_suffix(".bin").read_bytes()


def read(model: bytes | str | Path):
    """An openvino.Model from ONNX bytes, an .onnx file or an IR .xml (its .bin beside it)."""
    core = _core()
    if not isinstance(model, bytes):
        return core.read_model(str(model))
    with tempfile.TemporaryDirectory(prefix="kdexport-ov-") as tmp:
        path = Path(tmp, "model.onnx")
        path.write_bytes(model)
        return core.read_model(str(path))


def compile_model(model, device: str = "CPU", threads: int | None = None, latency: bool = False):
    """Compile an openvino.Model (or anything `read` takes) for `device`, in fp32 on CPU."""
    model = model if hasattr(model, "get_parameters") else read(model)
    config: dict = {"INFERENCE_PRECISION_HINT": "f32"} if device == "CPU" else {}
    if latency:  # one request at a time, as the single-stream method measures
        config.update(PERFORMANCE_HINT="LATENCY", NUM_STREAMS="1")
    if threads is not None and device == "CPU":
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return _core().compile_model(model, device, config)


def device_name(device: str) -> str:
    return str(_core().get_property(device, "FULL_DEVICE_NAME"))


class OpenVINORunner:
    """OpenVINO on one device as a runner (float32 NCHW -> logits); pads a fixed batch."""

    def __init__(self, model: bytes | str | Path, device: str = "CPU", threads: int | None = None):
        self.compiled = compile_model(model, device, threads)
        self.runtime = f"openvino-{device.lower()}"
        shape = self.compiled.input(0).get_partial_shape()
        self.fixed = shape[0].get_length() if shape[0].is_static else None
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        outs = []
        for chunk, n in batches(x.astype(np.float32), self.fixed or 64, pad=self.fixed is not None):
            res = self.request.infer({0: chunk})
            outs.append(np.array(res[self.compiled.output(0)])[:n])
        return np.concatenate(outs)
