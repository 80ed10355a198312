"""kdexport.train: the fit loop (non-finite loss, --resume), recipes, schedules and evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kdexport import models
from kdexport.checkpoint import load_checkpoint, load_model, model_spec
from kdexport.data import dataset_info, make_loader
from kdexport.errors import CheckpointError, ConfigError, TrainingError
from kdexport.train import (
    RECIPES,
    ce_step,
    evaluate,
    evaluate_checkpoint,
    fit,
    get_recipe,
    lr_factor,
    make_optimizer,
    pick_device,
    run_paths,
    to_batch,
    train_classifier,
)

INFO = dataset_info("digits")


def spec_for(run: dict) -> dict:
    return model_spec("model", num_classes=10, stem="imagenet", input_size=INFO.input_size, dataset="digits",
                      mean=INFO.mean, std=INFO.std, model="lenet5", run=run)


@pytest.fixture(scope="module")
def loaders():
    """4 training steps per epoch (batch 8), 48 validation and 64 test images."""
    return (make_loader("digits", "train", 8, limit=32), make_loader("digits", "val", 48, limit=48),
            make_loader("digits", "test", 64, limit=64))


def epochs_logged(log) -> list[int]:
    return [json.loads(line)["epoch"] for line in log.read_text().splitlines()]


def test_nan_loss_stops_with_the_step(tmp_path, loaders):
    calls = 0

    def step(model, x, y):
        nonlocal calls
        calls += 1
        loss, logits = ce_step(model, x, y)
        return (loss * float("nan") if calls == 2 else loss), logits

    out = tmp_path / "m.pt"
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1, step 2"):
        fit(models.create_model("lenet5"), step, *loaders, get_recipe("simkd"), 1, out, spec_for({"id": 1}))
    assert not out.exists() and calls == 2


def test_training_runs_channels_last_and_saves_nchw(tmp_path, loaders):
    """fit trains on channels-last batches (faster on oneDNN and cuDNN alike) but the checkpoint it writes is in
    the usual NCHW layout, and evaluating it either way gives the same figures."""
    seen = []

    def step(model, x, y):
        seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return ce_step(model, x, y)

    out = tmp_path / "m.pt"
    fit(models.create_model("lenet5"), step, *loaders, get_recipe("simkd"), 1, out, spec_for({"id": 2}))
    assert seen and all(seen)
    state, _ = load_checkpoint(out)
    assert all(t.is_contiguous() for t in state.values())
    model, _ = load_model(out)
    nchw = evaluate(model, loaders[2])
    assert evaluate(model.to(memory_format=torch.channels_last), loaders[2])["top1"] == nchw["top1"]
    assert to_batch(torch.zeros(2, 5), "cpu").is_contiguous()  # not an image batch: left as it is


class Interrupted(Exception):
    pass


def test_resume_continues_from_the_state_file(tmp_path, loaders):
    out = tmp_path / "m.pt"
    state, log = run_paths(out)
    recipe, spec = get_recipe("simkd"), spec_for({"stage": "train", "epochs": 2})
    calls = 0

    def interrupt_in_epoch_2(model):
        nonlocal calls
        calls += 1
        if calls == 5:  # first step of the second epoch
            raise Interrupted

    torch.manual_seed(0)
    with pytest.raises(Interrupted):
        fit(models.create_model("lenet5"), ce_step, *loaders, recipe, 2, out, spec, after_step=interrupt_in_epoch_2)
    assert not out.exists() and state.is_file() and epochs_logged(log) == [1]
    saved, _, extra = load_checkpoint(state, with_extra=True)
    assert extra["epoch"] == 1 and {"optimizer", "scheduler", "rng"} <= set(extra)

    with pytest.raises(ConfigError, match=r"other settings \(epochs, other, stage\)"):
        fit(models.create_model("lenet5"), ce_step, *loaders, recipe, 2, out, spec_for({"other": True}))

    resumed_steps = []
    model = models.create_model("lenet5")
    metrics = fit(model, ce_step, *loaders, recipe, 2, out, spec,
                  after_step=lambda m: resumed_steps.append(1))
    assert len(resumed_steps) == 4  # only epoch 2 ran
    assert epochs_logged(log) == [1, 2]
    assert out.is_file() and not state.exists()
    _, final_spec = load_model(out)
    assert final_spec["metrics"] == metrics and 0 <= metrics["top1"] <= metrics["top5"] <= 100

    # --resume with nothing left to continue refuses; a plain rerun is a fresh start whose log does not repeat epochs
    with pytest.raises(CheckpointError, match="no interrupted run to continue"):
        fit(models.create_model("lenet5"), ce_step, *loaders, recipe, 1, out, spec, resume=True)
    fit(models.create_model("lenet5"), ce_step, *loaders, recipe, 1, out, spec)
    assert epochs_logged(log) == [1]


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    """Shuffling and augmentation continue from the saved RNG state, not from the seed again."""
    train = make_loader("digits", "train", 8, limit=24)  # augmented: random crops
    val, test = make_loader("digits", "val", 48, limit=48), make_loader("digits", "test", 64, limit=64)
    recipe, spec = get_recipe("simkd"), spec_for({"stage": "train", "epochs": 3})

    def run(out, **kw):
        torch.manual_seed(0)
        model = models.create_model("lenet5")
        fit(model, ce_step, train, val, test, recipe, 3, out, spec, **kw)
        return model

    whole = run(tmp_path / "whole.pt")
    steps = 0

    def interrupt_in_epoch_3(model):
        nonlocal steps
        steps += 1
        if steps == 7:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(tmp_path / "m.pt", after_step=interrupt_in_epoch_3)
    resumed = run(tmp_path / "m.pt")  # no flag: a rerun continues
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resuming"


def test_zero_epochs_evaluates_and_saves(tmp_path, loaders):
    out = tmp_path / "m.pt"
    metrics = fit(models.create_model("lenet5"), ce_step, *loaders, get_recipe("simkd"), 0, out, spec_for({}))
    assert out.is_file() and set(metrics) == {"top1", "top5", "val_top1", "val_top5"}
    with pytest.raises(ConfigError, match="epochs"):
        fit(models.create_model("lenet5"), ce_step, *loaders, get_recipe("simkd"), -1, out, spec_for({}))


def test_seed_fixes_the_initial_weights(tmp_path):
    states = []
    for global_seed, seed in [(1, 0), (2, 0), (1, 1)]:
        torch.manual_seed(global_seed)  # whatever ran before in the process must not matter
        train_classifier("lenet5", "digits", tmp_path / "m.pt", epochs=0, recipe=get_recipe("simkd"), seed=seed,
                         device="cpu")
        states.append(load_checkpoint(tmp_path / "m.pt")[0]["features.0.weight"])
    assert torch.equal(states[0], states[1]) and not torch.equal(states[0], states[2])


def test_recipes_and_overrides():
    paper, simkd = get_recipe("paper"), get_recipe("simkd")
    assert (paper.lr, paper.nesterov, paper.batch_size, paper.weight_decay, paper.schedule) == (
        0.001, True, 64, 5e-4, "constant")
    assert (simkd.lr, simkd.schedule, simkd.milestones) == (0.05, "step", (0.625, 0.75, 0.875))
    custom = get_recipe("simkd", lr=0.1, batch_size=None, weight_decay=0.0)
    assert (custom.lr, custom.batch_size, custom.weight_decay) == (0.1, 64, 0.0)
    assert RECIPES["simkd"].lr == 0.05  # overrides do not leak into the registry
    with pytest.raises(ConfigError, match="unknown recipe 'sgd'; choose one of: paper, simkd"):
        get_recipe("sgd")


@pytest.mark.parametrize("overrides, match", [
    (dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"), (dict(batch_size=0), "batch-size"),
    (dict(schedule="linear"), "schedule"), (dict(temperature=0.0), "temperature"), (dict(alpha=1.5), "alpha"),
    (dict(momentum=1.0), "momentum"), (dict(weight_decay=-1e-4), "weight decay"),
])
def test_invalid_recipe_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        get_recipe("simkd", **overrides)


@pytest.mark.parametrize("name, schedule, final", [
    ("simkd", "step", 0.05 * 1e-3), ("simkd", "cosine", 0.0), ("paper", "constant", 0.001),
])
def test_schedules_over_a_run(name, schedule, final):
    recipe = get_recipe(name, schedule=schedule)
    opt, sched = make_optimizer([nn.Parameter(torch.zeros(1))], recipe, epochs=4, steps_per_epoch=2)
    lrs = []
    for _ in range(8):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[-1] == pytest.approx(final, abs=1e-12)
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False))


class FixedLogits(nn.Module):
    """Always ranks the classes by index: top-1 is the last class, top-5 the last five."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        return torch.arange(self.classes, dtype=torch.float32).expand(len(x), -1)


