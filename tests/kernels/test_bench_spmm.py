"""benchmarks/bench_spmm.py: its refusal without a GPU, its arguments, and its tables (the timings need a GPU;
benchmarks/gpu_check.sh --dry-run runs it end to end on CPU, tests/test_gpu_check.py)."""

import importlib.util
import json
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


@pytest.fixture(scope="module")
def tables(bench):
    return sys.modules["spmm_tables"]  # bench_spmm imports it from benchmarks/


def cell(method, n, sparsity, speedup=None, layer="resnet50 1x1", dtype="float16", **extra):
    ms = None if speedup is None else {"p50": 0.01 / speedup, "p90": 0.012 / speedup}
    return {"dtype": dtype, "layer": layer, "out_features": 512, "in_features": 2048, "rows": n,
            "sparsity": sparsity, "method": method, "ms": ms, "speedup": speedup, **extra}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without a CUDA GPU")
def test_exits_2_without_a_gpu():
    done = subprocess.run([sys.executable, str(SCRIPT), "--no-e2e"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "needs a CUDA GPU" and done.stdout == ""


def test_speedup_table_and_target_summary(tables):
    rows = [cell("dense", n, None, 1.0) for n in (1, 32)]
    rows += [cell("ours-bitmap", n, s, x) for n, s, x in [(1, 0.7, 1.5), (1, 0.9, 2.5), (32, 0.7, 0.8),
                                                            (32, 0.9, 1.1)]]
    rows += [cell("semi24", 1, 0.5, 1.2), cell("semi24", 32, 0.5, error="RuntimeError: too small")]
    rows += [cell("dense", 1, None, 1.0, layer="resnet18 fc head"),
             cell("ours-bitmap", 1, 0.9, 0.5, layer="resnet18 fc head")]
    text = tables.speedup_table(rows, "float16", "ours-bitmap")
    assert "| resnet50 1x1 | 512x2048 | 1 | 10.0/12.0 | 1.50x | 2.50x | 1.20x |" in text
    assert "| resnet50 1x1 | 512x2048 | 32 | 10.0/12.0 | 0.80x | 1.10x | n/a |" in text
    # the head is left out of the target line; N = 32 > 16 too
    assert "- 90%, weight-heavy layers, N <= 16: median 2.50x, min 2.50x, 1/1 cells at or above the 2.1x target" in text
    assert "80%" not in text.split("\n- ")[0].splitlines()[2]  # no 80% cells: no 80% column, no 80% target line
    assert "target" not in tables.speedup_table(rows, "bfloat16", "ours-bitmap")  # no bf16 cells: no lines


def test_baseline_table_failures_and_wrong_cells(tables):
    rows = [cell("dense", 1, None, 1.0), cell("ours-bitmap", 1, 0.9, 2.0), cell("ours-index", 1, 0.9, 1.6),
            cell("csr", 1, 0.9, error="NotImplementedError: not for Half"),
            cell("bsr", 1, 0.9, 0.5, wrong=True, rel_err=0.3)]
    text = tables.baseline_table(rows, "float16")
    assert "| ours (bitmap) | ours (index) | torch CSR | torch BSR |" in text
    assert text.splitlines()[-1] == ("| resnet50 1x1 | 1 | 90% | 10.0/12.0 | 5.0/6.0 (2.00x) | 6.2/7.5 (1.60x) | n/a "
                                     "| WRONG |")
    listed = tables.failures(rows).splitlines()
    assert listed == ["- torch CSR, float16: not run in 1 cells: NotImplementedError: not for Half",
                      "- WRONG: torch BSR, float16, resnet50 1x1 N=1 at 90%: relative error 3.00e-01"]


def test_render_marks_a_partial_run(tables):
    partial = {"command": "python benchmarks/bench_spmm.py --out x.json", "timer": "do_bench",
               "layers": [cell("dense", 1, None, 1.0), cell("ours-index", 1, 0.9, 2.0)], "convs": [], "e2e": None,
               "complete": False}
    text = tables.render(partial)
    assert "float16, ours (index)" in text and "ours (bitmap)" not in text
    assert "Incomplete" in text
    assert "Incomplete" not in tables.render({**partial, "complete": True})


def test_render_from_a_json_file(bench, tmp_path, capsys):
    path = tmp_path / "spmm.json"
    path.write_text(json.dumps({"layers": [cell("dense", 1, None, 1.0), cell("ours-bitmap", 1, 0.7, 1.5)],
                                "convs": [], "complete": True}))
    assert bench.main(["--render", str(path)]) == 0
    assert "| resnet50 1x1 | 512x2048 | 1 | 10.0/12.0 | 1.50x |  |" in capsys.readouterr().out


def test_arguments(bench):
    args = bench.parse_args(["--rows", "1", "16", "--sparsities", "0.9", "--shapes", "resnet50"])
    assert args.rows == [1, 16] and args.sparsities == [0.9] and args.dtypes == ["float16"]
    assert args.encodings == ["bitmap", "index"] and args.baselines == ["csr", "bsr", "semi24"]
    assert args.conv_sparsities == [0.9]  # follows --sparsities unless given
    assert [s for s in bench.SHAPES if any(f in s[0] for f in args.shapes)] == [
        ("resnet50 bottleneck 1x1 512->2048", 2048, 512), ("resnet50 bottleneck 1x1 2048->512", 512, 2048)]
    assert bench.parse_args(["--baselines"]).baselines == []
    dry = bench.parse_args(["--dry-run", "--rows", "64"])
    assert dry.no_e2e and dry.rows == bench.DRY["rows"] and "bfloat16" not in dry.dtypes  # interpreter: no bf16


def test_two_four_keeps_the_two_largest_of_every_four(bench):
    w = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.5, 0.1, -0.2, 0.25]])
    assert bench.two_four(w).tolist() == [[0.0, -4.0, 3.0, 0.0, 0.5, 0.0, 0.0, 0.25]]


def test_a_method_that_raises_is_a_cell_not_a_crash(bench):
    timer = bench.Timer("cpu", 0, 0)
    x = torch.ones(2, 2)

    def broken():
        raise NotImplementedError("no kernel for this\nsecond line")

    failed = bench.measure({}, broken, x, timer, {"p50": 1.0}, 1e-2)
    assert failed == {"error": "NotImplementedError: no kernel for this"}
    wrong = bench.measure({}, lambda: x * 2, x, timer, {"p50": 1.0}, 1e-2)
    assert wrong["wrong"] and wrong["rel_err"] == pytest.approx(1.0) and wrong["speedup"] > 0


def test_conv_table(tables):
    ms = {"dense": {"p50": 0.02, "p90": 0.03}, "implicit": {"p50": 0.01, "p90": 0.011}}
    row = {"layer": "resnet18 layer3 3x3 256", "dtype": "bfloat16", "size": 14, "batch": 1, "sparsity": 0.9,
           "ms": ms, "implicit_speedup": 2.0, "errors": {"unfold": "RuntimeError: out of memory"}, "wrong": []}
    lines = tables.conv_markdown([row]).splitlines()
    assert lines[-2] == ("| resnet18 layer3 3x3 256 (14x14) | bfloat16 | 1 | 90% | 20.0/30.0 | 10.0/11.0 (2.00x) "
                         "| n/a |")
    assert lines[-1] == "- not run in 1 cells: unfold: RuntimeError: out of memory"
