"""benchmarks/bench_spmm.py: its refusal without a GPU and its markdown table (the timings need a GPU)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_spmm.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_spmm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without a CUDA GPU")
def test_exits_2_without_a_gpu():
    done = subprocess.run([sys.executable, str(SCRIPT), "--no-e2e"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "needs a CUDA GPU" and done.stdout == ""


def test_markdown_table_and_target_summary(bench):
    def row(layer, n, sparsity, speedup):
        return {"layer": layer, "out_features": 512, "in_features": 2048, "rows": n, "sparsity": sparsity,
                "speedup": speedup}

    rows = [row("resnet50 1x1", n, s, x) for n, s, x in [(1, 0.7, 1.5), (1, 0.9, 2.5), (32, 0.7, 0.8),
                                                            (32, 0.9, 1.1)]]
    rows.append(row("resnet18 fc head", 1, 0.9, 0.5))
    text = bench.markdown(rows, None)
    assert "| resnet50 1x1 | 512x2048 | 1 | 1.50x | 2.50x |" in text
    assert "| resnet50 1x1 | 512x2048 | 32 | 0.80x | 1.10x |" in text
    assert "- 90%, weight-heavy layers, N <= 16: median 2.50x, min 2.50x (target 2.1x)" in text  # head left out
    assert "80%" not in text.split("Speedup")[1]  # no 80% cells: no 80% target line


def test_arguments(bench):
    args = bench.parse_args(["--rows", "1", "16", "--sparsities", "0.9", "--shapes", "resnet50"])
    assert args.rows == [1, 16] and args.sparsities == [0.9] and args.dtype == "float16"
    assert [s for s in bench.SHAPES if any(f in s[0] for f in args.shapes)] == [
        ("resnet50 bottleneck 1x1 512->2048", 2048, 512), ("resnet50 bottleneck 1x1 2048->512", 512, 2048)]


def test_conv_table(bench):
    ms = {"dense": {"p50": 0.02}, "implicit": {"p50": 0.01}, "unfold": {"p50": 0.04}}
    row = {"layer": "resnet18 layer3 3x3 256", "size": 14, "batch": 1, "sparsity": 0.9, "ms": ms,
           "implicit_speedup": 2.0, "unfold_speedup": 0.5}
    assert bench.conv_markdown([row]).splitlines()[-1] == (
        "| resnet18 layer3 3x3 256 (14x14) | 1 | 90% | 20.0 | 10.0 (2.00x) | 40.0 (0.50x) |")