def test_evaluate_top1_top5_by_hand():
    x = torch.zeros(4, 1)
    y = torch.tensor([9, 5, 4, 0])
    nll10 = torch.nn.functional.cross_entropy(torch.arange(10.0).expand(4, -1), y).item()
    assert evaluate(FixedLogits(10), [(x, y)]) == pytest.approx({"top1": 25.0, "top5": 50.0, "nll": nll10})
    assert evaluate(FixedLogits(3), [(x[:2], torch.tensor([0, 2]))])["top1"] == 50.0
    assert evaluate(FixedLogits(3), [(x[:2], torch.tensor([0, 2]))])["top5"] == 100.0


def test_evaluate_trained_checkpoint(teacher_ckpt):
    row = evaluate_checkpoint(teacher_ckpt, device="cpu")
    _, spec = load_model(teacher_ckpt)
    assert row["top5"] >= row["top1"] and row["top1"] == pytest.approx(spec["metrics"]["top1"])
    n = sum(p.numel() for p in models.create_model("lenet5").parameters())
    assert row["kind"] == "model" and row["student_params"] == row["deployed_params"] == n
    assert row["top1"] > 50.0  # 180 steps learn digits well above chance (10%)


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cpu"):
            pick_device("cuda")


def test_test_labels_never_feed_a_choice(tmp_path, loaders):
    """Permuting the test labels changes the reported test accuracy and nothing else: the epoch kept, the
    weights and the validation figures are chosen on the validation split alone."""
    train, val, test = loaders
    x, y = (torch.cat(t) for t in zip(*test, strict=True))
    permuted = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y[torch.randperm(len(y))]), 64)
    results = []
    for i, test_loader in enumerate((test, permuted)):
        torch.manual_seed(0)
        model = models.create_model("lenet5")
        metrics = fit(model, ce_step, train, val, test_loader, get_recipe("cosine"), 3, tmp_path / f"{i}.pt",
                      spec_for({"id": i}))
        results.append((metrics, model.state_dict()))
    (m0, s0), (m1, s1) = results
    assert {k: m0[k] for k in ("val_top1", "val_top5", "best_epoch")} == {k: m1[k] for k in
                                                                        ("val_top1", "val_top5", "best_epoch")}
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_the_best_validation_epoch_is_kept(tmp_path, loaders):
    """The saved model is the epoch with the best validation accuracy, not the last one."""
    out = tmp_path / "m.pt"
    metrics = fit(models.create_model("lenet5"), ce_step, *loaders, get_recipe("cosine", lr=0.5), 4, out,
                  spec_for({}))
    log = [json.loads(line) for line in run_paths(out)[1].read_text().splitlines()]
    best = max(log, key=lambda e: (e["val_top1"], -e["val_nll"], e["epoch"]))
    assert metrics["best_epoch"] == best["epoch"] and metrics["val_top1"] == best["val_top1"]
    model, _ = load_model(out)
    assert evaluate(model, loaders[1])["top1"] == pytest.approx(best["val_top1"])
    assert "top1" not in log[0]  # no per-epoch test accuracy: nothing to be tempted by


