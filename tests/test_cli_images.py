"""Real images at a chosen size through the command line: train (from pretrained weights) -> distill -> prune ->
export with parity -> profile at 64 px on a generated image folder, compress end to end, and the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
import torchvision
from typer.testing import CliRunner

from kdexport.checkpoint import load_checkpoint
from kdexport.cli import app
from kdexport.imagefolder import write_image_folder

runner = CliRunner()
FAST = ("--epochs", "1", "--batch-size", "8", "--workers", "0")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_line(result, *fragments: str, progress: int = 0) -> None:
    """Exit 2 and one error line naming the problem (after `progress` lines of the command's own progress)."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 + progress and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("photos"), classes=3, per_class={"train": 8, "test": 3},
                              size=(96, 72), grayscale=1)


@pytest.fixture(scope="module")
def chain(data, tmp_path_factory) -> dict[str, Path]:
    """teacher (resnet18 from a torchvision state_dict) -> SimKD squeezenet1_1 -> 50% channel-pruned, at 64 px."""
    d = tmp_path_factory.mktemp("run64")
    weights = d / "resnet18-tv.pth"
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    student_weights = d / "squeezenet-tv.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), student_weights)
    paths = {"weights": weights, "student_weights": student_weights, "teacher": d / "teacher.pt",
             "student": d / "student.pt", "pruned": d / "channel-0.50.pt"}
    ok(run("train", "--model", "resnet18", "--dataset", "imagefolder", "--data-dir", data, "--image-size", "64",
           "--pretrained", weights, "--out", paths["teacher"], *FAST, "--json"))
    ok(run("distill", "--pair", "resnet18:squeezenet1_1", "--teacher", paths["teacher"], "--out", paths["student"],
           "--pretrained", student_weights, "--data-dir", data, *FAST, "--json"))
    ok(run("prune", paths["student"], "--method", "channel", "--amount", "0.5", "--finetune-epochs", "1",
           "--data-dir", data, "--workers", "0", "--json"))
    return paths


def test_every_stage_records_the_size(chain):
    for name in ("teacher", "student", "pruned"):
        _, spec = load_checkpoint(chain[name])
        assert spec["input_size"] == [3, 64, 64] and spec["dataset"] == "imagefolder", name
    _, spec = load_checkpoint(chain["student"])
    assert spec["projector_kernel"] == 3  # squeezenet's last map is 3x3 at 64 px: SimKD's 3x3 conv, not 1x1


def test_pretrained_teacher_keeps_the_backbone_and_a_new_head(chain):
    state, spec = load_checkpoint(chain["teacher"])
    tv = torch.load(chain["weights"], weights_only=True)
    assert spec["num_classes"] == 3 and state["fc.weight"].shape == (3, 512)  # re-initialised for 3 classes
    assert spec["run"]["pretrained"] == str(chain["weights"])
    # one epoch at a small learning rate moves the weights only a little away from the torchvision ones
    drift = (state["layer4.1.conv2.weight"] - tv["layer4.1.conv2.weight"]).norm()
    assert drift < 0.2 * tv["layer4.1.conv2.weight"].norm()


def test_pretrained_student_backbone(chain):
    state, spec = load_checkpoint(chain["student"])
    tv = torch.load(chain["student_weights"], weights_only=True)
    assert spec["run"]["pretrained"] == str(chain["student_weights"])
    assert not any(k.startswith("student.classifier") for k in state)  # SimKD: the teacher's classifier is used
    key = "features.12.expand3x3.weight"
    assert (state[f"student.{key}"] - tv[key]).norm() < 0.2 * tv[key].norm()


