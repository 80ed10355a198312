"""benchmarks/gpu_check.sh starts correctly before any GPU time is spent on it: its refusals, and its dry run
(install from a wheel folder into a scratch target, versions, bench_spmm on CPU in Triton's interpreter) writing
the OUTDIR the device tool brings back (at most 8 plain files). Steps 3 and 5 of the dry run (the interpreted
kernel suite, which CI runs anyway, and training a student) take minutes: their table code is tested here on
synthetic results instead. The `gpu_check_tools.py profile-table` renderer is tested on its own."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
OUT_FILES = {"summary.txt", "tables.md", "results.jsonl", "1-install.log", "2-versions.log", "3-kernel-tests.log",
             "4-bench.log", "5-profile.log"}


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(Path.home())}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


def probe_wheel(folder: Path) -> None:
    """A minimal valid pure-Python wheel, kdx_probe 0.1, and the requirements file gpu_wheels.sh writes."""
    folder.mkdir()
    info = "kdx_probe-0.1.dist-info"
    with zipfile.ZipFile(folder / "kdx_probe-0.1-py3-none-any.whl", "w") as whl:
        whl.writestr("kdx_probe/__init__.py", "VALUE = 7\n")
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: kdx-probe\nVersion: 0.1\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", f"kdx_probe/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    (folder / "requirements.txt").write_text("kdx-probe==0.1\n")


def test_refusals_are_one_line_exit_2_and_write_nothing(tmp_path):
    out = tmp_path / "out"
    for args, message in [((), "usage: benchmarks/gpu_check.sh OUTDIR"),
                          ((str(out), "--steps", "1,6", "--dry-run"), "--steps takes a comma list of 1-5"),
                          ((str(out), "--budget", "soon", "--dry-run"), "--budget takes whole seconds"),
                          ((str(out), "--fast"), "unknown option --fast")]:
        done = run(*args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_without_a_gpu_it_asks_for_the_dry_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would run for real")
    done = run(str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"no CUDA GPU is visible to {sys.executable}'s torch: run this on the GPU machine, or pass --dry-run"]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the dry run interprets the Triton kernel")
def test_dry_run_install_versions_and_bench(tmp_path):
    wheels, out = tmp_path / "whl", tmp_path / "out"
    probe_wheel(wheels)
    done = run(str(out), "--dry-run", "--steps", "1,2,4", "--wheels", str(wheels), timeout=240)
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stderr[-3000:]
    # what the device tool brings back: at most 8 plain files, plain names, nothing below OUTDIR
    assert {p.name for p in out.iterdir()} == OUT_FILES - {"3-kernel-tests.log", "5-profile.log"}  # steps not run
    assert all(p.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in out.iterdir())
    status = {tuple(line.split()[:2]): line.split(None, 4)[4] for line in summary.splitlines()[2:-1]}
    assert summary.startswith("gpu_check.sh: DRY RUN")
    assert status[("1", "wheels")].startswith("ok") and status[("1", "imports")].startswith("ok")
    assert status[("1", "project")].startswith(("ok", "skipped: this python cannot build"))
    assert status[("2", "versions")].startswith("ok")
    assert status[("4", "spmm-dry")].startswith("ok") and status[("4", "conv-dry")].startswith("ok")
    assert status[("3", "-")].startswith("not selected") and status[("5", "-")].startswith("not selected")
    assert summary.splitlines()[-1].endswith("0 parts failed, timed out or were cut")
    # the probe went into the scratch target, not into this environment
    install_log = (out / "1-install.log").read_text()
    assert "kdx_probe-0.1-py3-none-any.whl (0 KiB): fits this python" in install_log
    assert "Successfully installed kdx-probe-0.1" in install_log and "torch untouched" in install_log
    assert importlib.util.find_spec("kdx_probe") is None
    tables = (out / "tables.md").read_text()
    assert "\nMachine: " in tables and "DRY RUN on CPU" in tables
    assert "float16, ours (bitmap): speedup over dense cuBLAS" in tables and "3x3 convolutions" in tables
    assert "torch 2:4, float16: not run in" in tables  # a baseline that cannot run is a line, not a crash
    parts = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [p["part"] for p in parts] == ["bench-spmm-dry", "bench-conv-dry"]
    assert all(p["complete"] for p in parts)
    assert {c["method"] for c in parts[0]["layers"]} == {"dense", "ours-bitmap", "ours-index", "csr", "bsr", "semi24"}
    assert not any(c.get("wrong") for c in parts[0]["layers"])  # the interpreted kernel agrees with dense


def test_a_missing_wheel_folder_is_a_skip_and_a_spent_budget_cuts_parts(tmp_path):
    out = tmp_path / "out"
    done = run(str(out), "--dry-run", "--steps", "1", "--wheels", str(tmp_path / "none"), "--budget", "0")
    lines = (out / "summary.txt").read_text().splitlines()
    assert any(line.startswith("1     wheels") and line.endswith(f"skipped: no {tmp_path / 'none'}/requirements.txt: "
                                                                "run benchmarks/gpu_wheels.sh first") for line in lines)
    cut = "skipped: the time budget is spent"
    assert any(line.startswith("1     imports") and line.endswith(cut) for line in lines)
    cut_parts = sum(line.endswith(cut) for line in lines)  # "project" too where this python can build a wheel
    assert cut_parts >= 1 and done.returncode == 1
    assert lines[-1].endswith(f"{cut_parts} parts failed, timed out or were cut")


def profile_json(path: Path, **p50_by_batch: float) -> None:
    results = [{"batch": int(b[1:]), "p50_ms": v, "p90_ms": v * 1.1} for b, v in p50_by_batch.items()]
    path.write_text(json.dumps({"device": "cuda", "input_size": [3, 32, 32], "warmup": 20, "iters": 100,
                                "results": results}))


def test_profile_table_ratios(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check_tools", ROOT / "benchmarks" / "gpu_check_tools.py")
    tools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tools)
    profile_json(tmp_path / "profile-0.00-torch.json", b1=2.0, b32=4.0)
    profile_json(tmp_path / "profile-0.90-torch.json", b1=2.0, b32=4.0)
    profile_json(tmp_path / "profile-0.90-torch-sparse.json", b1=1.0, b32=5.0)
    (tmp_path / "profile-0.70-torch-sparse.json").write_text('{"device": "cu')  # cut short by its time limit
    text = tools.profile_table("resnet18", sorted(tmp_path.glob("*.json")))
    assert "| 90% | 1 | 2.000/2.200 | 1.000/1.100 | 2.00x | 2.00x |" in text
    assert "| 90% | 32 | 4.000/4.400 | 5.000/5.500 | 0.80x | 0.80x |" in text
    assert "| 0% | 1 | 2.000/2.200 | not run |  |  |" in text
    assert "latency does not depend on accuracy" in text and "not run (see 5-profile.log" not in text
    assert "70%" not in text  # the partial file is left out, not a crash
