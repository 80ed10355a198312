"""kdexport.prune: channel pruning of every architecture (with round-tripping structure specs), Torch-Pruning's
coupled layers, prune_checkpoint fine-tuning, the CLI (weight masks: test_prune_weights.py)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn
from typer.testing import CliRunner

from kdexport import models
from kdexport import train as train_module
from kdexport.checkpoint import build_model, load_checkpoint, load_model, model_spec, save_checkpoint
from kdexport.cli import app
from kdexport.data import dataset_info
from kdexport.distill import DistillConfig, DistilledStudent, new_student, student_spec
from kdexport.errors import CheckpointError, ConfigError
from kdexport.metrics import count_macs, global_sparsity
from kdexport.prune import (
    L1Importance,
    PruneConfig,
    ignored_layers,
    prune_channels_,
    prune_checkpoint,
    prune_weights_,
)
from kdexport.structure import apply_structure, structure_of

SIZE = (3, 32, 32)
DIGITS = dataset_info("digits")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def spec_of(name: str, **fields) -> dict:
    return model_spec("model", num_classes=10, stem=models.DEFAULT_STEM, input_size=SIZE, dataset="digits",
                      mean=DIGITS.mean, std=DIGITS.std, model=name, **fields)


@pytest.fixture(scope="module")
def channel_pruned():
    """name -> (model pruned to 50% channels, its checkpoint spec, dense params, dense MACs), built once."""
    cache: dict[str, tuple[nn.Module, dict, int, int]] = {}

    def get(name: str) -> tuple[nn.Module, dict, int, int]:
        if name not in cache:
            torch.manual_seed(0)
            model = models.create_model(name, 10, input_size=SIZE).eval()
            fresh = copy.deepcopy(model)
            prune_channels_(model, PruneConfig("channel", 0.5), torch.randn(1, *SIZE))
            spec = spec_of(name, structure=structure_of(model, fresh))
            cache[name] = model, spec, n_params(fresh), count_macs(fresh, SIZE).dense
        return cache[name]

    yield get
    cache.clear()


# ----------------------------------------------------------------------------------------- channel: all
@pytest.mark.parametrize("name", models.list_models())
def test_channel_pruning_every_model_round_trips(name, tmp_path, channel_pruned):
    model, spec, dense_params, dense_macs = channel_pruned(name)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert n_params(model) < 0.6 * dense_params
    assert count_macs(model, SIZE).dense < 0.8 * dense_macs  # LeNet-5's 6-channel conv1 stays (round_to 8)
    assert spec["structure"]["modules"] and json.loads(json.dumps(spec["structure"])) == spec["structure"]
    path = tmp_path / "channel.pt"
    save_checkpoint(path, model.state_dict(), spec)
    loaded, _ = load_model(path)
    assert n_params(loaded) == n_params(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out)
    assert loaded.num_features == model.num_features  # the width forward_features returns, kept true
    assert model.forward_features(x).shape[1] == model.num_features


def test_distilled_student_keeps_head_width_and_prunes_projector(tmp_path):
    torch.manual_seed(0)
    common = dict(num_classes=10, stem=models.DEFAULT_STEM, input_size=SIZE)
    model = DistilledStudent.from_names("resnet50", "resnet18", **common).eval()
    head_before = copy.deepcopy(model.head.state_dict())
    x = torch.randn(2, *SIZE)
    prune_channels_(model, PruneConfig("channel", 0.5), x)
    assert model.projector[-3].out_channels == 2048 and model.head.classifier.in_features == 2048
    assert model.projector[0].out_channels == model.projector[3].out_channels == 512  # inner width 1024 -> 512
    assert model.projector[0].in_channels == model.student.num_features == 256  # student's last width halved
    assert not any(p.requires_grad for p in model.head.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())
    assert all(torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())
    spec = {**spec_of("resnet18"), "kind": "distilled", "teacher": "resnet50", "student": "resnet18",
            "projector_factor": 2}
    spec["structure"] = structure_of(model, build_model(spec))
    assert not any(k.startswith("head.") for k in spec["structure"]["modules"])
    save_checkpoint(tmp_path / "s.pt", model.state_dict(), spec)
    loaded, _ = load_model(tmp_path / "s.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert not any(p.requires_grad for p in loaded.head.parameters())


def test_ignored_layers():
    plain = models.create_model("lenet5")
    assert ignored_layers(plain) == [plain.classifier[-1]]  # the logits layer; the 84-wide hidden one is pruned
    student = DistilledStudent.from_names("lenet5", "lenet300_100", num_classes=10, stem="imagenet",
                                          input_size=SIZE)
    assert ignored_layers(student) == [student.head, student.projector[-3]]


# ------------------------------------------------------------------------------- coupled layers (Torch-Pruning)
def test_resnet_residual_branches_stay_equal(channel_pruned):
    model = channel_pruned("resnet18")[0]
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        widths = {block.conv2.out_channels for block in stage} | {block.bn2.num_features for block in stage}
        widths |= {b.downsample[0].out_channels for b in stage if b.downsample is not None}
        assert len(widths) == 1, widths  # every branch added into the stage's residual stream
        for block in stage:
            assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels
    assert model.layer1[0].conv1.in_channels == model.conv1.out_channels  # identity shortcut into layer1
    assert model.fc.in_features == model.layer4[-1].conv2.out_channels


def test_densenet_concatenation_widths_add_up(channel_pruned):
    model = channel_pruned("densenet169")[0]
    width = model.features.conv0.out_channels
    for i in range(1, 5):
        block = getattr(model.features, f"denseblock{i}")
        for layer in block.values():
            assert layer.norm1.num_features == layer.conv1.in_channels == width
            width += layer.conv2.out_channels  # each layer's output is concatenated to its input
        if i < 4:
            trans = getattr(model.features, f"transition{i}")
            assert trans.norm.num_features == trans.conv.in_channels == width
            width = trans.conv.out_channels
    assert model.features.norm5.num_features == model.classifier.in_features == width


def test_mobilenet_v2_depthwise_groups_follow_channels(channel_pruned):
    model = channel_pruned("mobilenet_v2")[0]
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17
    for conv in depthwise:
        assert conv.groups == conv.in_channels == conv.out_channels
    for block in model.features[1:-1]:
        convs = [m for m in block.conv.modules() if isinstance(m, nn.Conv2d)]
        assert all(a.out_channels == b.in_channels for a, b in zip(convs, convs[1:], strict=False))
        if block.use_res_connect:
            assert convs[0].in_channels == convs[-1].out_channels


def test_efficientnet_squeeze_excitation_dims_match(channel_pruned):
    model = channel_pruned("efficientnet_b0")[0]
    blocks = [m for m in model.modules() if type(m).__name__ == "MBConv"]
    assert len(blocks) == 16
    for block in blocks:
        depthwise = next(m for m in block.block.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
        se = next(m for m in block.block.modules() if type(m).__name__ == "SqueezeExcitation")
        assert depthwise.groups == depthwise.out_channels
        assert se.fc1.in_channels == depthwise.out_channels == se.fc2.out_channels  # SE rescales those channels
        assert se.fc1.out_channels == se.fc2.in_channels


def test_squeezenet_fire_concat_feeds_next_squeeze(channel_pruned):
    model = channel_pruned("squeezenet1_1")[0]
    fires = [m for m in model.features if type(m).__name__ == "Fire"]
    for fire, nxt in zip(fires, fires[1:], strict=False):
        assert fire.expand1x1.out_channels + fire.expand3x3.out_channels == nxt.squeeze.in_channels


@pytest.mark.parametrize("build", [
    lambda: models.densenet.DenseNet(8, (2, 3), 16, 10, "imagenet"),  # concatenations, the patched mapping
    lambda: models.create_model("mobilenet"),  # depthwise roots
    lambda: models.create_model("efficientnet_b0"),  # depthwise + SE
], ids=["densenet", "mobilenet", "efficientnet_b0"])
def test_layer_scope_is_bit_identical_to_metapruner(build):
    """Our group loop (with the index-mapping patches) prunes exactly what MetaPruner's local mode prunes."""
    torch.manual_seed(0)
    ours = build().eval()
    theirs = copy.deepcopy(ours)
    x = torch.randn(1, *SIZE)
    prune_channels_(ours, PruneConfig("channel", 0.5, round_to=8), x)
    with torch.enable_grad():
        tp.pruner.MetaPruner(theirs, x, importance=L1Importance(), pruning_ratio=0.5,
                             ignored_layers=ignored_layers(theirs), round_to=8).step()
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_depthwise_groups_are_ranked_by_their_l1_norm():
    model = models.create_model("mobilenet").eval()
    dw = model.features[5][0][0]
    with torch.no_grad():
        dw.weight.normal_()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, *SIZE))
    fn = tp.pruner.function.prune_depthwise_conv_out_channels
    group = graph.get_pruning_group(dw, fn, list(range(dw.out_channels)))
    torch.testing.assert_close(L1Importance()(group), dw.weight.abs().flatten(1).sum(1))


