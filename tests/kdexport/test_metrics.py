"""kdexport.metrics: counts checked by hand, against torchvision's documented GFLOPS and FlopCounterMode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdexport import models
from kdexport.distill import DistilledStudent
from kdexport.errors import ConfigError
from kdexport.metrics import (
    count_macs,
    find_breakpoint,
    global_sparsity,
    latency_breakpoint,
    latency_efficiency,
    layer_sparsity,
    param_counts,
    payload_bytes,
    performance_efficiency,
    serialized_bytes,
    sparse_encoded_bytes,
)


def tiny_net() -> nn.Sequential:
    """conv 3->8 3x3 pad 1 on 8x8 -> depthwise 3x3 stride 2 -> flatten -> linear 128->10."""
    torch.manual_seed(0)  # no weight happens to be exactly zero
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )


CONV1_MACS = 8 * 8 * 8 * 3 * 3 * 3  # out elements (8ch x 8x8) * in/groups * kh * kw = 13824
DW_MACS = 8 * 4 * 4 * 1 * 3 * 3  # 1152
FC_MACS = 128 * 10  # 1280


def flop_counter_macs(model: nn.Module, input_size=(3, 32, 32)) -> int:
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(1, *input_size))
    return fc.get_total_flops() // 2


# ------------------------------------------------------------------------------------------------ MACs
def test_macs_of_tiny_net_by_hand():
    net = tiny_net()
    macs = count_macs(net, (3, 8, 8))
    assert macs.dense == CONV1_MACS + DW_MACS + FC_MACS == 16256
    assert macs.effective == macs.dense
    assert count_macs(net, (3, 8, 8)) == macs  # hooks were removed: a second count does not double
    assert not any(m._forward_hooks for m in net.modules())


def test_half_sparse_layer_halves_its_effective_macs_masked_and_removed():
    net = tiny_net()
    prune.l1_unstructured(net[0], "weight", amount=0.5)  # 216 weights -> 108 zero, still under a mask
    macs = count_macs(net, (3, 8, 8))
    assert macs.dense == 16256
    assert macs.effective == CONV1_MACS // 2 + DW_MACS + FC_MACS
    prune.remove(net[0], "weight")
    assert count_macs(net, (3, 8, 8)) == macs


def test_resnet18_224_matches_torchvision_documented_gflops():
    import torchvision

    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1  # meta only, nothing is downloaded
    macs = count_macs(torchvision.models.resnet18(), (3, 224, 224))
    assert macs.dense == pytest.approx(weights.meta["_ops"] * 1e9, rel=1e-3)  # 1.814 GFLOPS documented
    assert 1.81e9 < macs.dense < 1.82e9


@pytest.mark.parametrize("name", ["resnet18", "densenet169", "efficientnet_b0", "mobilenet", "mobilenet_v2",
                                  "squeezenet1_1", "lenet5", "lenet300_100"])
def test_macs_of_registered_models_match_flop_counter(name):
    model = models.create_model(name).train()
    macs = count_macs(model)
    assert all(m.training for m in model.modules())  # train mode restored
    assert macs.dense == flop_counter_macs(model)
    # fp32 random init yields an exact zero about once in 2**24 weights, so effective may be a hair lower
    assert 0.9999 * macs.dense <= macs.effective <= macs.dense


def test_macs_of_channel_pruned_model():
    import torch_pruning as tp

    model = models.create_model("resnet18")
    before = count_macs(model)
    pruner = tp.pruner.MagnitudePruner(model, torch.zeros(1, 3, 32, 32),
                                       importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=[model.get_classifier()], round_to=8)
    pruner.step()
    after = count_macs(model)
    assert after.dense == flop_counter_macs(model)
    assert 0.15 * before.dense < after.dense < 0.4 * before.dense  # ~ (1 - 0.5)^2 of the conv MACs
    assert global_sparsity(model, reference=models.create_model("resnet18")) > 0.6


def test_count_macs_rejects_bad_input_size():
    with pytest.raises(ConfigError, match="input_size"):
        count_macs(tiny_net(), (3, 0, 8))


# ------------------------------------------------------------------------------------------ parameters
def test_param_counts_plain_model_by_hand_and_torchvision():
    c = param_counts(tiny_net())
    assert c.total == (8 * 27 + 8) + (8 * 9 + 8) + (128 * 10 + 10) == 1594
    assert c.total == c.nonzero == c.student == c.student_nonzero == c.deployed == c.deployed_nonzero
    assert param_counts(models.create_model("resnet18", num_classes=1000)).total == 11_689_512


def test_param_counts_count_nonzero_under_masks():
    net = tiny_net()
    prune.global_unstructured([(net[0], "weight"), (net[5], "weight")], prune.L1Unstructured, amount=0.9)
    c = param_counts(net)
    assert c.total == 1594  # weight_orig counted once, the mask buffers are not parameters
    pruned = round(0.9 * (216 + 1280))
    assert c.nonzero == c.student_nonzero == c.deployed_nonzero == 1594 - pruned
    assert global_sparsity(net) == pytest.approx(pruned / (216 + 72 + 1280))


def test_param_counts_distilled_student():
    model = DistilledStudent.from_names("resnet18", "mobilenet", num_classes=10, stem="imagenet",
                                        input_size=(3, 32, 32))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    c = param_counts(model)
    assert c.student == n(model.student)
    assert isinstance(model.student.get_classifier(), nn.Identity)  # its own classifier is not counted
    assert c.deployed == c.total == n(model.student) + n(model.projector) + n(model.head)
    assert c.deployed - c.student == n(model.projector) + 512 * 10 + 10


# ------------------------------------------------------------------------------------------------ sizes
def test_sparse_encoding_sizes_by_hand():
    lin = nn.Linear(100, 64, bias=False)
    assert sparse_encoded_bytes(lin) == payload_bytes(lin) == 6400 * 4  # dense is smallest when dense
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight.view(-1)[::10] = 1.0  # exactly 640 non-zeros: 90% sparse
    bitmap = 6400 // 8 + 640 * 4  # 3360
    csr = 640 * (4 + 1) + 65 * 2  # fp32 values + uint8 column index, 65 uint16 row pointers = 3330
    assert sparse_encoded_bytes(lin) == min(bitmap, csr) == 3330


def test_sparse_encoded_smaller_than_dense_at_90_percent():
    model = models.create_model("squeezenet1_1")
    dense_payload, dense_file = payload_bytes(model), serialized_bytes(model)
    assert dense_payload < dense_file < 1.1 * dense_payload
    assert sparse_encoded_bytes(model) == dense_payload
    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    prune.global_unstructured(layers, prune.L1Unstructured, amount=0.9)
    assert global_sparsity(model) == pytest.approx(0.9, abs=1e-6)
    sparse = sparse_encoded_bytes(model)  # masks folded: weight_orig * weight_mask, masks not counted
    assert sparse < 0.25 * dense_payload
    for m, name in layers:
        prune.remove(m, name)
    assert sparse_encoded_bytes(model) == sparse
    assert payload_bytes(model) == dense_payload


def test_layer_sparsity_rows():
    net = tiny_net()
    prune.l1_unstructured(net[5], "weight", amount=0.25)
    rows = layer_sparsity(net)
    assert [(r["layer"], r["kind"], r["params"]) for r in rows] == [
        ("0", "conv", 216), ("2", "conv", 72), ("5", "linear", 1280)]
    assert rows[2]["nonzero"] == 960 and rows[2]["sparsity"] == pytest.approx(0.25)
    assert rows[0]["sparsity"] == 0.0


# ------------------------------------------------------------------------------------------- efficiency
def test_efficiency_numbers():
    assert performance_efficiency(90, 4_200_000) == pytest.approx(90 / 4.2)  # 21.43
    assert performance_efficiency(90, 4_200_000, w1=0.7, w2=0.3) == pytest.approx(0.7 * 90 / (0.3 * 4.2))
    assert latency_efficiency(80, 2.0) == pytest.approx(40.0)
    assert latency_efficiency(80, 2.0, w1=1, w2=4) == pytest.approx(10.0)


@pytest.mark.parametrize("args", [(90, 0), (90, -5), (90, math.nan), (101, 1e6), (math.nan, 1e6),
                                  (90, 1e6, 0, 1), (90, 1e6, 1, -1)])
def test_efficiency_rejects_bad_input(args):
    with pytest.raises(ConfigError):
        performance_efficiency(*args)
    with pytest.raises(ValueError):  # ConfigError is a ValueError too
        latency_efficiency(*args)


# ------------------------------------------------------------------------------------------- breakpoint
LEVELS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
ACCS = [90, 90, 89.9, 89.8, 89.5, 89, 88, 85, 75, 50]


def test_breakpoint_tolerance():
    bp = find_breakpoint(LEVELS, ACCS, tolerance=1.0)
    assert (bp.level, bp.index, bp.accuracy, bp.method, bp.tolerance) == (0.5, 5, 89.0, "tolerance", 1.0)
    assert find_breakpoint(LEVELS, ACCS, tolerance=0.3).level == 0.3
    assert find_breakpoint(LEVELS, ACCS, tolerance=100).level == 0.9
    # "stays within": a recovery after a drop does not count
    assert find_breakpoint([0, 0.5, 0.9], [90, 88, 89.5], tolerance=1).index == 0


def test_breakpoint_knows_its_noise():
    """A drop inside the repeats' spread is not a drop; the same drop with no spread is."""
    levels, accs = [0, 0.5, 0.9], [95.0, 93.5, 80.0]
    assert find_breakpoint(levels, accs, tolerance=1.0).level == 0.0
    assert find_breakpoint(levels, accs, tolerance=1.0, spreads=[0.0, 0.0, 0.0]).level == 0.0
    # 1.5-point drop, spreads 0.5 and 0.6: noise sqrt(0.25+0.36) = 0.78 > 0.5 beyond the tolerance
    assert find_breakpoint(levels, accs, tolerance=1.0, spreads=[0.5, 0.6, 1.0]).level == 0.5
    assert find_breakpoint(levels, accs, tolerance=1.0, spreads=[0.3, 0.3, 1.0]).level == 0.0  # 0.42 < 0.5
    lat = [3.0, 2.0, 1.0]
    assert latency_breakpoint(levels, accs, lat, tolerance=1.0).level == 0.0
    assert latency_breakpoint(levels, accs, lat, tolerance=1.0, spreads=[0.5, 0.6, 1.0]).level == 0.5
    with pytest.raises(ConfigError, match="length"):
        find_breakpoint(levels, accs, spreads=[0.1])


