"""Checks made before any work starts, so that a user error costs one line and no compute: the device string, the
paths a command will write, and input files read at the boundary."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import ConfigError

DEVICE_HINT = "use auto, cpu, cuda or cuda:N"


def check_device(device: str | None) -> str | None:
    """`device` if it names a device this machine has (None and "auto" pass); ConfigError otherwise."""
    if device is None or device == "auto":
        return device
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device)
    if m is None or (m[1] == "cpu" and m[2] is not None):
        raise ConfigError(f"unknown --device {device!r}; {DEVICE_HINT}")
    if m[1] == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu")
        if m[2] is not None and int(m[2]) >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                              "use cuda:0 to cuda:N-1")
    return device


def check_output(path: str | Path, inputs: Iterable[str | Path | None] = (), *, directory: bool = False,
                 option: str = "--out") -> Path:
    """Refuse an output path that cannot be written before any work starts: an existing directory where a file
    goes (or a file where a directory goes), a parent that is a file, no write permission, or the same file as
    one of `inputs` (by resolved path or inode). Returns the path."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file; pass a directory")
    if not directory and path.is_dir():
        raise ConfigError(f"{option} {path} is a directory; pass a file path")
    existing = path if directory and path.is_dir() else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option} {path}: {existing} is a file, not a directory; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: cannot write in {existing} (permission denied or read-only); "
                          "choose another path")
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        if path.resolve() == Path(given).resolve() or (path.exists() and os.path.samefile(path, given)):
            raise ConfigError(f"{option} {path} is the input {given}; writing it would destroy the input, "
                              "choose another path")
    return path


def read_onnx(path: str | Path):
    """The ModelProto of an ONNX file (external data not loaded); ConfigError for a corrupt or foreign file."""
    import onnx  # lazy: onnx is heavy and only ONNX artefacts need it

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError and friends: whatever it is, it is no model we can read
        model = None
    if model is None or not model.graph.node or not model.graph.input:
        raise ConfigError(f"{path} is not a readable ONNX model (corrupt, truncated or another format); "
                          "export one with `kdexport export`")
    return model
