"""Backends for profiling: what can run where, the artifact being profiled, and one runner per backend.

A runner turns an artifact into a zero-argument query per batch size, `prepare(batch) -> fn`. When
`stream()` is None the query blocks until done (CPU, ORT) and is timed with the host clock; otherwise it is
enqueued on that CUDA stream and timed with CUDA events. `close()` releases the runner and undoes what it did
to a caller's module.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import load_model
from ..errors import ConfigError, KdexportError
from ..export import export_onnx, openvino_ir
from ..export.tensorrt_engine import EngineRunner
from ..kernels.modules import SparsifyConfig, sparsify_
from ..preflight import read_onnx
from ..vocab import Backend


class BackendUnavailable(KdexportError):
    """A backend that cannot run here (package, provider or GPU missing) or on this kind of artifact."""


GPU_ONLY = {Backend.TORCH_SPARSE, Backend.ORT_CUDA, Backend.ORT_TRT, Backend.TENSORRT}
ORT_PROVIDERS = {Backend.ORT_CPU: "CPUExecutionProvider", Backend.ORT_CUDA: "CUDAExecutionProvider",
                 Backend.ORT_TRT: "TensorrtExecutionProvider"}
NEEDS = {  # backend -> (what it needs, how to get it)
    Backend.TORCH_SPARSE: ("a CUDA GPU, triton and kdexport's sparse kernels (kdexport.kernels)",
                           "pip install 'kdexport[sparse]'"),
    Backend.ORT_CPU: ("onnxruntime", "pip install onnxruntime"),
    Backend.ORT_CUDA: ("onnxruntime-gpu and a CUDA GPU",
                       "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"),
    Backend.ORT_TRT: ("onnxruntime-gpu with its TensorRT provider, the TensorRT libraries and a CUDA GPU",
                      "pip uninstall -y onnxruntime && pip install onnxruntime-gpu tensorrt"),
    Backend.TENSORRT: ("the tensorrt and polygraphy packages and a CUDA GPU", "pip install 'kdexport[tensorrt]'"),
    Backend.OPENVINO: ("the openvino package", openvino_ir.INSTALL),
}
_TORCH_KINDS, _ORT_KINDS = ("module", "checkpoint"), ("onnx", "checkpoint", "module")
_KINDS = {Backend.TORCH: _TORCH_KINDS, Backend.TORCH_SPARSE: _TORCH_KINDS, Backend.ORT_CPU: _ORT_KINDS,
          Backend.ORT_CUDA: _ORT_KINDS, Backend.ORT_TRT: _ORT_KINDS, Backend.TENSORRT: ("engine",),
          Backend.OPENVINO: (*_ORT_KINDS, "openvino")}
AUTO_CANDIDATES = {  # (artifact kind, device) -> candidates, in order of preference on a tie
    ("module", "cpu"): (Backend.ORT_CPU, Backend.TORCH),
    ("checkpoint", "cpu"): (Backend.ORT_CPU, Backend.TORCH),
    ("onnx", "cpu"): (Backend.ORT_CPU,), ("engine", "cpu"): (Backend.TENSORRT,),
    ("openvino", "cpu"): (Backend.OPENVINO,), ("openvino", "cuda"): (Backend.OPENVINO,),
    ("module", "cuda"): (Backend.ORT_TRT, Backend.ORT_CUDA, Backend.TORCH_SPARSE, Backend.TORCH),
    ("onnx", "cuda"): (Backend.ORT_TRT, Backend.ORT_CUDA), ("engine", "cuda"): (Backend.TENSORRT,),
}
AUTO_CANDIDATES[("checkpoint", "cuda")] = AUTO_CANDIDATES[("module", "cuda")]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def cuda_reason() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA GPU is visible to torch"


def reason_for(backend: Backend) -> str | None:
    """Why `backend` cannot run here (one line naming what to install), or None when it can."""
    if backend is Backend.TORCH:
        return None
    missing = []
    if backend in GPU_ONLY and cuda_reason():
        missing.append("a CUDA GPU")
    if backend is Backend.TORCH_SPARSE:
        missing += [m for m in ("triton", "kdexport.kernels.modules") if not _installed(m)]
    elif backend is Backend.TENSORRT:
        missing += [f"the {m} package" for m in ("tensorrt", "polygraphy") if not _installed(m)]
    elif backend is Backend.OPENVINO:
        missing += [] if _installed("openvino") else ["the openvino package"]
    elif not _installed("onnxruntime"):
        missing.append("onnxruntime")
    else:
        import onnxruntime as ort  # lazy: onnxruntime is heavy and only the ORT paths need it

        if ORT_PROVIDERS[backend] not in ort.get_available_providers():
            missing.append(f"onnxruntime's {ORT_PROVIDERS[backend]}")
    if not missing:
        return None
    needs, fix = NEEDS[backend]
    if missing == ["a CUDA GPU"]:
        fix = "run it on a machine with one, or use --backend torch or ort-cpu"
    return f"backend '{backend.value}' needs {needs} (missing here: {', '.join(missing)}): {fix}"


def available_backends() -> dict[str, str | None]:
    """Every concrete backend -> None if it can run here, else the reason. Initialises no CUDA context."""
    return {b.value: reason_for(b) for b in Backend if b is not Backend.AUTO}


class Skip(Exception):
    """A runner cannot take this batch size (fixed batch dimension); the message is the user-facing note."""


class Artifact:
    """What is profiled: an nn.Module, a checkpoint, ONNX (file or bytes), a TensorRT engine file or an OpenVINO
    IR (.xml, its .bin beside it)."""

    def __init__(self, obj: str | Path | bytes | nn.Module):
        self.path: Path | None = None
        self.data: bytes | None = None
        self._model: nn.Module | None = None
        self.spec_size: tuple[int, int, int] | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._onnx: Path | None = None
        if isinstance(obj, nn.Module):
            self.kind, self.label, self._model = "module", type(obj).__name__, obj
            self.nbytes = sum(t.numel() * t.element_size() for t in obj.state_dict().values())
            return
        if isinstance(obj, (bytes, bytearray)):
            self.kind, self.label, self.data, self.nbytes = "onnx", "<onnx bytes>", bytes(obj), len(obj)
            return
        self.path = Path(obj)
        self.label = str(self.path)
        if not self.path.is_file():
            raise ConfigError(f"artifact not found: {self.path}")
        suffix = self.path.suffix.lower()
        with open(self.path, "rb") as f:
            zip_magic = f.read(2) == b"PK"
        if suffix == ".onnx":
            self.kind = "onnx"
        elif suffix in (".engine", ".plan", ".trt"):
            self.kind = "engine"
        elif suffix == ".xml":
            self.kind = "openvino"
        elif suffix in (".pt", ".pth", ".ckpt") or zip_magic:
            self.kind = "checkpoint"
        else:
            raise ConfigError(f"cannot tell what {self.path} is: profile a .pt checkpoint, an .onnx model, "
                              "a TensorRT .engine or an OpenVINO .xml")
        self.nbytes = _onnx_bytes(self.path) if self.kind == "onnx" else self.path.stat().st_size
        if self.kind == "openvino":
            weights = self.path.with_suffix(".bin")
            self.nbytes += weights.stat().st_size if weights.is_file() else 0

    def model(self) -> nn.Module:
        if self._model is None:
            self._model, spec = load_model(self.path)
            self.spec_size = tuple(spec["input_size"])
        return self._model

    def onnx(self, input_size=None) -> Path | bytes:
        if self.kind in ("onnx", "openvino"):
            return self.path or self.data
        if self._onnx is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kdexport-profile-")
            self._onnx = _onnx_for(self, Path(self._tmp.name) / "model.onnx", input_size)
        return self._onnx

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _onnx_bytes(path: Path) -> int:
    """Size of an ONNX model including the external-data files it references."""
    total, seen = path.stat().st_size, set()
    model = read_onnx(path)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                ext = path.parent / entry.value
                total += ext.stat().st_size if ext.is_file() else 0
    return total


def _onnx_for(art: Artifact, out: Path, input_size=None) -> Path:
    """A checkpoint/module as ONNX (dynamic batch) for ORT; a module needs `input_size` (C, H, W)."""
    export_onnx(art.path if art.path is not None else art.model(), out, input_size=input_size)
    return out


class _TorchRunner:
    """torch / torch-sparse: the nn.Module itself; on CUDA, timed with events on the current stream."""

    torch_allocates, extra_cuda_bytes = True, 0

    def __init__(self, art: Artifact, backend: Backend, device: str, input_size):
        model = art.model()
        self.input_size = tuple(input_size or art.spec_size or ())
        if not self.input_size:
            raise ConfigError("the input size of an in-memory model is unknown: pass input_size=(C, H, W)")
        if backend is Backend.TORCH_SPARSE and art.kind == "module":
            model = copy.deepcopy(model)  # sparsify_ swaps layers in place: never on the caller's module
        first = next(model.parameters(), None)
        self._restore = (model, model.training, first.device if first is not None else None)
        self.model, self.device = model.eval().to(device), device
        if backend is Backend.TORCH_SPARSE:
            sparsify_(self.model, SparsifyConfig(input_size=self.input_size))
        self.dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32

    def prepare(self, batch: int) -> Callable[[], Any]:
        x = torch.randn(batch, *self.input_size, device=self.device, dtype=self.dtype)
        return lambda: self.model(x)

    def stream(self):
        return torch.cuda.current_stream() if self.device == "cuda" else None

    def close(self) -> None:
        model, training, device = self._restore
        if device is not None:
            model.to(device)
        model.train(training)
        self.model = self._restore = None


class OrtRunner:
    """ONNX Runtime with one execution provider; on CUDA the input and outputs are bound on the device."""

    torch_allocates, extra_cuda_bytes = False, 0  # ORT's own arena: invisible to torch's counters

    def __init__(self, art: Artifact, backend: Backend, threads: int, input_size, batch_sizes):
        import onnxruntime as ort  # lazy: onnxruntime is heavy and only the ORT paths need it

        self.ort, self.device = ort, ("cpu" if backend is Backend.ORT_CPU else "cuda")
        source = art.onnx(input_size)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list = ["CPUExecutionProvider"]
        if backend is not Backend.ORT_CPU:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": 0}))
        if backend is Backend.ORT_TRT:
            trt_options = _trt_profile(source, input_size or art.spec_size, max(batch_sizes))
            providers.insert(0, ("TensorrtExecutionProvider", trt_options))
        self.session = ort.InferenceSession(str(source) if isinstance(source, Path) else source, opts,
                                            providers=providers)
        if self.session.get_providers()[0] != ORT_PROVIDERS[backend]:  # ORT falls back to CPU silently
            raise BackendUnavailable(f"onnxruntime could not start {ORT_PROVIDERS[backend]} (its CUDA or "
                                     f"TensorRT libraries are missing or mismatched): {NEEDS[backend][1]}")
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(f"the ONNX model has {len(inputs)} inputs; kdexport profiles 1-input models")
        self.input = inputs[0]
        self.outputs = [o.name for o in self.session.get_outputs()]
        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
        if self.input.type not in dtypes:
            raise ConfigError(f"unsupported ONNX input type {self.input.type}; expected float32/float16")
        self.dtype = dtypes[self.input.type]
        self.input_size = _chw(self.input.shape[1:], input_size or art.spec_size, "the ONNX input")
        self._keep: list = []

    def prepare(self, batch: int) -> Callable[[], Any]:
        fixed = self.input.shape[0]
        if isinstance(fixed, int) and fixed != batch:
            raise Skip(f"batch {batch} skipped: ONNX input '{self.input.name}' has a fixed batch of {fixed}; "
                       "re-export with a dynamic batch axis to profile it")
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, *self.input_size), dtype=np.float32).astype(self.dtype)
        if self.device == "cpu":
            feed = {self.input.name: x}
            return lambda: self.session.run(self.outputs, feed)
        x_cuda = self.ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        self._keep = [x_cuda]
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input.name, x_cuda)
        for name in self.outputs:
            binding.bind_output(name, "cuda", 0)
        binding.synchronize_inputs()
        return lambda: self.session.run_with_iobinding(binding)  # returns once the GPU work is done

    def stream(self):
        return None

    def close(self) -> None:
        self.session = self._keep = None


def _trt_profile(source: Path | bytes, input_size, max_batch: int) -> dict[str, Any]:
    """ORT TensorRT provider options: one optimisation profile from batch 1 to the largest requested batch."""
    import onnx  # lazy: onnx is heavy and only ONNX artefacts need it

    model = onnx.load(str(source), load_external_data=False) if isinstance(source, Path) else \
        onnx.load_from_string(source)
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims = [d.dim_value or None for d in inp.type.tensor_type.shape.dim]
    options: dict[str, Any] = {"device_id": 0}
    if dims and dims[0] is None:  # dynamic batch: TensorRT needs its range up front
        chw = "x".join(map(str, _chw(dims[1:], input_size, "the ONNX input")))
        options.update(trt_profile_min_shapes=f"{inp.name}:1x{chw}",
                       trt_profile_opt_shapes=f"{inp.name}:{max_batch}x{chw}",
                       trt_profile_max_shapes=f"{inp.name}:{max_batch}x{chw}")
    return options


class _TensorRTRunner(EngineRunner):
    """A serialised TensorRT engine, run by Polygraphy's TrtRunner (kdexport.export.tensorrt_engine)."""

    def __init__(self, art: Artifact, input_size):
        super().__init__(art.path.read_bytes())
        self.input_size = _chw(list(self.input_size), input_size, "the engine input")

    def prepare(self, batch: int) -> Callable[[], Any]:
        lo, hi = self.batch_range
        if not lo <= batch <= hi:
            raise Skip(f"batch {batch} skipped: the engine takes batches {lo}..{hi}; rebuild it with a "
                       "profile that covers it")
        return super().prepare(batch)