def test_keep_last_saves_the_last_epoch_and_reports_its_validation(tmp_path, loaders):
    """Fine-tuning keeps the last epoch: the saved weights and validation figures are the last epoch's."""
    out = tmp_path / "m.pt"
    metrics = fit(models.create_model("lenet5"), ce_step, *loaders, get_recipe("cosine", lr=0.5), 3, out,
                  spec_for({}), keep="last")
    log = [json.loads(line) for line in run_paths(out)[1].read_text().splitlines()]
    assert metrics["best_epoch"] == 3 and metrics["val_top1"] == log[-1]["val_top1"]
    model, _ = load_model(out)
    assert evaluate(model, loaders[1])["top1"] == pytest.approx(log[-1]["val_top1"])
    with pytest.raises(ConfigError, match="keep must be one of best, last"):
        fit(models.create_model("lenet5"), ce_step, *loaders, get_recipe("cosine"), 1, tmp_path / "x.pt",
            spec_for({}), keep="newest")


def test_recipes_warm_up_then_decay():
    r = get_recipe("cosine")
    f = [lr_factor(r, i, 100) for i in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[99] < 0.01
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False))
    assert get_recipe("adamw").optimizer == "adamw" and get_recipe("cosine").to_dict()["milestones"] == [0.625, 0.75,
                                                                                                          0.875]
    with pytest.raises(ConfigError, match="optimizer"):
        get_recipe("cosine", optimizer="lion")
