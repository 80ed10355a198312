"""kdexport.prune weight pruning: global / layer scope, masks through fine-tuning, iterative steps, rewinding."""

from __future__ import annotations

import copy

import pytest
import torch
from test_prune import spec_of  # the same spec helper
from torch.nn.utils import prune as torch_prune

from kdexport import models
from kdexport.data import dataset_info, make_loader
from kdexport.distill import DistilledStudent
from kdexport.errors import ConfigError
from kdexport.metrics import global_sparsity, layer_sparsity
from kdexport.prune import (
    PruneConfig,
    prunable_layers,
    prune_channels,
    prune_weights_,
    remove_masks_,
    replay_channels_,
    rewind_weights_,
    step_amount,
)
from kdexport.structure import structure_of
from kdexport.train import ce_step, fit, get_recipe

SIZE = (3, 32, 32)
DIGITS = dataset_info("digits")


# -------------------------------------------------------------------------------------------- weights
@pytest.fixture()
def student() -> DistilledStudent:
    torch.manual_seed(0)
    return DistilledStudent.from_names("resnet18", "lenet5", num_classes=10, stem="imagenet", input_size=SIZE)


def trainable_sparsity(model) -> float:
    """The zero fraction of the weights weight pruning ranks: every trainable conv / linear layer."""
    rows = [r for r in layer_sparsity(model) if not r["layer"].startswith("head.")]
    return sum(r["params"] - r["nonzero"] for r in rows) / sum(r["params"] for r in rows)


def test_global_weight_pruning_covers_backbone_and_projector_not_the_frozen_head(student):
    prune_weights_(student, PruneConfig("weight", 0.7))
    assert abs(trainable_sparsity(student) - 0.7) < 0.005
    assert all(torch_prune.is_pruned(m) for m in (student.projector[0], student.student.features[0]))
    # the teacher's classifier is frozen: pruned, it could never recover (90% took a student to 19% top-1)
    assert not torch_prune.is_pruned(student.head.classifier) and student.head.classifier.weight.all()
    assert student.head.classifier not in prunable_layers(student)
    sparsities = [r["sparsity"] for r in layer_sparsity(student) if not r["layer"].startswith("head.")]
    assert max(sparsities) - min(sparsities) > 0.2  # one global ranking: layers end up unequal


def test_layer_scope_gives_every_layer_the_amount(student):
    prune_weights_(student, PruneConfig("weight", 0.6, scope="layer"))
    for row in layer_sparsity(student):
        if row["layer"].startswith("head."):
            assert row["sparsity"] == 0  # frozen: left whole
            continue
        assert abs(row["sparsity"] - 0.6) <= 0.5 / row["params"] + 1e-9, row


def test_masks_survive_fine_tuning_and_are_baked_in(tmp_path):
    torch.manual_seed(0)
    model = models.create_model("lenet5")
    prune_weights_(model, PruneConfig("weight", 0.5))
    zero = {n: m.weight_mask == 0 for n, m in model.named_modules() if hasattr(m, "weight_mask")}
    before = {n: m.weight_orig.detach().clone() for n, m in model.named_modules() if n in zero}
    loader = make_loader("digits", "train", 16, limit=48)
    fit(model, ce_step, loader, loader, loader, get_recipe("paper", lr=0.05), 1, tmp_path / "ft.pt", spec_of("lenet5"))
    modules = dict(model.named_modules())
    assert all(torch.equal(modules[n].weight[z], torch.zeros(int(z.sum()))) for n, z in zero.items())
    assert all(not torch.equal(modules[n].weight_orig[~z], before[n][~z]) for n, z in zero.items())  # trained
    remove_masks_(model)
    assert not any(torch_prune.is_pruned(m) for m in model.modules())
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    assert abs(global_sparsity(model) - 0.5) < 0.005