def test_breakpoint_knee_by_hand():
    # normalised height above the chord peaks at level 0.7 (0.653 vs 0.617 at 0.6 and 0.514 at 0.8)
    bp = find_breakpoint(LEVELS, ACCS, method="knee")
    assert (bp.level, bp.index, bp.accuracy, bp.method, bp.tolerance) == (0.7, 7, 85.0, "knee", None)
    assert find_breakpoint([0, 0.5, 0.9], [90, 90, 90], method="knee").level == 0.9  # never drops
    assert find_breakpoint([0, 0.5, 0.9], [90, 60, 50], method="knee").level == 0.0  # convex: no knee


def test_breakpoint_sorts_levels():
    order = [3, 9, 0, 5, 1, 8, 2, 7, 6, 4]
    bp = find_breakpoint([LEVELS[i] for i in order], [ACCS[i] for i in order], tolerance=1.0)
    assert (bp.level, bp.index, bp.accuracy) == (0.5, 5, 89.0)


@pytest.mark.parametrize("levels, accs, kw, match", [
    ([0, 0.5], [90], {}, "length"),
    ([], [], {}, "no pruning levels"),
    ([0, 0.5], [90, math.nan], {}, "NaN"),
    ([0, 0.5, 0.5], [90, 89, 88], {}, "duplicate"),
    ([0, 0.5], [90, 89], {"method": "elbow"}, "tolerance, knee"),
    ([0, 0.5], [90, 89], {"tolerance": -1}, "tolerance"),
])
def test_breakpoint_errors(levels, accs, kw, match):
    with pytest.raises(ConfigError, match=match):
        find_breakpoint(levels, accs, **kw)


def test_latency_breakpoint():
    lat = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    bp = latency_breakpoint(LEVELS, ACCS, lat, tolerance=1.0)
    assert (bp.level, bp.accuracy, bp.method) == (0.5, 89.0, "latency")
    # the fastest within tolerance need not be the highest level
    bp = latency_breakpoint([0, 0.3, 0.6], [90, 89.5, 89.2], [10, 4, 6], tolerance=1.0)
    assert bp.level == 0.3
    with pytest.raises(ConfigError, match="latencies"):
        latency_breakpoint([0, 0.3], [90, 89], [1, 0])
    with pytest.raises(ConfigError, match="length"):
        latency_breakpoint([0, 0.3], [90, 89], [1])
