"""kdexport.checkpoint: round trips, atomic writes, and one clear error for anything that is not ours."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from kdexport import models
from kdexport.checkpoint import (
    FORMAT_VERSION,
    atomic_write,
    build_model,
    load_checkpoint,
    load_model,
    model_spec,
    save_checkpoint,
)
from kdexport.data import dataset_info
from kdexport.distill import DistilledStudent
from kdexport.errors import CheckpointError

INFO = dataset_info("digits")
COMMON = dict(num_classes=10, stem="imagenet", input_size=INFO.input_size, dataset="digits", mean=INFO.mean,
              std=INFO.std)


def plain_spec(name: str = "lenet5") -> dict:
    return model_spec("model", model=name, **COMMON)


def distilled_spec() -> dict:
    return model_spec("distilled", teacher="resnet18", student="lenet5", pair="resnet18:lenet5",
                      projector_factor=2, **COMMON)


def randomise_bn_(model: nn.Module) -> None:
    """Non-default running statistics, so that a load that skipped buffers would show."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


def test_round_trip_plain_model(tmp_path, digits_x):
    torch.manual_seed(0)
    model = models.create_model("lenet5").eval()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model.state_dict(), {**plain_spec(), "metrics": {"top1": 12.5}})
    loaded, spec = load_model(path)
    assert not loaded.training and spec["format_version"] == FORMAT_VERSION and spec["metrics"]["top1"] == 12.5
    with torch.inference_mode():
        torch.testing.assert_close(loaded(digits_x), model(digits_x), rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]  # no temporary file left behind


def test_round_trip_distilled_student(tmp_path, digits_x):
    torch.manual_seed(0)
    model = build_model(distilled_spec())
    assert isinstance(model, DistilledStudent)
    randomise_bn_(model)
    model.eval()
    path = tmp_path / "s.pt"
    save_checkpoint(path, model.state_dict(), distilled_spec())
    loaded, spec = load_model(path)
    assert isinstance(loaded, DistilledStudent) and spec["kind"] == "distilled"
    with torch.inference_mode():
        torch.testing.assert_close(loaded(digits_x), model(digits_x), rtol=0, atol=0)


def test_load_checkpoint_returns_extra(tmp_path):
    path = tmp_path / "state.pt"
    save_checkpoint(path, {"w": torch.ones(2)}, plain_spec(), extra={"epoch": 3, "rng": torch.get_rng_state()})
    state, spec, extra = load_checkpoint(path, with_extra=True)
    assert torch.equal(state["w"], torch.ones(2)) and extra["epoch"] == 3 and spec["model"] == "lenet5"


class Unserialisable:
    def __reduce__(self):
        raise RuntimeError("cannot serialise")


def test_failing_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, {"w": torch.zeros(3)}, plain_spec())
    with pytest.raises(RuntimeError, match="cannot serialise"):  # torch.save fails halfway through
        save_checkpoint(path, {"w": torch.ones(3)}, plain_spec(), extra={"bad": Unserialisable()})
    assert torch.equal(load_checkpoint(path)[0]["w"], torch.zeros(3))
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert torch.equal(load_checkpoint(path)[0]["w"], torch.zeros(3))
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


def test_save_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        save_checkpoint(tmp_path / "x.pt", {}, {"kind": "teacher"})
    assert not (tmp_path / "x.pt").exists()


class Payload:
    """A custom class: torch.save pickles it by reference."""

    def __init__(self):
        self.value = 1


@pytest.mark.parametrize("obj", [nn.Linear(2, 2), Payload()], ids=["module", "custom-class"])
def test_pickled_objects_are_refused(tmp_path, obj):
    path = tmp_path / "evil.pt"
    torch.save({"format": "kdexport", "spec": json.dumps(plain_spec()), "state_dict": {}, "model": obj}, path)
    with pytest.raises(CheckpointError, match="holds pickled objects"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="holds pickled objects"):
        load_model(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, models.create_model("lenet5").state_dict(), plain_spec())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_foreign_files(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save(models.create_model("lenet5").state_dict(), plain)
    with pytest.raises(CheckpointError, match="not a kdexport checkpoint"):
        load_checkpoint(plain)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_checkpoint(noise)
    assert "pickled" not in str(info.value)  # random bytes are not a pickled-object attack
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_newer_format_version(tmp_path):
    path = tmp_path / "future.pt"
    spec = {"format": "kdexport", "format_version": FORMAT_VERSION + 1, **plain_spec()}
    torch.save({"format": "kdexport", "spec": json.dumps(spec), "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="newer kdexport"):
        load_checkpoint(path)


def test_corrupt_spec_and_state(tmp_path):
    bad_spec = tmp_path / "spec.pt"
    torch.save({"format": "kdexport", "spec": "{not json", "state_dict": {}}, bad_spec)
    with pytest.raises(CheckpointError, match="corrupt spec"):
        load_checkpoint(bad_spec)
    bad_state = tmp_path / "state.pt"
    torch.save({"format": "kdexport", "spec": json.dumps(plain_spec()), "state_dict": {"w": [1, 2]}}, bad_state)
    with pytest.raises(CheckpointError, match="no valid state_dict"):
        load_checkpoint(bad_state)


def test_spec_and_weights_that_disagree(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, models.create_model("lenet5").state_dict(), plain_spec("lenet300_100"))
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_model(path)
