"""Per-family recipe departures and zoo revisions: which recipe trains which model, and that it trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdexport import models, pipeline
from kdexport.data import make_loader
from kdexport.distill import DistillConfig, distill_run
from kdexport.train import make_optimizer, seed_everything, train_run
from kdexport.vocab import FAMILY_RECIPES, RECIPES, get_recipe, model_recipe

README_PAIR = ("densenet169", "mobilenet")  # dens169-mobilenet: its defaults must not move


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("model", [*README_PAIR, "resnet18", "lenet5"])
def test_other_families_get_the_shared_recipes_and_their_old_run_identities(name, model):
    assert model_recipe(name, model) == get_recipe(name)
    assert "revision" not in train_run(model, 0, 10, model_recipe(name, model), "affine")
    assert models.model_revision(model) == 0


@pytest.mark.parametrize("model", ["resnet50", "resnet101", "resnet152"])
def test_bottleneck_resnets_keep_the_shared_recipes_and_their_runs_say_the_revision(model):
    """Zero-initialised residual branches (zoo revision 1) change the run identity; the recipe stays shared."""
    assert model_recipe("cosine", model) == get_recipe("cosine")
    assert train_run(model, 0, 10, get_recipe("cosine"), "affine")["revision"] == models.model_revision(model) == 1


@pytest.mark.parametrize("model", ["efficientnet_b0", "efficientnet_b1", "efficientnet_b3"])
def test_efficientnets_train_at_sgd_lr_0_01_and_their_runs_say_the_revision(model):
    assert model_recipe("cosine", model).lr == 0.01 != get_recipe("cosine").lr
    assert model_recipe("cosine", model, lr=0.03).lr == 0.03  # the user's flag wins
    assert model_recipe("adamw", model) == get_recipe("cosine", lr=0.01)  # AdamW at 0.002 left them near chance
    assert train_run(model, 0, 10, get_recipe("adamw"), "affine")["revision"] == models.model_revision(model) >= 1


@pytest.mark.parametrize("name", ["cosine", "adamw"])
def test_squeezenet_trains_with_adamw_at_lr_0_001_and_batch_32(name):
    recipe = model_recipe(name, "squeezenet1_1")
    assert (recipe.optimizer, recipe.lr, recipe.batch_size) == ("adamw", 0.001, 32)
    run = train_run("squeezenet1_1", 0, 12, recipe, "affine")
    assert run["revision"] == models.model_revision("squeezenet1_1") >= 1


def test_every_family_prefix_names_registered_models():
    for prefix, departures in FAMILY_RECIPES.items():
        assert any(m.startswith(prefix) for m in models.list_models()), prefix
        for name, (used, fields) in departures.items():
            assert name in RECIPES
            get_recipe(used, **fields)  # a valid recipe


def test_compress_trains_each_model_with_its_familys_recipe(monkeypatch, tmp_path):
    """The teacher, the student alone and the distilled student each get the recipe of the model they train."""
    seen = {}

    def record(key, recipe):
        seen.setdefault(key, recipe)
        return {}

    monkeypatch.setattr(pipeline, "train_classifier", lambda model, *a, recipe, **k: record(model, recipe))
    monkeypatch.setattr(pipeline, "distill", lambda *a, recipe, **k: record("distill", recipe))
    monkeypatch.setattr(pipeline, "record_stage", lambda *a, **k: None)
    cfg = pipeline.RunConfig(pair="effb3-mobilenet")
    pipeline.ensure_teacher(cfg, tmp_path)
    pipeline.ensure_baseline(cfg, tmp_path)
    assert seen["efficientnet_b3"] == model_recipe("adamw", "efficientnet_b3") != get_recipe("adamw")
    assert seen["mobilenet"] == get_recipe("cosine")
    cfg = pipeline.RunConfig(pair="effb1-effb0")
    pipeline.ensure_student(cfg, tmp_path)
    assert seen["distill"].lr == 0.01
    run = distill_run(cfg.pair_spec, 0, 12, seen["distill"], DistillConfig(), "affine")
    assert "revision" not in distill_run(models.resolve_pair("dens169-mobilenet"), 0, 12, get_recipe("cosine"),
                                         DistillConfig(), "affine")
    assert run["revision"] == models.model_revision("efficientnet_b0")


@pytest.mark.parametrize("model", ["efficientnet_b0", "efficientnet_b3"])
def test_efficientnet_starts_near_chance_whatever_the_class_count(model):
    """torchvision's head init gave logits of std ~5 at 10 classes (initial loss 6-7, not ln 10)."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    for classes in (10, 100):
        net = models.create_model(model, classes).eval()
        with torch.no_grad():
            loss = F.cross_entropy(net(x), torch.randint(0, classes, (16,)))
        assert abs(loss.item() - math.log(classes)) < 0.5, (classes, loss.item())


def _steps(model: str, recipe_name: str, steps: int = 8) -> list[float]:
    """Losses of `steps` training steps on one batch of digits, at the recipe compress would use for `model`."""
    seed_everything(0)
    net = models.create_model(model, 10).train()
    recipe = model_recipe(recipe_name, model)
    x, y = next(iter(make_loader("digits", "train", recipe.batch_size, augment=False)))
    opt, sched = make_optimizer(net.parameters(), recipe, 1, steps)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_efficientnet_b0_loss_falls_at_its_recipe():
    losses = _steps("efficientnet_b0", "cosine")
    assert losses[0] < 3.0 and min(losses[-3:]) < 0.9 * losses[0], losses


def test_squeezenet_loss_falls_at_its_recipe_and_its_logits_are_not_clipped_at_zero():
    """With torchvision's ReLU on the logits, SGD at lr 0.05 left every logit at 0 and the loss at ln 10."""
    losses = _steps("squeezenet1_1", "cosine", steps=30)
    assert min(losses[-5:]) < 0.9 * losses[0], losses
    torch.manual_seed(0)
    with torch.no_grad():
        logits = models.create_model("squeezenet1_1", 10).eval()(torch.randn(8, 3, 32, 32))
    assert (logits < 0).any()