@pytest.mark.parametrize("name", ["mobilenet", "efficientnet_b0", "resnet18"])
def test_global_channel_scope_prunes_and_never_empties_a_layer(name):
    torch.manual_seed(0)
    model = models.create_model(name).eval()
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    prune_channels_(model, PruneConfig("channel", 0.5, scope="global"), torch.randn(1, *SIZE))
    after = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert sum(after.values()) < 0.75 * sum(before.values())
    assert all(after[n] >= min(8, before[n]) for n in before)
    assert all(c % 8 == 0 for n, c in after.items() if c != before[n])


# ------------------------------------------------------------------------------------ prune_checkpoint
def distilled_run(tmp_path, teacher_ckpt):
    """run dir with teacher.pt (trained LeNet-5) and student.pt (SimKD lenet5 -> lenet300_100, untrained)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(teacher_ckpt, run / "teacher.pt")
    teacher, tspec = load_model(teacher_ckpt)
    pair = models.resolve_pair("lenet5:lenet300_100")
    spec = {**student_spec(tspec, pair, DistillConfig()), "metrics": {"top1": 10.0}}
    torch.manual_seed(0)
    model = new_student(spec, teacher)  # as `kdexport distill` builds it (its projector kernel from the spec)
    save_checkpoint(run / "student.pt", model.state_dict(), spec)
    return run


def test_prune_checkpoint_weight_finetunes_and_saves(tmp_path, teacher_ckpt, monkeypatch):
    out = tmp_path / "out" / "weight-0.50.pt"
    written = []
    real_save = train_module.save_checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint", lambda path, *a, **kw: written.append(Path(path).name)
                        or real_save(path, *a, **kw))
    row = prune_checkpoint(teacher_ckpt, PruneConfig("weight", 0.5, steps=2), out, finetune_epochs=1, seed=0)
    assert written and not any(name.endswith(".state.pt") for name in written)  # nothing resumes a fine-tuning
    model, spec = load_model(out)
    assert abs(global_sparsity(model) - 0.5) < 0.005 and abs(row["sparsity"] - 0.5) < 0.005
    assert row["top1"] > 60 and spec["metrics"]["top1"] == row["top1"]
    assert spec["prune"]["method"] == "weight" and spec["prune"]["objective"] == "ce" and "structure" not in spec
    assert spec["prune"]["keep_epoch"] == "last" and spec["metrics"]["best_epoch"] == 1
    assert row["params_nonzero"] < 0.55 * row["student_params"] and row["sparse_bytes"] < row["size_bytes"]
    assert row["effective_macs"] < 0.9 * row["macs"]  # global: big low-MAC layers lose most
    log = [json.loads(line) for line in (out.parent / "weight-0.50.log.jsonl").read_text().splitlines()]
    assert [e["prune_step"] for e in log] == [1, 2]
    assert sorted(p.name for p in out.parent.iterdir()) == ["weight-0.50.log.jsonl", "weight-0.50.pt"]


def test_prune_checkpoint_channel_simkd_head_scope(tmp_path, teacher_ckpt):
    run = distilled_run(tmp_path, teacher_ckpt)
    before, _ = load_model(run / "student.pt")
    row = prune_checkpoint(run / "student.pt", PruneConfig("channel", 0.5), run / "channel-0.50.pt",
                           finetune_epochs=1, finetune_scope="head", seed=0)
    model, spec = load_model(run / "channel-0.50.pt")
    assert spec["prune"]["objective"] == "simkd" and spec["prune"]["teacher"] == str(run / "teacher.pt")
    assert spec["structure"]["modules"] and row["deployed_params"] < 0.6 * sum(p.numel() for p in before.parameters())
    # head scope: the backbone is frozen (its surviving rows are the original ones), the projector trained
    w0, fc = before.student.features[1].weight, model.student.features[1]
    kept = w0.abs().sum(1).argsort()[w0.shape[0] - fc.out_features:].sort().values  # highest L1, in order
    assert fc.out_features == 144 and torch.equal(fc.weight, w0[kept])
    assert not torch.equal(model.projector[-2].weight, before.projector[-2].weight)


def test_prune_checkpoint_iterative_channel_with_rewinding(tmp_path, teacher_ckpt):
    out = tmp_path / "channel-0.75.pt"
    prune_checkpoint(teacher_ckpt, PruneConfig("channel", 0.75, steps=2, rewind=True), out, finetune_epochs=1)
    model, spec = load_model(out)
    assert spec["prune"]["steps"] == 2 and spec["prune"]["rewind"]
    # 120 -> 56 -> 24 (half per step, rounded down to multiples of 8); conv2 16 -> 8, then too small to halve
    assert [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)] == [6, 8, 24]


def test_prune_checkpoint_needs_the_right_teacher(tmp_path, teacher_ckpt):
    run = distilled_run(tmp_path, teacher_ckpt)
    (run / "teacher.pt").unlink()
    with pytest.raises(CheckpointError, match="--teacher"):
        prune_checkpoint(run / "student.pt", PruneConfig("weight", 0.5), run / "w.pt", finetune_epochs=1)
    with pytest.raises(CheckpointError, match="not a trained lenet5"):
        prune_checkpoint(run / "student.pt", PruneConfig("weight", 0.5), run / "w.pt", finetune_epochs=1,
                         teacher_ckpt=run / "student.pt")
    assert sorted(p.name for p in run.iterdir()) == ["student.pt"]


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(amount=1.0), "amount"), (dict(amount=-0.1), "amount"), (dict(method="filter"), "method"),
    (dict(scope="net"), "scope"), (dict(round_to=0), "round-to"), (dict(steps=0), "steps"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**kwargs)


def test_mismatched_structure_is_refused(tmp_path, channel_pruned):
    model, spec, *_ = channel_pruned("resnet18")
    first = next(iter(spec["structure"]["modules"]))
    edited = copy.deepcopy(spec)
    edited["structure"]["modules"][first]["out_channels"] += 8
    save_checkpoint(tmp_path / "bad.pt", model.state_dict(), edited)
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        prune_checkpoint(tmp_path / "bad.pt", PruneConfig("channel", 0.5), tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="the architecture has nothing there"):
        apply_structure(models.create_model("resnet18"), {"version": 1, "modules": {"layer9.conv": {
            "type": "Conv2d", "in_channels": 8, "out_channels": 8, "groups": 1}}})
    with pytest.raises(CheckpointError, match="malformed"):
        apply_structure(models.create_model("resnet18"), {"layers": []})
    with pytest.raises(ConfigError, match="remove_masks_"):
        masked = models.create_model("lenet5")
        prune_weights_(masked, PruneConfig("weight", 0.5))
        prune_channels_(masked, PruneConfig("channel", 0.5), torch.randn(1, *SIZE))
    assert not (tmp_path / "x.pt").exists()


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_prune(tmp_path, teacher_ckpt):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", str(teacher_ckpt), "--method", "channel", "--amount", "0.5",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["checkpoint"] == str(out / "channel-0.50.pt") and row["scope"] == "layer"
    assert {"top1", "top5", "params_nonzero", "student_params", "deployed_params", "macs", "effective_macs",
            "size_bytes", "sparse_bytes"} <= row.keys()
    _, spec = load_checkpoint(out / "channel-0.50.pt")
    assert spec["prune"]["amount"] == 0.5 and spec["structure"]["modules"]

    state = tmp_path / "run.state.pt"
    save_checkpoint(state, {}, spec_of("lenet5"), extra={"epoch": 1})
    for args, code, message in [
        (["--method", "weight", "--amount", "1.0"], 2, "--amount must be a fraction in [0, 1)"),
        (["--method", "weight", "--amount", "-0.1"], 2, "--amount must be a fraction in [0, 1)"),
        (["--method", "filter", "--amount", "0.5"], 2, None),
        (["--method", "weight", "--amount", "0.5", "--steps", "0"], 2, "--steps"),
    ]:
        result = runner.invoke(app, ["prune", str(teacher_ckpt), *args, "--out", str(tmp_path / "bad")])
        assert result.exit_code == code, result.output
        if message:
            assert result.stderr.startswith("error: ") and message in result.stderr
            assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(app, ["prune", str(state), "--method", "weight", "--amount", "0.5", "--out",
                                 str(tmp_path / "bad")])
    assert result.exit_code == 2 and "training state file" in result.stderr
    assert not (tmp_path / "bad").exists()
