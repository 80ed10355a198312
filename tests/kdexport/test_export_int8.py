"""INT8 you can trust: the accuracy gate on validation, the calibration search and its sensitivity pass, the
runtime named beside every INT8 accuracy, and OpenVINO IR export.

The fragile model is the trained LeNet-5 fixture with one conv1 channel scaled up 1000x and conv2's weights on
that channel scaled down as much: the same function in fp32 (ReLU and max-pooling commute with a positive
scale), but conv2's int8 input is dominated by the outlier channel and the others round to zero.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from kdexport import cli
from kdexport.checkpoint import load_model, save_checkpoint
from kdexport.errors import ConfigError
from kdexport.export import ExportConfig, calibrate, export, int8_stage, onnx_metadata, openvino_ir

runner = CliRunner()
CRUSHED = "/features/features.3/Conv"  # conv2: the node whose int8 input loses every channel but the outlier


def invoke(*args):
    return runner.invoke(cli.app, ["export", *map(str, args)])


@pytest.fixture(scope="module")
def fragile_ckpt(teacher_ckpt, tmp_path_factory):
    model, spec = load_model(teacher_ckpt)
    with torch.no_grad():
        conv1, conv2 = model.features[0], model.features[3]
        conv1.weight[0] *= 1000
        conv1.bias[0] *= 1000
        conv2.weight[:, 0] /= 1000
    path = tmp_path_factory.mktemp("fragile") / "fragile.pt"
    save_checkpoint(path, model.state_dict(), spec)
    return path


@pytest.mark.openvino
def test_int8_gate_refuses_a_drop_and_writes_nothing(tmp_path, fragile_ckpt, monkeypatch):
    monkeypatch.setattr(calibrate, "EXCLUDE_STEPS", ())  # no fp32 nodes allowed: the drop stays
    out = tmp_path / "old.onnx"
    out.write_bytes(b"previous export")
    result = invoke(fragile_ckpt, "--int8", "--calib-method", "minmax", "--calib", 32, "--out", out)
    assert result.exit_code == 1, result.output
    assert "nothing was written" in result.output and "more than --max-drop 1" in result.output
    assert "validation images under openvino-cpu" in result.output and "Traceback" not in result.output
    assert f"layers that cost most (lowest SQNR of the noise they add): {CRUSHED}" in result.output
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.onnx"]  # no temporary files left
    # --allow-drop writes it, and says so
    res = export(fragile_ckpt, ExportConfig(int8=True, calib_method="minmax", calib=32, allow_drop=True, out=out))
    assert res.accuracy_delta < -1 and any("written anyway because of --allow-drop" in n and CRUSHED in n
                                           for n in res.notes)
    assert onnx_metadata(out)["precision"] == "int8"


@pytest.mark.openvino
def test_sensitivity_keeps_the_damaging_node_in_fp32(tmp_path, fragile_ckpt):
    out = tmp_path / "f.onnx"
    res = export(fragile_ckpt, ExportConfig(int8=True, calib_method="minmax", calib=32, out=out))
    cal = res.calibration
    assert cal["most_damaged"][0]["node"] == CRUSHED
    assert cal["fp32_nodes"] == [CRUSHED] and cal["calibration_runs"] == 1
    first, chosen = cal["trials"]
    assert first["fp32_nodes"] == [] and first["accuracy"] < res.accuracy_fp32 - 20  # crushed without it
    assert res.accuracy_delta >= -1.0 and chosen["accuracy"] == res.accuracy_int8
    model = onnx.load(str(out))
    conv2 = next(n for n in model.graph.node if n.name == CRUSHED)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert "DequantizeLinear" not in {producers.get(i) for i in conv2.input}  # really left in fp32
    meta = onnx_metadata(out)
    quant = json.loads(meta["quantization"])
    assert quant["fp32_nodes"] == [CRUSHED] and quant["calibration"] == "MinMax" and quant["per_channel_weights"]
    assert meta["accuracy_top1_int8_runtime"] == "openvino-cpu" and meta["eval_split"] == "val"
    assert json.loads(meta["calibration_search"])["trials"][1]["fp32_nodes"] == [CRUSHED]


@pytest.mark.openvino
def test_auto_search_is_within_its_budget_and_uses_the_right_splits(tmp_path, teacher_ckpt, monkeypatch):
    seen = []
    original = int8_stage.eval_images
    monkeypatch.setattr(int8_stage, "eval_images", lambda ds, split, *a, **k: seen.append(split) or
                        original(ds, split, *a, **k))
    res = export(teacher_ckpt, ExportConfig(int8=True, calib=32, out=tmp_path / "a.onnx"))
    assert seen == ["train", "val", "test"]  # calibrate on train, choose and gate on val, test once at the end
    cal = res.calibration
    assert 1 <= cal["calibration_runs"] <= 3 and len(cal["trials"]) <= 3 + len(calibrate.EXCLUDE_STEPS)
    assert "3 calibration run(s) (MinMax, Entropy, Percentile)" in cal["budget"]
    best = max(t["accuracy"] for t in cal["trials"])
    assert res.accuracy_int8 == best and res.int8_runtime == "openvino-cpu"
    assert set(res.int8_accuracies) == {"openvino-cpu", "onnxruntime-cpu"} and "trust openvino-cpu" in res.trust
    assert res.test_images == 360 and res.test_accuracy_int8 is not None


def test_runtime_named_per_recipe(tmp_path, teacher_ckpt, monkeypatch):
    cpu = export(teacher_ckpt, ExportConfig(int8=True, int8_target="cpu", calib=32, calib_method="minmax",
                                            eval_limit=64, out=tmp_path / "c.onnx"))
    assert cpu.int8_runtime == "onnxruntime-cpu" and set(cpu.int8_accuracies) == {"onnxruntime-cpu"}
    assert cpu.trust is None and cpu.eval_images == 64
    monkeypatch.setattr(openvino_ir, "missing", lambda device="CPU": "no openvino")
    trt = export(teacher_ckpt, ExportConfig(int8=True, calib=32, calib_method="minmax", eval_limit=64,
                                            out=tmp_path / "t.onnx"))
    assert trt.int8_runtime == "onnxruntime-cpu" and int8_stage.NO_OPENVINO in trt.notes


@pytest.mark.parametrize("kwargs,needle", [
    (dict(max_drop=2.0), "--max-drop is an int8 option"),
    (dict(allow_drop=True), "--allow-drop is an int8 option"),
    (dict(calib_method="minmax"), "--calib-method is an int8 option"),
    (dict(int8=True, calib_method="kl"), "--calib-method must be one of auto, minmax"),
    (dict(int8=True, max_drop=-1.0), "--max-drop is in accuracy points"),
    (dict(format="openvino", half=True), "--half is not accepted by --format openvino"),
    (dict(format="openvino", out="m.onnx"), "--out must end in .xml"),
])
def test_config_refuses(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        ExportConfig(**kwargs)


# ------------------------------------------------------------------------------------------- OpenVINO IR
@pytest.mark.openvino
def test_openvino_ir_export_with_parity(tmp_path, teacher_ckpt):
    out = tmp_path / "m.xml"
    result = invoke(teacher_ckpt, "--format", "openvino", "--dynamic", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    ort_check, ov_check = res["parity"]
    assert ov_check["runtime"] == "openvino-cpu" and ov_check["passed"] and ov_check["tolerance"] is not None
    assert res["file_bytes"] == out.stat().st_size + out.with_suffix(".bin").stat().st_size
    run = openvino_ir.OpenVINORunner(out)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    model, _ = load_model(teacher_ckpt)
    with torch.no_grad():
        assert np.abs(run(x) - model(torch.from_numpy(x)).numpy()).max() < 1e-3  # fp32 weights, not fp16
    core_model = openvino_ir._core().read_model(str(out))
    assert core_model.get_rt_info(["kdexport", "precision"]).astype(str) == "fp32"


@pytest.mark.openvino
def test_openvino_int8_ir(tmp_path, teacher_ckpt):
    res = export(teacher_ckpt, ExportConfig("openvino", int8=True, calib=32, calib_method="minmax",
                                            out=tmp_path / "q.xml"))
    assert res.int8_runtime == "openvino-cpu" and res.parity[-1].precision == "int8"
    assert (tmp_path / "q.bin").stat().st_size < 0.5 * res.onnx_fp32_bytes  # int8 weights


def test_openvino_missing_is_refused_naming_the_extra(tmp_path, teacher_ckpt, monkeypatch):
    monkeypatch.setattr(openvino_ir.importlib.util, "find_spec", lambda name: None)
    result = invoke(teacher_ckpt, "--format", "openvino", "--out", tmp_path / "m.xml")
    assert result.exit_code == 2 and "pip install 'kdexport[openvino]'" in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.openvino
def test_failed_openvino_parity_leaves_no_files(tmp_path, teacher_ckpt, monkeypatch):
    monkeypatch.setattr(openvino_ir.OpenVINORunner, "__call__", lambda self, x: np.zeros((len(x), 10)))
    with pytest.raises(Exception, match="openvino-cpu fp32 disagrees with PyTorch, nothing was written"):
        export(teacher_ckpt, ExportConfig("openvino", out=tmp_path / "m.xml"))
    assert not list(tmp_path.iterdir())



@pytest.mark.openvino
def test_json_output_stays_clean_with_histogram_calibrators(tmp_path, teacher_ckpt):
    """ORT's Entropy and Percentile calibrators print progress; --json's stdout must still parse."""
    result = invoke(teacher_ckpt, "--int8", "--calib-method", "percentile", "--calib", 16, "--eval-limit", 32,
                    "--out", tmp_path / "p.onnx", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["calibration"]["method"] == "Percentile"