class _OpenVINORunner:
    """OpenVINO on one device (--ov-device), recompiled per batch size with that static shape (OpenVINO's own
    latency practice; NPUs need static shapes), LATENCY hint, one stream, `threads` inference threads on CPU.
    `infer` blocks until the device is done: the host clock times each query."""

    torch_allocates, extra_cuda_bytes = False, 0

    def __init__(self, art: Artifact, threads: int, input_size, ov_device: str):
        reason = openvino_ir.missing(ov_device)
        if reason:
            raise BackendUnavailable(reason)
        self.model, self.ov_device, self.threads = openvino_ir.read(art.onnx(input_size)), ov_device, threads
        shape = self.model.input(0).get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        self.fixed = dims[0]
        self.input_size = _chw(dims[1:], input_size or art.spec_size, "the model input")
        self.device_name = openvino_ir.device_name(ov_device)

    def prepare(self, batch: int) -> Callable[[], Any]:
        if self.fixed is not None and self.fixed != batch:
            raise Skip(f"batch {batch} skipped: the model has a fixed batch of {self.fixed}; re-export it with "
                       "--dynamic to profile it")
        self.model.reshape({0: [batch, *self.input_size]})
        compiled = openvino_ir.compile_model(self.model, self.ov_device, self.threads, latency=True)
        request = compiled.create_infer_request()
        x = np.random.default_rng(0).standard_normal((batch, *self.input_size), dtype=np.float32)
        return lambda: request.infer({0: x})

    def stream(self):
        return None

    def close(self) -> None:
        self.model = None


