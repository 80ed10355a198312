"""The machine a timing was taken on: CPU, cores, threads, GPU and driver, versions, Jetson power state.

CUDA is only touched when device == "cuda", so profiling on CPU never creates a CUDA context.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

_DISTRIBUTIONS = {  # reported name -> distributions that provide it, first found wins
    "torch": ("torch",), "torchvision": ("torchvision",), "numpy": ("numpy",), "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"),
    "triton": ("triton", "pytorch-triton"), "openvino": ("openvino",), "polygraphy": ("polygraphy",),
}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _run(*cmd: str) -> str | None:
    """stdout of a diagnostic command, or None when it is absent, fails or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def _cpu() -> dict[str, Any]:
    info = _read("/proc/cpuinfo") or ""
    blocks = [dict(re.findall(r"^([^:\n]+?)\s*:\s*(.*)$", block, flags=re.M)) for block in info.split("\n\n")]
    model = next((b["model name"] for b in blocks if "model name" in b), None)
    cores = {(b["physical id"], b["core id"]) for b in blocks if "physical id" in b and "core id" in b}
    logical = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = logical
    board = _read("/sys/firmware/devicetree/base/model")
    return {"cpu_model": model or platform.processor() or platform.machine(),
            "physical_cores": len(cores) or sum("processor" in b for b in blocks) or None,
            "logical_cores": logical, "usable_cores": usable, "machine": platform.machine(),
            "os": platform.platform(), "python": platform.python_version(),
            "board": board.strip("\x00\n ") if board else None}


@functools.lru_cache(maxsize=4)
def _gpu(index: int) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"gpu": None, "gpu_driver": None, "cuda_runtime": torch.version.cuda}
    props = torch.cuda.get_device_properties(index)
    driver = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={index}")
    if driver is None:  # Jetson has no nvidia-smi in older releases; the kernel module states its version
        found = re.search(r"Kernel Module\s+(\S+)", _read("/proc/driver/nvidia/version") or "")
        driver = found.group(1) if found else None
    return {"gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_memory_mb": round(props.total_memory / 2 ** 20), "gpu_driver": driver and driver.strip(),
            "cuda_runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def _jetson() -> tuple[dict[str, Any] | None, list[str]]:
    """Power mode and whether clocks are locked (timings drift by 2x or more with DVFS), on Jetson only."""
    if not (Path("/etc/nv_tegra_release").exists() or Path("/etc/nvpmodel.conf").exists()):
        return None, []
    warnings = []
    mode = None
    query = _run("nvpmodel", "-q")
    if query and (found := re.search(r"NV Power Mode:\s*(.+)", query)):
        mode = found.group(1).strip()
    else:
        conf = _read("/etc/nvpmodel.conf") or ""
        status = re.search(r"pmode:(\d+)", _read("/var/lib/nvpmodel/status") or "")
        default = re.search(r"PM_CONFIG\s+DEFAULT=(\d+)", conf)
        mode_id = (status or default).group(1) if (status or default) else None
        names = dict(re.findall(r"POWER_MODEL\s+ID=(\d+)\s+NAME=(\S+?)\s*>", conf))
        mode = names.get(str(int(mode_id)), mode_id) if mode_id else None
    shown = _run("jetson_clocks", "--show")
    freqs = re.findall(r"^(?:cpu\d+|GPU).*?MinFreq=(\d+) MaxFreq=(\d+)", shown or "", flags=re.M)
    locked = all(lo == hi for lo, hi in freqs) if freqs else None
    if locked is None:
        warnings.append("could not check whether the Jetson clocks are locked (`jetson_clocks --show` needs "
                        "root): run `sudo jetson_clocks` before profiling for stable timings")
    elif not locked:
        warnings.append("Jetson clocks are not locked, timings will vary: run `sudo jetson_clocks` first")
    return {"power_mode": mode, "clocks_locked": locked}, warnings


def environment(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """What a timing needs beside it to be compared: JSON-serialisable, with `warnings` (list of str)."""
    env: dict[str, Any] = dict(_cpu())
    env["threads"] = threads if threads is not None else torch.get_num_threads()
    env["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    env["versions"] = {name: _version(dists) for name, dists in _DISTRIBUTIONS.items()}
    env["device"] = device
    if device == "cuda":
        env.update(_gpu(torch.cuda.current_device() if torch.cuda.is_available() else 0))
    env["jetson"], env["warnings"] = _jetson()
    return env
