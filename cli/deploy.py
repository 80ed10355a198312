"""Subcommands that ship: export (ONNX, INT8, TensorRT) and profile (latency per backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..data import parse_image_size
from ..export import ExportConfig
from ..export import export as run_export
from ..profile import ProfileConfig
from ..profile import profile as run_profile
from ..vocab import BACKENDS, CALIB_METHODS, FORMAT_NAMES, INT8_TARGETS, OV_DEVICES, Backend, Format, parse_batch_sizes
from .app import DataDirOpt, JsonOpt, SpecSizeOpt, choices, command, emit, err

BackendName = choices("BackendName", BACKENDS)
ExportFormat = choices("ExportFormat", FORMAT_NAMES)  # trt is an alias of tensorrt
Int8Target = choices("Int8Target", INT8_TARGETS)
CalibMethod = choices("CalibMethod", CALIB_METHODS)
OVDevice = choices("OVDevice", OV_DEVICES)


@command
def profile(
    artifact: Annotated[Path, typer.Argument(help="A checkpoint (.pt), an ONNX model, a TensorRT engine or an "
                                             "OpenVINO IR (.xml).")],
    backend: Annotated[BackendName, typer.Option(help="Runtime to measure; auto picks the fastest here.")]
    = BackendName[Backend.AUTO.value],
    device: Annotated[str | None, typer.Option(help="cpu or cuda [cuda for GPU-only backends].")] = None,
    batch: Annotated[str, typer.Option(help="Comma list of batch sizes.")] = "1,8,32",
    warmup: Annotated[int, typer.Option(help="Untimed warm-up queries per batch size.")] = 10,
    iters: Annotated[int, typer.Option(help="Timed queries per batch size.")] = 50,
    threads: Annotated[int | None, typer.Option(help="CPU threads [all this process may use].")] = None,
    ov_device: Annotated[OVDevice | None, typer.Option(help="OpenVINO device for --backend openvino [CPU].")]
    = None,
    image_size: SpecSizeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure single-stream latency (p50/p90/p99), throughput and peak memory of an artifact."""
    size = parse_image_size(image_size)
    config = ProfileConfig(backend.value, device, parse_batch_sizes(batch), warmup, iters, threads,
                           input_size=(3, *size) if size else None, ov_device=ov_device.value if ov_device else None)
    result = run_profile(artifact, config)
    for note in result.notes:
        err.print(f"note: {note}", highlight=False)
    if as_json:
        emit([], "", True, payload=result.to_dict())
        return
    env = result.environment
    rows = [{"batch": r.batch, "p50 ms": r.p50_ms, "p90 ms": r.p90_ms, "p99 ms": r.p99_ms, "mean ms": r.mean_ms,
             "std ms": r.std_ms, "images/s": r.throughput_ips, "peak RSS MiB": r.peak_rss_mb} for r in result.results]
    where = env.get("gpu") if result.device == "cuda" else env.get("openvino_device") or env.get("cpu_model")
    emit(rows, f"{artifact.name}: {result.backend} on {result.device} ({where}), {result.threads} threads, "
         f"{result.artifact_bytes or 0:,} bytes", False)


@command
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A kdexport checkpoint (trained, distilled or pruned).")],
    format_: Annotated[ExportFormat, typer.Option("--format", "-f", help="onnx (CPU or GPU), tensorrt/trt "
                                                  "(an engine for this GPU) or openvino (IR .xml + .bin).")]
    = ExportFormat[Format.ONNX.value],
    opset: Annotated[int | None, typer.Option(help="ONNX opset, 13..20 [18].")] = None,
    batch: Annotated[int | None, typer.Option(help="Static batch size; with --dynamic the optimisation batch "
                                              "[1].")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Dynamic batch axis (TensorRT profile 1..max(2N,32))."
                                          )] = False,
    half: Annotated[bool, typer.Option("--half", help="fp16 engine (tensorrt).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="INT8 QDQ by ONNX Runtime static quantisation; TensorRT "
                                       "builds it with explicit quantisation.")] = False,
    int8_target: Annotated[Int8Target | None, typer.Option(help="INT8 recipe: tensorrt (symmetric, TensorRT's "
                                                           "Q/DQ placement; default) or cpu (ONNX Runtime's "
                                                           "U8S8, fast on CPUs).")] = None,
    calib: Annotated[int | None, typer.Option(help="Calibration images from the train split [128].")] = None,
    calib_method: Annotated[CalibMethod | None, typer.Option(help="INT8 calibration: auto (MinMax, Entropy, "
                                                             "Percentile and fp32-kept nodes, chosen on "
                                                             "validation; the default) or one method.")] = None,
    max_drop: Annotated[float | None, typer.Option(help="INT8 accuracy points allowed below fp32 on validation; "
                                                   "more exits 1 and writes nothing [1.0].")] = None,
    allow_drop: Annotated[bool, typer.Option("--allow-drop", help="Write the INT8 model even when it loses more "
                                             "than --max-drop (the output says so).")] = False,
    atol: Annotated[float | None, typer.Option(help="Parity tolerance on the logits, times max(1, max |logit|) "
                                               "(default: fp32 1e-3 ONNX Runtime, 2e-3 TensorRT; fp16 5e-2)."
                                               )] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda: where the PyTorch reference runs (cpu).")]
    = None,
    workspace: Annotated[int | None, typer.Option(help="TensorRT workspace limit in MiB [1024].")] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Validation (and test) images for the int8 accuracy "
                                                   "(all).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output file (default: exports/ next to the checkpoint)."
                                             )] = None,
    image_size: SpecSizeOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a checkpoint to ONNX (fp32 / INT8), a TensorRT engine or OpenVINO IR, verified on real images."""
    given = dict(opset=opset, batch=batch, dynamic=dynamic, half=half, int8=int8, calib=calib, atol=atol,
                 calib_method=calib_method.value if calib_method else None, max_drop=max_drop, allow_drop=allow_drop,
                 int8_target=int8_target.value if int8_target else None, device=device, workspace=workspace,
                 eval_limit=eval_limit, out=out, data_dir=data_dir, image_size=image_size)
    config = ExportConfig(format_.value, **{k: v for k, v in given.items() if v is not None and v is not False})
    result = run_export(checkpoint, config)
    emit(result.rows(), f"export {checkpoint.name} -> {Path(result.out).name}", as_json, payload=result.to_dict())
