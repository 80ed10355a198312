"""A run directory's manifest.json: the configuration and versions a run used, and the stages it finished."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import platform
import socket
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import write_json
from .errors import CheckpointError
from .lock import waiting_lock
from .vocab import MANIFEST_FILE


def versions() -> dict[str, str]:
    """The versions a manifest records; Torch-Pruning's from its package metadata (its __version__ lags)."""
    return {"kdexport": __version__, "torch": torch.__version__, "torch_pruning": version("torch-pruning"),
            "python": platform.python_version()}


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST_FILE
    if not path.is_file():
        return {"stages": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} is corrupt; delete it (stages are re-registered) or use another --out") from None


def record_stage(run_dir: Path, cfg: Any, name: str, info: dict[str, Any]) -> None:
    """Mark a stage done in manifest.json (rewritten atomically). `cfg` is the run's configuration (a dataclass).

    Stages that run side by side (kdexport.jobs, Ray tasks of a sweep) record one at a time: each reads the
    manifest, adds its stage and writes it back under a lock on the run directory.
    """
    with waiting_lock(run_dir):
        manifest = read_manifest(run_dir)
        manifest.update(config=dataclasses.asdict(cfg), versions=versions(), host=socket.gethostname())
        manifest["stages"][name] = {**info,
                                    "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        write_json(run_dir / MANIFEST_FILE, manifest)
