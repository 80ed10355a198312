"""Checkpoints: a state_dict plus a JSON spec, written atomically and read with weights_only=True.

No module is ever pickled: the architecture is rebuilt from the spec (and, for slimmed models, from the
structure it records), then the weights are loaded into it.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import models
from .errors import CheckpointError
from .models import DistilledStudent
from .structure import apply_structure

FORMAT = "kdexport"
FORMAT_VERSION = 1
KINDS = ("model", "distilled")


def atomic_write(path: str | Path, write) -> None:
    """Call `write(tmp_path)`, then rename over `path`: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result gets the mode open() would give it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], spec: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> None:
    """Write {format, spec (as JSON text), state_dict[, extra tensors/plain data]} atomically."""
    spec = {"format": FORMAT, "format_version": FORMAT_VERSION, **spec}
    if spec.get("kind") not in KINDS:
        raise ValueError(f"spec kind must be one of {KINDS}, got {spec.get('kind')!r}")
    payload = {"format": FORMAT, "spec": json.dumps(spec), "state_dict": {k: v.detach().cpu() for k, v in
                                                                          state_dict.items()}}
    if extra:
        payload["extra"] = extra
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path, with_extra: bool = False):
    """Return (state_dict, spec), or (state_dict, spec, extra); CheckpointError for anything not ours."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass a checkpoint file (.pt) inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about a plain pickle's protocol before refusing it
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # only a disallowed GLOBAL means pickled objects; random bytes also fail inside the weights-only unpickler
        reason = ("it holds pickled objects, which are never loaded" if _pickled(path, exc)
                  else "it is truncated or corrupt")
        raise CheckpointError(f"cannot load {path}: {reason}; only kdexport checkpoints can be loaded") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("spec"), str):
        raise CheckpointError(f"{path} is not a kdexport checkpoint; create one with `kdexport train` or "
                              "`kdexport distill`")
    spec = check_spec(payload["spec"], path)
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} has no valid state_dict")
    if with_extra:
        return state, spec, payload.get("extra", {})
    return state, spec


SPEC_KEYS = {"kind": str, "num_classes": int, "stem": str, "input_size": list, "dataset": str}
KIND_KEYS = {"model": {"model": str}, "distilled": {"teacher": str, "student": str, "projector_factor": int}}


def check_spec(text: str, path: str | Path) -> dict[str, Any]:
    """The spec JSON of a checkpoint, validated (type, format_version, required keys and their types, model
    names) before anything uses it; CheckpointError naming what is wrong."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has a corrupt spec; retrain or restore it") from None
    if not isinstance(spec, dict):
        raise CheckpointError(f"{path} has a spec that is a JSON {type(spec).__name__}, not an object; retrain or "
                              "restore it")
    version = spec.get("format_version", 0)  # 0: written before versions were recorded
    if type(version) is not int:
        raise CheckpointError(f"{path} has format_version {version!r}, not an integer; retrain or restore it")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer kdexport (format {version}); upgrade")
    if spec.get("kind") not in KINDS:
        raise CheckpointError(f"{path} has spec kind {spec.get('kind')!r}, not one of {', '.join(KINDS)}")
    for key, typ in {**SPEC_KEYS, **KIND_KEYS[spec["kind"]]}.items():
        if type(spec.get(key)) is not typ:
            raise CheckpointError(f"{path}: its spec lacks {key} (a {typ.__name__}); retrain or restore it")
    for key in ("model", "teacher", "student"):
        if key in KIND_KEYS[spec["kind"]] and spec[key] not in models.list_models():
            raise CheckpointError(f"{path} names model {spec[key]!r}, which is not registered here (see "
                                  "`kdexport models`); it comes from another kdexport or was edited")
    return spec


def _pickled(path: Path, exc: Exception) -> bool:
    """Whether torch.load failed on pickled objects: a disallowed GLOBAL inside a torch file, or a plain pickle
    (protocol 2-5 header) that is no torch file at all. Random bytes also fail inside the weights-only unpickler."""
    with path.open("rb") as f:
        head = f.read(2)
    return "Unsupported global" in str(exc) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild the exact architecture a spec describes (no weights)."""
    common = dict(num_classes=spec["num_classes"], stem=spec["stem"], input_size=tuple(spec["input_size"]))
    if spec["kind"] == "distilled":
        model = DistilledStudent.from_names(spec["teacher"], spec["student"],
                                            projector_factor=spec["projector_factor"],
                                            projector_kernel=spec.get("projector_kernel", 3), **common)
    else:
        model = models.create_model(spec["model"], **common)
    if spec.get("structure"):
        apply_structure(model, spec["structure"])
    return model


def model_from(state: dict[str, torch.Tensor], spec: dict[str, Any], path: str | Path) -> nn.Module:
    """Rebuild the spec's architecture and load `state` into it; CheckpointError when they disagree."""
    try:
        model = build_model(spec)
        model.load_state_dict(state)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: its tensors do not match the architecture its spec (and structure spec) "
                              f"describes ({type(exc).__name__}); the file is damaged or was edited") from None
    return model


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a checkpoint's model, in eval mode."""
    state, spec = load_checkpoint(path)
    return model_from(state, spec, path).eval(), spec


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the floating-point weights and buffers holding NaN or inf."""
    return [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]


def model_spec(kind: str, *, num_classes: int, stem: str, input_size, dataset: str, mean, std, **fields) -> dict:
    """The spec fields every checkpoint carries."""
    return {"kind": kind, "num_classes": num_classes, "stem": stem, "input_size": list(input_size),
            "dataset": dataset, "mean": list(mean), "std": list(std), **fields}
