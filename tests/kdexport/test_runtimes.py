"""OpenVINO as a profiling backend (on this CPU), and the CPU side of the TensorRT adapter over Polygraphy:
refusals, option checks and the ONNX it is handed. Engine builds need a GPU (tests/kdexport/test_export.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from kdexport import cli
from kdexport.errors import ConfigError
from kdexport.export import ExportConfig, ParityError, TensorRTUnavailable, export, openvino_ir, tensorrt_engine
from kdexport.export.onnx_io import OrtRunner
from kdexport.profile import ProfileConfig, available_backends, profile
from kdexport.profile import backends as profile_backends

runner = CliRunner()
FAST = dict(warmup=1, iters=5, threads=1)


# ------------------------------------------------------------------------------------------- OpenVINO
@pytest.mark.openvino
def test_profile_openvino_on_cpu(teacher_ckpt):
    result = runner.invoke(cli.app, ["profile", str(teacher_ckpt), "--backend", "openvino", "--ov-device", "CPU",
                                     "--batch", "1,4", "--warmup", "1", "--iters", "5", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["backend"] == "openvino" and r["device"] == "cpu" and r["threads"] == 1
    assert [b["batch"] for b in r["results"]] == [1, 4]
    assert all(0 < b["p50_ms"] <= b["p90_ms"] <= b["p99_ms"] for b in r["results"])
    env = r["environment"]
    assert env["versions"]["openvino"] and env["openvino_device"].startswith("CPU: ")


@pytest.mark.openvino
def test_profile_openvino_ir_with_a_fixed_batch(tmp_path, teacher_ckpt):
    xml = tmp_path / "m.xml"
    export(teacher_ckpt, ExportConfig("openvino", batch=2, out=xml))
    r = profile(xml, ProfileConfig("openvino", batch_sizes=(1, 2), **FAST))
    assert r.artifact_kind == "openvino" and [b.batch for b in r.results] == [2]
    assert any("batch 1 skipped" in n for n in r.notes)
    assert r.artifact_bytes == xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


# Two runners made one after the other and released first-made-first, as garbage collection may, then a
# signal with a Python handler. Each OpenVINO Core used to swap in an alternate signal stack of its own and
# unmap it when released: with a Core per call (openvino_ir._core without its cache) this script dies with
# SIGSEGV on OpenVINO 2026.4, as the test suite itself did at a subprocess's SIGCHLD.
_SIGNAL_AFTER_RUNNERS = """
import os, signal
from onnx import TensorProto, helper
from kdexport.export import openvino_ir
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
first, second = openvino_ir.compile_model(model), openvino_ir.compile_model(model)
del first
del second
signal.signal(signal.SIGUSR1, lambda *_: print("handled"))
os.kill(os.getpid(), signal.SIGUSR1)
"""


@pytest.mark.openvino
def test_openvino_leaves_signal_handlers_working():
    run = subprocess.run([sys.executable, "-c", _SIGNAL_AFTER_RUNNERS], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "handled", (run.returncode, run.stderr[-2000:])


@pytest.mark.openvino
def test_openvino_refusals(teacher_ckpt, monkeypatch):
    class Core:
        available_devices = ["CPU"]

    monkeypatch.setattr(openvino_ir, "_core", lambda: Core())
    result = runner.invoke(cli.app, ["profile", str(teacher_ckpt), "--backend", "openvino", "--ov-device", "NPU"])
    assert result.exit_code == 2 and "OpenVINO sees no NPU device here (available: CPU)" in result.output
    assert "kdexport[openvino]" in result.output and "--ov-device CPU" in result.output
    monkeypatch.setattr(profile_backends, "_installed", lambda name: name != "openvino")
    assert "pip install 'kdexport[openvino]'" in available_backends()["openvino"]
    result = runner.invoke(cli.app, ["profile", str(teacher_ckpt), "--backend", "openvino"])
    assert result.exit_code == 2 and "pip install 'kdexport[openvino]'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("kwargs,needle", [
    (dict(backend="openvino", device="cuda"), "picks its device with --ov-device"),
    (dict(backend="ort-cpu", ov_device="CPU"), "pass it with --backend openvino"),
    (dict(backend="openvino", ov_device="TPU"), "--ov-device must be one of CPU, GPU, NPU"),
])
def test_profile_config_refuses(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        ProfileConfig(**kwargs)


# -------------------------------------------------------------------------------- TensorRT (CPU side)
def test_config_options_state_what_polygraphy_gets():
    fp32 = tensorrt_engine.config_options(input_size=(3, 32, 32), batch=8, dynamic=True, half=False, int8=False,
                                          workspace_mb=512)
    assert fp32 == {"tf32": False, "fp16": False, "int8": False, "workspace_bytes": 512 << 20,
                    "profile": ((1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))}
    half = tensorrt_engine.config_options(input_size=(3, 32, 32), batch=20, dynamic=True, half=True, int8=True,
                                          workspace_mb=1)
    assert half["fp16"] and half["int8"] and half["profile"][2] == (40, 3, 32, 32)
    assert tensorrt_engine.config_options(input_size=(3, 8, 8), batch=4, dynamic=False, half=False, int8=False,
                                          workspace_mb=64)["profile"] is None


def test_tensorrt_refusal_names_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(tensorrt_engine.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tensorrt_engine, "_found", lambda m: m == "tensorrt")
    assert tensorrt_engine.missing() == ["the polygraphy package"]
    with pytest.raises(TensorRTUnavailable, match="missing here: the polygraphy package.*kdexport\\[tensorrt\\]"):
        tensorrt_engine.require()
    monkeypatch.setattr(profile_backends, "cuda_reason", lambda: None)
    monkeypatch.setattr(profile_backends, "_installed", lambda m: m == "tensorrt")
    assert "missing here: the polygraphy package" in available_backends()["tensorrt"]


class FakeEngine:
    """Stands in for the GPU: the 'engine' is the ONNX model it was built from, run by ONNX Runtime."""

    runtime = "tensorrt"
    built: list = []

    def __init__(self, plan: bytes):
        self.run = OrtRunner(plan)

    def __call__(self, x):
        return self.run(x)


@pytest.fixture
def fake_gpu(monkeypatch):
    FakeEngine.built = []

    def build(onnx_model: bytes, **options):
        FakeEngine.built.append((onnx_model, options))
        return onnx_model, 0.1

    monkeypatch.setattr(tensorrt_engine, "require", lambda: None)
    monkeypatch.setattr(tensorrt_engine, "build_engine", build)
    monkeypatch.setattr(tensorrt_engine, "EngineRunner", FakeEngine)
    return FakeEngine


def test_tensorrt_is_handed_the_verified_onnx(tmp_path, teacher_ckpt, fake_gpu):
    res = export(teacher_ckpt, ExportConfig("trt", dynamic=True, batch=4, half=True, workspace=256,
                                            out=tmp_path / "m.engine"))
    (model, options), = fake_gpu.built
    assert options == dict(input_size=(3, 32, 32), batch=4, dynamic=True, half=True, int8=False, workspace_mb=256)
    meta = {p.key: p.value for p in onnx.load_from_string(model).metadata_props}
    assert meta["precision"] == "fp32" and meta["batch"] == "dynamic"  # the checked fp32 ONNX, metadata and all
    assert [p.runtime for p in res.parity] == ["onnxruntime-cpu", "tensorrt"] and res.precision == "fp16"
    assert (tmp_path / "m.engine").read_bytes() == model


@pytest.mark.openvino
def test_tensorrt_int8_gets_the_chosen_qdq_model_and_gates_on_the_engine(tmp_path, teacher_ckpt, fake_gpu):
    res = export(teacher_ckpt, ExportConfig("trt", int8=True, calib=32, calib_method="minmax",
                                            out=tmp_path / "q.engine"))
    (model, options), = fake_gpu.built
    ops = {n.op_type for n in onnx.load_from_string(model).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and options["int8"]
    assert res.int8_runtime == "tensorrt" and "tensorrt" in res.int8_accuracies
    assert res.int8_accuracies["openvino-cpu"] is not None  # the stand-in that chose the calibration


def test_tensorrt_parity_failure_prints_polygraphy_layerwise(tmp_path, teacher_ckpt, fake_gpu, monkeypatch):
    monkeypatch.setattr(FakeEngine, "__call__", lambda self, x: np.zeros((len(x), 10), np.float32))
    seen = []
    monkeypatch.setattr(tensorrt_engine, "layerwise", lambda onnx_model, images, options, atol: seen.append(
        (options, atol)) or "first tensors that differ (Polygraphy, atol 0.002): /features/features.0/Conv")
    with pytest.raises(ParityError, match="tensorrt fp32 disagrees.*first tensors that differ.*features.0/Conv"):
        export(teacher_ckpt, ExportConfig("trt", out=tmp_path / "m.engine"))
    assert seen and seen[0][1] == 2e-3 and not (tmp_path / "m.engine").exists()
