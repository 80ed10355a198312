"""The command line through typer's CliRunner: listings, train -> distill -> evaluate, bad input, import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from kdexport import models
from kdexport.cli import app
from kdexport.distill import build_projector

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def n_params(name: str, num_classes: int = 10) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in models.create_model(name, num_classes).parameters())


def assert_usage_error(result, *fragments: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_models_json():
    result = run("models", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == models.list_models()


def test_pairs_json():
    result = run("pairs", "--json", "--num-classes", "10")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == list(models.PAIRS)
    assert all(set(r) == {"name", "teacher", "student", "teacher_params", "student_params"} for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert by_name["dens169-mobilenet"]["student_params"] == 4_231_976 - 990 * 1025 == n_params("mobilenet")
    assert by_name["res101-res18"]["teacher_params"] == n_params("resnet101")
    assert all(r["teacher_params"] > r["student_params"] for r in rows)


def test_train_writes_a_checkpoint(tmp_path):
    out = tmp_path / "lenet5.pt"
    result = run("train", "--model", "lenet5", "--epochs", "1", "--batch-size", "32", "--out", out,
                 "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)[0]
    assert row["checkpoint"] == str(out) and 0 <= row["top1"] <= row["top5"] <= 100
    assert 0 <= row["val_top1"] <= 100 and row["best_epoch"] == 1
    assert out.is_file() and out.with_name("lenet5.log.jsonl").is_file()
    assert not out.with_name("lenet5.state.pt").exists()


@pytest.mark.parametrize("method", ["simkd", "kd"])
def test_distill_then_evaluate(teacher_ckpt, tmp_path, method):
    out = tmp_path / "student.pt"
    result = run("distill", "--pair", "lenet5:lenet300_100", "--teacher", teacher_ckpt, "--method", method,
                 "--out", out, "--epochs", "1", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert out.is_file() and json.loads(result.stdout)[0]["checkpoint"] == str(out)

    result = run("evaluate", out, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["model"] == "lenet5:lenet300_100" and row["dataset"] == "digits"
    assert 0 <= row["top1"] <= row["top5"] <= 100
    backbone = 3 * 32 * 32 * 300 + 300 + 300 * 100 + 100
    if method == "simkd":  # deployed = backbone + projector + the teacher's classifier
        head = 120 * 84 + 84 + 84 * 10 + 10
        projector = sum(p.numel() for p in build_projector(100, 120, 2, kernel=1).parameters())  # 1x1 maps
        assert row["kind"] == "distilled" and row["student_params"] == backbone
        assert row["deployed_params"] == backbone + projector + head > row["student_params"]
    else:  # vanilla KD ships the student alone, with its own classifier
        assert row["kind"] == "model" and row["student_params"] == row["deployed_params"] == backbone + 1010


def test_unknown_pair(teacher_ckpt, tmp_path):
    result = run("distill", "--pair", "res101-res17", "--teacher", teacher_ckpt, "--out", tmp_path / "s.pt")
    assert_usage_error(result, "unknown pair 'res101-res17'", "TEACHER:STUDENT")
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint(tmp_path):
    assert_usage_error(run("evaluate", tmp_path / "missing.pt"), "checkpoint not found")
    result = run("distill", "--pair", "lenet5:lenet300_100", "--teacher", tmp_path / "missing.pt")
    assert_usage_error(result, "not found")


def test_pickled_checkpoint(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save(nn.Linear(2, 2), path)
    assert_usage_error(run("evaluate", path), "pickled objects")


def test_unknown_recipe(tmp_path):
    result = run("train", "--model", "lenet5", "--recipe", "adam", "--out", tmp_path / "m.pt")
    assert result.exit_code == 2 and "adam" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("args, fragments", [
    (["--model", "resnet19"], ["unknown model 'resnet19'", "lenet5"]),
    (["--model", "lenet5", "--dataset", "cifar10"], ["--data-dir"]),
    (["--model", "lenet5", "--lr", "0"], ["--lr must be > 0"]),
    (["--model", "lenet5", "--epochs", "-1"], ["--epochs must be >= 0"]),
    (["--model", "lenet5", "--val-fraction", "1.5"], ["--val-fraction must be a fraction in (0, 1)"]),
])
def test_train_bad_input(tmp_path, args, fragments):
    assert_usage_error(run("train", *args, "--out", tmp_path / "m.pt", "--device", "cpu"), *fragments)
    assert not (tmp_path / "m.pt").exists()


HYGIENE = """
import json, sys
FORBIDDEN = ("triton", "tensorrt", "onnxruntime")
def loaded():
    return sorted(m for m in FORBIDDEN if m in sys.modules)
import torch, torchvision  # torchvision itself imports torch._dynamo, which may import triton
baseline = loaded()
import kdexport, kdexport.errors, kdexport.cli, kdexport.kernels
import kdexport.models, kdexport.checkpoint, kdexport.data, kdexport.distill, kdexport.train
print(json.dumps({"baseline": baseline, "all": loaded(), "cuda_initialized": torch.cuda.is_initialized()}))
"""


def test_import_hygiene():
    """Importing the packages initialises no CUDA and imports neither triton, tensorrt nor onnxruntime."""
    proc = subprocess.run([sys.executable, "-c", HYGIENE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["all"] == report["baseline"]  # kdexport (cli, kernels, models) adds nothing beyond torchvision
    assert "tensorrt" not in report["all"] and "onnxruntime" not in report["all"]
    assert report["cuda_initialized"] is False
