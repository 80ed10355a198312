"""profile(): time an artifact per batch size with one backend (method and result schema: kdexport.profile)."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import check_image_size
from ..errors import ConfigError
from ..vocab import OV_DEVICES, Backend
from .backends import (
    AUTO_CANDIDATES,
    GPU_ONLY,
    Artifact,
    BackendUnavailable,
    Skip,
    make_runner,
)
from .environment import environment

SCHEMA_VERSION = 1
_MIB = 2 ** 20


def _default_threads() -> int:
    """The CPUs this process may run on (affinity-aware, so containers and taskset are respected)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ProfileConfig:
    """What to measure and how. device None: cuda for GPU-only backends, else cpu (auto on a GPU: 'cuda')."""

    backend: Backend = Backend.AUTO
    device: str | None = None
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup: int = 10
    iters: int = 50
    threads: int | None = None
    input_size: tuple[int, int, int] | None = None  # (C, H, W); None: from the checkpoint, ONNX or engine
    ov_device: str | None = None  # OpenVINO's device (CPU, GPU or NPU) for backend openvino [CPU]

    def __post_init__(self) -> None:
        try:
            backend = Backend(self.backend)
        except ValueError:
            raise ConfigError(f"unknown backend {self.backend!r}; choose one of "
                              f"{', '.join(b.value for b in Backend)}") from None
        device = self.device or ("cuda" if backend in GPU_ONLY else "cpu")
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if backend in GPU_ONLY and device != "cuda":
            raise ConfigError(f"backend '{backend.value}' runs on cuda only; drop --device cpu")
        if backend is Backend.ORT_CPU and device != "cpu":
            raise ConfigError("backend 'ort-cpu' runs on cpu only; use --backend ort-cuda for the GPU")
        if backend is Backend.OPENVINO and device != "cpu":
            raise ConfigError("backend 'openvino' picks its device with --ov-device CPU, GPU or NPU; drop --device")
        if self.ov_device is not None and backend not in (Backend.OPENVINO, Backend.AUTO):
            raise ConfigError("--ov-device picks OpenVINO's device: pass it with --backend openvino")
        if self.ov_device is not None and self.ov_device not in OV_DEVICES:
            raise ConfigError(f"--ov-device must be one of {', '.join(OV_DEVICES)}, got {self.ov_device!r}")
        sizes = tuple(self.batch_sizes) if isinstance(self.batch_sizes, Sequence) else (self.batch_sizes,)
        if not sizes or len(set(sizes)) < len(sizes) or not all(isinstance(b, int) and b > 0 for b in sizes):
            raise ConfigError(f"batch sizes must be distinct positive integers, got {self.batch_sizes!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not isinstance(self.iters, int) or self.iters < 1:
            raise ConfigError(f"iters must be an integer >= 1, got {self.iters!r}")
        threads = _default_threads() if self.threads is None else self.threads
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be an integer >= 1, got {self.threads!r}")
        size = self.input_size
        if size is not None:
            size = tuple(size)
            if len(size) != 3 or not all(isinstance(d, int) and d >= 1 for d in size):
                raise ConfigError(f"input size must be 3 positive integers C,H,W, got {self.input_size!r}")
        for name, value in (("backend", backend), ("device", device), ("batch_sizes", sizes),
                            ("threads", threads), ("input_size", size)):
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    n: int


def summarize(latencies_ms: Sequence[float]) -> LatencyStats:
    """Percentiles (numpy 'linear' interpolation), mean and sample std (ddof=1; 0 for one sample)."""
    x = np.asarray(latencies_ms, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError("summarize needs a non-empty 1-D sequence of finite latencies")
    p50, p90, p99 = np.percentile(x, [50, 90, 99], method="linear")
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return LatencyStats(float(p50), float(p90), float(p99), float(x.mean()), std, int(x.size))


@dataclass(frozen=True)
class BatchResult:
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    throughput_ips: float  # images per second = batch / mean latency
    peak_rss_mb: float | None
    peak_cuda_mb: float | None


@dataclass(frozen=True)
class ProfileResult:
    artifact: str
    artifact_kind: str
    artifact_bytes: int | None
    backend: str
    device: str
    threads: int
    warmup: int
    iters: int
    input_size: tuple[int, int, int]
    environment: dict[str, Any]
    results: tuple[BatchResult, ...]
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; see the module docstring for the schema."""
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["results"] = [asdict(r) for r in self.results]
        d["notes"] = list(self.notes)
        return {"schema_version": SCHEMA_VERSION, **d}


def _peak_rss_reset() -> bool:
    """Reset the VmHWM high-water mark (Linux >= 4.0); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / _MIB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / _MIB if sys.platform == "darwin" else rss * 1024 / _MIB


def _time(fn: Callable[[], Any], warmup: int, iters: int, stream) -> list[float]:
    """Latency (ms) of `iters` queries after `warmup`, each started once the previous one has finished.

    stream None: host clock around a blocking call. Else CUDA events recorded on `stream` around the query.
    """
    out: list[float] = []
    if stream is None:
        for _ in range(warmup):
            fn()
        for _ in range(iters):
            t0 = time.perf_counter_ns()
            fn()
            out.append((time.perf_counter_ns() - t0) / 1e6)
        return out
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
            stream.synchronize()
        for _ in range(iters):
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            out.append(start.elapsed_time(end))
    return out


def _measure_batch(runner, batch: int, warmup: int, iters: int, device: str) -> tuple[BatchResult, bool]:
    """One batch size: (result, whether peak RSS covers this batch only)."""
    fn = runner.prepare(batch)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_scoped = _peak_rss_reset()
    with torch.inference_mode():
        s = summarize(_time(fn, warmup, iters, runner.stream()))
    cuda_mb = None
    if cuda and runner.torch_allocates:
        cuda_mb = (torch.cuda.max_memory_allocated() + runner.extra_cuda_bytes) / _MIB
    result = BatchResult(batch, s.p50_ms, s.p90_ms, s.p99_ms, s.mean_ms, s.std_ms, batch * 1000.0 / s.mean_ms,
                         _peak_rss_mb(), cuda_mb)
    return result, rss_scoped


def _runner_args(config: ProfileConfig) -> dict[str, Any]:
    return {"device": config.device, "threads": config.threads, "input_size": config.input_size,
            "batch_sizes": config.batch_sizes, "ov_device": config.ov_device or "CPU"}


def _choose(art: Artifact, config: ProfileConfig) -> tuple[Any, Backend, str]:
    """Auto: time each runnable candidate briefly at the first batch size and keep the fastest median."""
    batch, tried, skipped = config.batch_sizes[0], [], []
    warmup, iters = min(config.warmup, 3), min(config.iters, 10)
    for backend in AUTO_CANDIDATES[(art.kind, config.device)]:
        runner = None
        try:
            runner = make_runner(backend, art, **_runner_args(config))
            p50 = _measure_batch(runner, batch, warmup, iters, config.device)[0].p50_ms
        except ConfigError:  # the user's input (an input size the model does not take) fails every candidate
            raise
        except Exception as exc:  # a candidate that cannot run must not stop the others; the note says why
            why = str(exc) if isinstance(exc, (BackendUnavailable, Skip)) else f"failed: {exc!r}"
            skipped.append(f"{backend.value}: {why}")
            if runner is not None:
                runner.close()
            continue
        tried.append((p50, backend, runner))
    if not tried:
        raise BackendUnavailable(f"auto found no backend for this {art.kind} on {config.device}: "
                                 + "; ".join(skipped))
    tried.sort(key=lambda t: t[0])
    best_ms, best, runner = tried[0]
    for _, _, other in tried[1:]:
        other.close()
    others = ", ".join(f"{b.value} {ms:.3f} ms" for ms, b, _ in tried[1:]) or "the only candidate that ran"
    note = (f"auto chose {best.value}: lowest median at batch {batch} over {iters} queries "
            f"({best_ms:.3f} ms; {others})")
    return runner, best, note + (f"; not used: {'; '.join(skipped)}" if skipped else "")


@contextlib.contextmanager
def _fixed_threads(n: int):
    """Pin torch's intra-op thread count for the measurement, then restore the caller's."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def profile(artifact: str | Path | bytes | nn.Module, config: ProfileConfig | None = None) -> ProfileResult:
    """Measure latency, throughput and peak memory of `artifact` at each batch size with one backend.

    artifact: a kdexport checkpoint (.pt), an ONNX model (path or bytes), a TensorRT engine, or an nn.Module.
    Raises BackendUnavailable when the backend cannot run here or on this artifact, ConfigError for bad input.
    """
    config = config or ProfileConfig()
    art = Artifact(artifact)
    if art.kind == "checkpoint" and config.input_size is not None:  # the checkpoint's spec decides its size
        art.model()
        check_image_size(config.input_size[1:], art.spec_size, art.label)
    notes: list[str] = []
    results: list[BatchResult] = []
    rss_scoped = True
    timing = (config.warmup, config.iters, config.device)
    try:
        with _fixed_threads(config.threads):
            if config.backend is Backend.AUTO:
                runner, backend, note = _choose(art, config)
                notes.append(note)
            else:
                backend = config.backend
                runner = make_runner(backend, art, **_runner_args(config))
            ov_device = getattr(runner, "device_name", None)
            try:
                for batch in config.batch_sizes:
                    try:
                        result, scoped = _measure_batch(runner, batch, *timing)
                    except Skip as skip:
                        notes.append(str(skip))
                        continue
                    results.append(result)
                    rss_scoped &= scoped
            finally:
                runner.close()
    finally:
        art.close()
    if not results:
        raise ConfigError(f"no requested batch size could run: {'; '.join(notes)}")
    if not rss_scoped:
        notes.append("peak_rss_mb is the process-lifetime peak (resetting VmHWM is not permitted here)")
    env = environment(config.device, threads=config.threads)
    if ov_device is not None:  # the device OpenVINO ran on, as it names it
        env["openvino_device"] = f"{config.ov_device or 'CPU'}: {ov_device}"
    notes += env["warnings"]
    return ProfileResult(art.label, art.kind, art.nbytes, backend.value, config.device, config.threads,
                         config.warmup, config.iters, runner.input_size, env, tuple(results), tuple(notes))


def measure_module(model: nn.Module, input_size: tuple[int, int, int],
                   batch_sizes: Sequence[int] = (1, 8, 32), *, device: str = "cpu", warmup: int = 10,
                   iters: int = 50, threads: int | None = None) -> ProfileResult:
    """Profile an in-memory nn.Module with the torch backend (for `compress --profile` and the sweep)."""
    config = ProfileConfig(Backend.TORCH, device, tuple(batch_sizes), warmup, iters, threads,
                           tuple(input_size))
    return profile(model, config)


def measure_onnx(model: str | Path | bytes, batch_sizes: Sequence[int] = (1, 8, 32), *, device: str = "cpu",
                 input_size: tuple[int, int, int] | None = None, warmup: int = 10, iters: int = 50,
                 threads: int | None = None) -> ProfileResult:
    """Profile an ONNX model (path or serialised bytes) with ort-cpu, or ort-cuda when device='cuda'."""
    backend = Backend.ORT_CPU if device == "cpu" else Backend.ORT_CUDA
    size = tuple(input_size) if input_size is not None else None
    return profile(model, ProfileConfig(backend, device, tuple(batch_sizes), warmup, iters, threads, size))