def test_export_at_the_size_with_parity_and_profile(chain, data, tmp_path):
    out = tmp_path / "student.onnx"
    res = ok(run("export", chain["pruned"], "--data-dir", data, "--out", out, "--json"))
    assert all(p["passed"] for p in res["parity"])
    model = onnx.load(out)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    meta = {p.key: p.value for p in model.metadata_props}
    assert dims == [1, 3, 64, 64] and json.loads(meta["input_size"]) == [3, 64, 64]
    assert "resize the shorter side to 73" in meta["preprocess"] and "centre crop 64x64" in meta["preprocess"]
    prof = ok(run("profile", out, "--batch", "1", "--warmup", "1", "--iters", "3", "--json"))
    assert prof["input_size"] == [3, 64, 64] and prof["results"][0]["batch"] == 1
    prof = ok(run("profile", chain["pruned"], "--backend", "torch", "--batch", "1", "--warmup", "1", "--iters", "3",
                  "--image-size", "64", "--json"))
    assert prof["input_size"] == [3, 64, 64]


def test_a_mismatched_explicit_size_is_refused(chain, data, tmp_path):
    pruned = chain["pruned"]
    for args in (("export", pruned, "--data-dir", data, "--out", tmp_path / "x.onnx"),
                 ("profile", pruned, "--batch", "1"),
                 ("evaluate", pruned, "--data-dir", data),
                 ("compare", pruned, chain["student"], "--data-dir", data),
                 ("prune", chain["student"], "--method", "weight", "--amount", "0.5", "--data-dir", data,
                  "--out", tmp_path),
                 ("distill", "--pair", "resnet18:squeezenet1_1", "--teacher", chain["teacher"], "--data-dir", data,
                  "--out", tmp_path / "s.pt")):
        result = run(*args, "--image-size", "96")
        assert_one_line(result, "was made at 64x64 px, not 96x96")
    assert not any(tmp_path.iterdir())  # nothing written


def test_compress_end_to_end_at_the_chosen_size(data, tmp_path):
    out = tmp_path / "run"
    res = ok(run("compress", "--dataset", "imagefolder", "--data-dir", data, "--image-size", "64",
                 "--pair", "resnet18:squeezenet1_1", "--methods", "channel", "--levels", "0.5", "--no-baseline",
                 "--teacher-epochs", "1", "--distill-epochs", "1", "--finetune-epochs", "1", "--workers", "0",
                 "--out", out, "--json"))
    assert [r["level"] for r in res["rows"]] == [0.5]
    for name in ("teacher.pt", "student.pt", "channel-0.50.pt"):
        assert load_checkpoint(out / name)[1]["input_size"] == [3, 64, 64], name
    again = run("compress", "--dataset", "imagefolder", "--data-dir", data, "--image-size", "96",
                "--pair", "resnet18:squeezenet1_1", "--methods", "channel", "--levels", "0.5", "--no-baseline",
                "--teacher-epochs", "1", "--distill-epochs", "1", "--finetune-epochs", "1", "--out", out)
    # a finished 64 px teacher is not reused for a 96 px run
    assert_one_line(again, "other settings (image_size)", "--force", progress=1)


def test_bad_data_is_one_line_and_writes_nothing(data, tmp_path):
    import shutil

    root = Path(shutil.copytree(data, tmp_path / "bad"))
    bad = root / "train" / "class2" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:150])
    out = tmp_path / "out" / "t.pt"
    train = ("train", "--model", "lenet5", "--dataset", "imagefolder", "--data-dir", root, "--image-size", "32",
             "--epochs", "1", "--batch-size", "32", "--out", out)
    assert_one_line(run(*train, "--workers", "1"), f"cannot decode image {bad}", "replace or delete the file")
    assert not out.exists()
    bad.unlink()
    (root / "test" / "class3").mkdir()
    (root / "test" / "class3" / "x.png").write_bytes(b"")
    assert_one_line(run(*train), "has other classes than", "only here: class3")
    assert_one_line(run("compress", "--dataset", "imagefolder", "--data-dir", root, "--pair", "resnet18:squeezenet1_1",
                        "--student-pretrained", tmp_path / "nowhere.pth", "--out", tmp_path / "run"),
                    "--student-pretrained:", "nowhere.pth is not a file")
    assert not (tmp_path / "run").exists()
    for size in ("31", "abc"):
        assert_one_line(run("train", "--model", "lenet5", "--image-size", size, "--out", out),
                        "--image-size must be N or H,W")
    assert not out.exists()
