"""TensorRT through NVIDIA's Polygraphy: a thin adapter that builds an engine from verified ONNX and runs it.

Polygraphy (`network_from_onnx_bytes`, `CreateConfig`, `engine_from_network`, `TrtRunner`) owns the builder,
the optimisation profile, the I/O buffers and the dtype handling; kdexport only states what it wants:
    fp32        TF32 off (Polygraphy's default): fp32 means fp32
    --half      fp16 kernels allowed
    --int8      the QDQ model, built with explicit quantisation (the Q/DQ scales, no TensorRT calibrator)
    --dynamic   one profile: batch 1 / --batch / max(2 x batch, 32)
    --workspace the workspace memory pool limit, MiB
When the engine's parity fails, `layerwise` runs Polygraphy's Comparator on ONNX Runtime and TensorRT with
every tensor marked as an output and names the first that disagrees: the diagnostic printed with the error.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import numpy as np
import torch

from .checks import batches
from .formats import ExportFailed, TensorRTUnavailable

INSTALL = "pip install 'kdexport[tensorrt]' on a machine with an NVIDIA GPU (on Jetson use JetPack's TensorRT)"
INPUT = "input"


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing() -> list[str]:
    """What --format tensorrt lacks here (empty when it can run). Initialises no CUDA context."""
    lacks = [] if torch.cuda.is_available() else ["a CUDA GPU"]
    return lacks + [f"the {m} package" for m in ("tensorrt", "polygraphy") if not _found(m)]


def require() -> None:
    """Refuse --format tensorrt up front, naming what is missing (exit 2, before any work)."""
    lacks = missing()
    if lacks:
        raise TensorRTUnavailable(f"--format tensorrt needs a CUDA GPU and the tensorrt and polygraphy packages "
                                  f"(missing here: {' and '.join(lacks)}): {INSTALL}")


def profile_shapes(input_size, batch: int, dynamic: bool) -> tuple[tuple[int, ...], ...] | None:
    """(min, opt, max) input shapes of the one optimisation profile, or None for a static batch."""
    if not dynamic:
        return None
    chw = tuple(input_size)
    return (1, *chw), (batch, *chw), (max(2 * batch, 32), *chw)


def config_options(*, input_size, batch: int, dynamic: bool, half: bool, int8: bool,
                   workspace_mb: int) -> dict[str, Any]:
    """What kdexport asks of Polygraphy's CreateConfig, as plain values (checked on any machine)."""
    if workspace_mb < 1:
        raise ExportFailed(f"the TensorRT workspace must be >= 1 MiB, got {workspace_mb}")
    return {"tf32": False, "fp16": half, "int8": int8, "workspace_bytes": workspace_mb << 20,
            "profile": profile_shapes(input_size, batch, dynamic)}


def _polygraphy_trt():
    """polygraphy.backend.trt, or one line saying TensorRT is installed but broken."""
    try:
        import tensorrt  # noqa: F401  # lazy: optional (kdexport[tensorrt]), GPU machines only
        from polygraphy.backend import trt as ptrt  # lazy: optional (kdexport[tensorrt])
    except ImportError as exc:
        raise TensorRTUnavailable(f"tensorrt or polygraphy is installed but does not import ({exc}): reinstall "
                                  f"them, matching this machine's CUDA driver: {INSTALL}") from None
    return ptrt


def _create_config(ptrt, options: dict[str, Any]):
    import tensorrt as trt  # lazy: optional (kdexport[tensorrt]), GPU machines only

    profiles = None
    if options["profile"] is not None:
        lo, opt, hi = options["profile"]
        profiles = [ptrt.Profile().add(INPUT, min=lo, opt=opt, max=hi)]
    return ptrt.CreateConfig(tf32=options["tf32"], fp16=options["fp16"], int8=options["int8"], profiles=profiles,
                             memory_pool_limits={trt.MemoryPoolType.WORKSPACE: options["workspace_bytes"]})


def build_engine(onnx: bytes, **options: Any) -> tuple[bytes, float]:
    """Parse ONNX and build a serialised engine with Polygraphy; (engine bytes, build seconds)."""
    ptrt = _polygraphy_trt()
    opts = config_options(**options)
    start = time.perf_counter()
    try:
        engine = ptrt.engine_from_network(ptrt.network_from_onnx_bytes(onnx), config=_create_config(ptrt, opts))
    except Exception as exc:  # Polygraphy raises PolygraphyException with TensorRT's own message
        raise ExportFailed(f"TensorRT (through Polygraphy) could not build the engine: {str(exc)[:400]}; try a "
                           "larger --workspace") from None
    return bytes(ptrt.bytes_from_engine(engine)), time.perf_counter() - start


