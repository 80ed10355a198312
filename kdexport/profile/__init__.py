"""Latency profiling per backend (MLPerf single-stream), with the environment recorded beside every result.

Method: `warmup` untimed queries, then `iters` timed ones, each issued after the previous has finished. Torch
runs under `torch.inference_mode`. On CUDA the input already lives on the device and each query is timed with
CUDA events on its stream (ORT, OpenVINO and TensorRT through Polygraphy, whose calls block, with the host
clock). The thread count is fixed (`torch.set_num_threads`, ORT `intra_op_num_threads`, OpenVINO
`INFERENCE_NUM_THREADS`), recorded, and torch's is restored afterwards.

Percentiles: numpy's "linear" method (Hyndman-Fan type 7, interpolation between order statistics); std is
the sample std. An ONNX model or engine whose batch dimension is fixed skips the batch sizes it cannot take,
with a note; when none is left, ConfigError.

`ProfileResult.to_dict()` schema (schema_version 1):
    artifact, artifact_kind, artifact_bytes, backend, device, threads, warmup, iters, input_size [C,H,W],
    environment {...}, notes [str],
    results [{batch, p50_ms, p90_ms, p99_ms, mean_ms, std_ms, throughput_ips, peak_rss_mb, peak_cuda_mb}]
peak_rss_mb: host peak resident set (MiB) during that batch's queries (VmHWM, reset per batch where Linux
allows; else the process-lifetime peak, and a note says so). peak_cuda_mb: torch's CUDA allocator peak (MiB),
plus the engine's activation memory for tensorrt; None on CPU and for ORT (its arena is invisible to torch).
"""

from ..vocab import Backend
from .backends import BackendUnavailable, available_backends
from .environment import environment
from .measure import (
    SCHEMA_VERSION,
    BatchResult,
    LatencyStats,
    ProfileConfig,
    ProfileResult,
    measure_module,
    measure_onnx,
    profile,
    summarize,
)

__all__ = ["Backend", "BackendUnavailable", "ProfileConfig", "LatencyStats", "BatchResult", "ProfileResult",
           "summarize", "SCHEMA_VERSION", "available_backends", "environment", "profile", "measure_module",
           "measure_onnx"]