def _chw(dims, wanted, what: str) -> tuple[int, int, int]:
    """Reconcile a model's (possibly symbolic) C,H,W dims with the requested input size."""
    static = [d if isinstance(d, int) and d > 0 else None for d in dims]
    if len(static) != 3:
        raise ConfigError(f"{what} has {len(static) + 1} dimensions; expected N,C,H,W")
    if wanted is not None:
        wanted = tuple(wanted)
        if any(s is not None and s != w for s, w in zip(static, wanted, strict=True)):
            raise ConfigError(f"input size {list(wanted)} does not match {what}'s fixed shape {list(dims)}")
        return wanted
    if None in static:
        raise ConfigError(f"{what} has symbolic dimensions {list(dims)}: pass the input size (C, H, W)")
    return tuple(static)


def make_runner(backend: Backend, art: Artifact, *, device: str, threads: int, input_size, batch_sizes,
                ov_device: str = "CPU"):
    """The runner for `backend` on `art`, or BackendUnavailable naming what is missing."""
    if art.kind not in _KINDS[backend]:
        hint = {"onnx": "use --backend ort-cpu, ort-cuda, ort-trt or openvino", "engine": "use --backend tensorrt",
                "openvino": "use --backend openvino"}.get(
            art.kind, "build an engine with `kdexport export`, then profile the .engine")
        what = {"onnx": "an ONNX model", "engine": "a TensorRT engine", "module": "an in-memory module",
                "openvino": "an OpenVINO IR"}.get(art.kind, "a checkpoint")
        raise BackendUnavailable(f"backend '{backend.value}' cannot run {what} ({art.label}): {hint}")
    reason = reason_for(backend)
    if reason is None and device == "cuda" and cuda_reason():
        reason = "device 'cuda' needs a CUDA GPU and torch sees none: use --device cpu"
    if reason:
        raise BackendUnavailable(reason)
    if backend in (Backend.TORCH, Backend.TORCH_SPARSE):
        return _TorchRunner(art, backend, device, input_size)
    if backend is Backend.TENSORRT:
        return _TensorRTRunner(art, input_size)
    if backend is Backend.OPENVINO:
        return _OpenVINORunner(art, threads, input_size, ov_device)
    return OrtRunner(art, backend, threads, input_size, batch_sizes)