class EngineRunner:
    """A serialised engine run by Polygraphy's TrtRunner: a runner (NCHW float32 -> logits) for checks, and
    `prepare(batch)` for the profiler (inputs already on the GPU; `infer` returns once the GPU is done)."""

    runtime = "tensorrt"
    torch_allocates = True

    def __init__(self, plan: bytes):
        ptrt = _polygraphy_trt()
        try:
            self.runner = ptrt.TrtRunner(ptrt.engine_from_bytes(plan))
            self.runner.activate()
        except Exception as exc:
            raise TensorRTUnavailable(f"TensorRT could not load the engine ({str(exc)[:200]}): an engine runs only "
                                      "with the TensorRT version and GPU it was built for; rebuild it here") from None
        meta = self.runner.get_input_metadata()
        if len(meta) != 1:
            raise ExportFailed(f"the engine has {len(meta)} inputs; kdexport runs 1-input models")
        self.input, info = next(iter(meta.items()))
        engine = self.runner.context.engine
        if info.shape[0] in (-1, None) or not isinstance(info.shape[0], int):
            lo, _, hi = (list(s) for s in engine.get_tensor_profile_shape(self.input, 0))
            self.batch_range, self.input_size = (lo[0], hi[0]), tuple(hi[1:])
        else:
            self.batch_range, self.input_size = (info.shape[0], info.shape[0]), tuple(info.shape[1:])
        size_v2 = getattr(engine, "device_memory_size_v2", None)
        self.extra_cuda_bytes = size_v2 if size_v2 is not None else engine.device_memory_size

    def __call__(self, x: np.ndarray) -> np.ndarray:
        lo, hi = self.batch_range
        outs = []
        for chunk, n in batches(x.astype(np.float32), hi, pad=lo == hi):
            out = self.runner.infer({self.input: chunk})
            outs.append(np.asarray(next(iter(out.values())), dtype=np.float32)[:n])
        return np.concatenate(outs)

    def prepare(self, batch: int):
        x = torch.randn(batch, *self.input_size, device="cuda")
        feed = {self.input: x}
        return lambda: self.runner.infer(feed, copy_outputs_to_host=False)

    def stream(self):
        return None  # TrtRunner.infer synchronises its stream: the host clock times the whole query

    def close(self) -> None:
        if self.runner is not None:
            self.runner.deactivate()
            self.runner = None


def layerwise(onnx: bytes, images: np.ndarray, options: dict[str, Any], atol: float) -> str:
    """Polygraphy's layer-wise comparison: ONNX Runtime vs TensorRT with every tensor marked as an output, on a
    few parity images; the first tensors (in graph order) whose values differ by more than `atol`."""
    ptrt = _polygraphy_trt()
    # lazy: optional (kdexport[tensorrt])
    from polygraphy import constants
    from polygraphy.backend.onnx import BytesFromOnnx, ModifyOutputs, OnnxFromBytes
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, CompareFunc

    marked = BytesFromOnnx(ModifyOutputs(OnnxFromBytes(onnx), outputs=constants.MARK_ALL))
    network = ptrt.ModifyNetworkOutputs(ptrt.NetworkFromOnnxBytes(onnx), outputs=constants.MARK_ALL)
    engine = ptrt.EngineFromNetwork(network, config=_create_config(ptrt, config_options(**options)))
    static = not options["dynamic"]
    size = options["batch"] if static else 1  # a static engine takes exactly its batch
    feeds = [{INPUT: c} for c, _ in batches(images[: max(size, 4)].astype(np.float32), size, pad=static)]
    results = Comparator.run([OnnxrtRunner(SessionFromOnnx(marked)), ptrt.TrtRunner(engine)], data_loader=feeds)
    accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=atol))
    order = [name for name in results[0][1][0].keys()]
    bad = [name for pair in accuracy.values() for it in pair for name, ok in it.items() if not ok]
    first = sorted(set(bad), key=lambda n: order.index(n) if n in order else len(order))[:3]
    return f"first tensors that differ (Polygraphy, atol {atol:g}): {', '.join(first)}" if first else \
        "Polygraphy's layer-wise comparison found no tensor over the tolerance before the output"