def test_iterative_steps_follow_the_geometric_schedule(student):
    each = step_amount(0.75, 2)
    assert each == pytest.approx(0.5)
    for _ in range(2):
        prune_weights_(student, PruneConfig("weight", each))
    assert abs(trainable_sparsity(student) - 0.75) < 0.005
    remove_masks_(student)
    prune_weights_(student, PruneConfig("weight", 0.5))  # a weight-pruned model prunes further: 0.75 -> 0.875
    assert abs(trainable_sparsity(student) - 0.875) < 0.005


def test_rewinding_restores_surviving_weights(student):
    original = copy.deepcopy(student.state_dict())
    with torch.no_grad():  # stands in for fine-tuning between steps
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        student.projector[1].running_mean.add_(1.0)
    prune_weights_(student, PruneConfig("weight", 0.5))
    rewind_weights_(student, original)
    for name, m in student.named_modules():
        if hasattr(m, "weight_mask"):
            keep = m.weight_mask.bool()
            assert torch.equal(m.weight[keep], original[f"{name}.weight"][keep])
            assert not m.weight[~keep].any()
    assert torch.equal(student.projector[1].running_mean, original["projector.1.running_mean"])


def test_channel_rewinding_replays_the_same_channels():
    torch.manual_seed(0)
    original = models.create_model("resnet18").eval()
    model = copy.deepcopy(original)
    with torch.no_grad():  # scaled weights rank channels the same way
        for m in prunable_layers(model):
            m.weight.mul_(2)
    x = torch.randn(1, *SIZE)
    history = prune_channels(model, PruneConfig("channel", 0.5), x)
    replay_channels_(original, history, x)
    assert structure_of(original) == structure_of(model)
    for a, b in zip(prunable_layers(original), prunable_layers(model), strict=True):
        assert torch.equal(a.weight * 2, b.weight)


# ---------------------------------------------------------------------------------- the layer floor
def tiny_layer_net() -> torch.nn.Module:
    """Three layers, the middle one of tiny weights (as a SimKD projector next to a backbone)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 1),
                              torch.nn.Flatten(), torch.nn.Linear(32 * 6 * 6, 10))
    with torch.no_grad():
        net[2].weight.mul_(1e-3)
    return net


def masks(net) -> list[torch.Tensor]:
    return [net[i].weight_mask for i in (0, 2, 4)]


def test_floor_zero_is_torch_global_l1():
    plain, ours = tiny_layer_net(), tiny_layer_net()
    torch_prune.global_unstructured([(plain[i], "weight") for i in (0, 2, 4)], torch_prune.L1Unstructured, amount=0.9)
    prune_weights_(ours, PruneConfig("weight", 0.9, min_layer_density=0.0))
    assert all(torch.equal(a, b) for a, b in zip(masks(plain), masks(ours), strict=True))
    assert masks(ours)[1].sum() == 0  # plain global L1 empties the tiny layer: the failure the floor prevents


def test_the_floor_keeps_every_layer_alive_at_the_same_total():
    net = tiny_layer_net()
    prune_weights_(net, PruneConfig("weight", 0.9))  # default floor 2%
    kept = [int(m.sum()) for m in masks(net)]
    sizes = [m.numel() for m in masks(net)]
    assert kept[1] == -(-sizes[1] * 2 // 100)  # ceil(2% of 512): the floor, nothing more (its weights are tiny)
    assert sum(kept) == round(0.1 * sum(sizes))  # the global amount is unchanged
    before = [m.clone().bool() for m in masks(net)]
    prune_weights_(net, PruneConfig("weight", 0.5))  # pruning again never goes below the floor
    assert int(masks(net)[1].sum()) == kept[1]
    revived = [(new.bool() & ~old).any() for new, old in zip(masks(net), before, strict=True)]
    assert not any(revived)  # nothing pruned comes back


def test_min_layer_density_is_checked():
    with pytest.raises(ConfigError, match="min_layer_density"):
        PruneConfig("weight", 0.5, min_layer_density=1.5)
