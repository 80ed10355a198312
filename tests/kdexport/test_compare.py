"""kdexport.compare on tiny real checkpoints: disagreements, logit and weight distances, accuracies, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from kdexport import models
from kdexport.checkpoint import model_spec, save_checkpoint
from kdexport.compare import NA_ARCH, compare_checkpoints
from kdexport.data import dataset_info, make_loader
from kdexport.errors import CheckpointError, ConfigError


def save(path, model, name="lenet5", dataset="digits"):
    info = dataset_info(dataset)
    spec = model_spec("model", num_classes=info.num_classes, stem="imagenet", input_size=info.input_size,
                      dataset=dataset, mean=info.mean, std=info.std, model=name)
    save_checkpoint(path, model.state_dict(), spec)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    torch.manual_seed(0)
    a = models.create_model("lenet5", 10, stem="imagenet", input_size=(3, 32, 32)).eval()
    b = models.create_model("lenet5", 10, stem="imagenet", input_size=(3, 32, 32)).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # B = A with the classifier's bias shifted: known weight distance
        last = [m for m in b.get_classifier().modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias += torch.arange(10, dtype=last.bias.dtype)
    c = models.create_model("lenet300_100", 10, stem="imagenet", input_size=(3, 32, 32)).eval()
    return a, b, save(d / "a.pt", a), save(d / "b.pt", b), save(d / "c.pt", c, "lenet300_100")


def test_compare_against_a_direct_computation(ckpts):
    a, b, pa, pb, _ = ckpts
    res = compare_checkpoints(pa, pb, "digits", device="cpu")
    xs, ys = zip(*make_loader("digits", "test", 512), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    with torch.no_grad():
        la, lb = a(x), b(x)
    assert res["examples"] == len(y) == 360
    assert res["disagreements"] == int((la.argmax(1) != lb.argmax(1)).sum()) > 0
    assert res["logit_l2_mean"] == pytest.approx(float((la - lb).norm(dim=1).mean()), rel=1e-4)
    # the logits differ exactly by the bias shift 0..9 on every example
    assert res["logit_l2_mean"] == pytest.approx(math.sqrt(sum(i * i for i in range(10))), rel=1e-4)
    assert res["logit_l2_total"] == pytest.approx(float((la - lb).norm()), rel=1e-4)
    assert res["weight_l2"] == pytest.approx(math.sqrt(285), rel=1e-6)
    assert res["accuracy_a"] == pytest.approx(100 * float((la.argmax(1) == y).float().mean()))
    assert res["accuracy_b"] == pytest.approx(100 * float((lb.argmax(1) == y).float().mean()))


def test_compare_with_itself_and_other_architecture(ckpts):
    _, _, pa, _, pc = ckpts
    same = compare_checkpoints(pa, pa, device="cpu")
    assert (same["disagreements"], same["logit_l2_mean"], same["weight_l2"]) == (0, 0.0, 0.0)
    other = compare_checkpoints(pa, pc, "digits", device="cpu")
    assert other["weight_l2"] == NA_ARCH and other["logit_l2_mean"] > 0


def test_compare_errors(ckpts, tmp_path):
    _, _, pa, _, _ = ckpts
    with pytest.raises(CheckpointError, match="not found"):
        compare_checkpoints(pa, tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="unknown dataset"):
        compare_checkpoints(pa, pa, "imagenet21k")


def test_compare_cli(ckpts):
    from kdexport.cli import app

    _, _, pa, pb, pc = ckpts
    res = CliRunner().invoke(app, ["compare", str(pa), str(pb), "--dataset", "digits", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["disagreements"] > 0 and payload["weight_l2"] == pytest.approx(math.sqrt(285))
    table = CliRunner().invoke(app, ["compare", str(pa), str(pc), "--device", "cpu"])
    assert table.exit_code == 0 and "architectures differ" in table.stdout
    bad = CliRunner().invoke(app, ["compare", str(pa), "missing.pt"])
    assert bad.exit_code == 2 and "not found" in bad.output
