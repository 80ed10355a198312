"""sparsify_ and the sparse layers: same logits as the dense pruned model, per-layer choices and reasons."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune
from torch.testing import assert_close

from kdexport.kernels import SparseConv2d, SparseLinear, SparsifyConfig, modules, sparsify_, sparsify_report
from kdexport.kernels.errors import KernelConfigError

pytest.importorskip("triton", reason="the module tests run the kernels in Triton's interpreter: install triton")


class SmallNet(nn.Module):
    """Every lowering: 3x3/s2 conv, 1x1 conv, strided 1x1 conv with bias, dilated conv, depthwise, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.depthwise = nn.Conv2d(48, 48, 3, padding=1, groups=48)
        self.reduce = nn.Conv2d(48, 24, 1, stride=2)
        self.dilated = nn.Conv2d(24, 24, 3, padding=2, dilation=2)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = self.expand(self.stem(x))
        x = torch.relu(self.reduce(self.depthwise(x)))
        x = torch.relu(self.dilated(x))
        return self.head(x.mean((2, 3)))


def prune_globally(model, amount=0.9, skip=()):
    """Global L1 unstructured pruning of conv/linear weights, then prune.remove (as kdexport saves them)."""
    layers = [(m, "weight") for name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in skip]
    prune.global_unstructured(layers, prune.L1Unstructured, amount=amount)
    for m, name in layers:
        prune.remove(m, name)
    return model


def trained_bn(model):
    """Non-trivial BatchNorm statistics, so that a wrong channel order shows in the logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_small_net_logits_match_through_the_interpreted_kernels(launches):
    torch.manual_seed(0)
    dense = trained_bn(prune_globally(SmallNet(), skip=("expand.0",)))
    model = copy.deepcopy(dense)
    sparsify_(model, SparsifyConfig())
    assert isinstance(model.stem[0], SparseConv2d) and isinstance(model.head, SparseLinear)
    assert isinstance(model.reduce, SparseConv2d) and isinstance(model.dilated, SparseConv2d)
    assert type(model.depthwise) is nn.Conv2d and type(model.expand[0]) is nn.Conv2d

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(x), dense(x), rtol=1e-4, atol=1e-5)
    assert [r[:3] for r in launches] == [(2 * 16 * 16, 16, 27), (2 * 8 * 8, 24, 48), (2 * 8 * 8, 24, 216),
                                         (2, 10, 24)]

    rows = {r["layer"]: r for r in sparsify_report(model)}
    assert list(rows) == ["stem.0", "expand.0", "depthwise", "reduce", "dilated", "head"]
    assert rows["depthwise"]["choice"] == "dense" and rows["depthwise"]["reason"] == "grouped conv"
    assert rows["expand.0"]["choice"] == "dense" and rows["expand.0"]["sparsity"] == 0.0
    assert "min_sparsity" in rows["expand.0"]["reason"]
    assert rows["head"] == {"layer": "head", "kind": "linear", "shape": [10, 24], "choice": "sparse",
                            "sparsity": rows["head"]["sparsity"], "reason": rows["head"]["reason"],
                            "dense_ms": None, "sparse_ms": None}
    assert rows["head"]["sparsity"] > 0.5 and "not timed (cpu)" in rows["head"]["reason"]


def test_resnet18_logits_match_on_the_reference_path(launches, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # plain CPU: every sparse layer runs sparse_matmul_ref
    torch.manual_seed(0)
    dense = trained_bn(prune_globally(torchvision.models.resnet18(num_classes=10)))
    model = copy.deepcopy(dense)
    sparsify_(model, SparsifyConfig(min_sparsity=0.5))
    report = sparsify_report(model)
    swapped = [r for r in report if r["choice"] == "sparse"]
    assert len(report) == 21 and len(swapped) >= 15  # 20 convs + fc; global 90% leaves a few layers denser
    assert all(r["sparsity"] >= 0.5 for r in swapped)
    assert all(r["reason"].startswith("sparsity") for r in report if r["choice"] == "dense")
    assert sum(isinstance(m, (SparseConv2d, SparseLinear)) for m in model.modules()) == len(swapped)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(x), dense(x), rtol=1e-4, atol=1e-5)
    assert launches == []


def test_sparsified_model_compiles_in_one_graph(launches):
    torch.manual_seed(0)
    dense = trained_bn(prune_globally(SmallNet()))
    model = copy.deepcopy(dense)
    sparsify_(model, SparsifyConfig())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # the op's fake impl gives shapes
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert_close(compiled(x), dense(x), rtol=1e-4, atol=1e-5)
    assert len(launches) == 5  # every layer but the depthwise conv


def test_sparse_layers_cast_to_their_dtype_and_back(launches):
    torch.manual_seed(0)
    linear = prune_globally(nn.Sequential(nn.Linear(40, 20)), 0.8)[0]
    half = SparseLinear.from_linear(linear, dtype=torch.float16, relu=True)
    assert half.values.dtype == torch.float16 and half.bias.dtype == torch.float16
    x = torch.randn(3, 5, 40)
    y = half(x)
    assert y.dtype == torch.float32 and y.shape == (3, 5, 20)
    assert_close(y, torch.relu(linear(x)), rtol=1e-2, atol=1e-2)
    assert len(launches) == 1


def test_sparse_conv_rejects_what_it_cannot_lower():
    with pytest.raises(ValueError, match="grouped conv"):
        SparseConv2d.from_conv(nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"))
    conv = SparseConv2d.from_conv(nn.Conv2d(8, 4, 3))
    with pytest.raises(ValueError, match="expected"):
        conv(torch.randn(1, 3, 8, 8))


def test_sparsify_on_a_bare_layer_is_a_config_error():
    with pytest.raises(KernelConfigError, match="nn.Sequential"):
        sparsify_(nn.Linear(4, 4), SparsifyConfig())
    assert sparsify_report(nn.Linear(4, 4)) == []


@pytest.mark.parametrize("kwargs", [
    {"min_sparsity": 1.5}, {"min_sparsity": -0.1}, {"batch_size": 0}, {"batch_size": 2.0},
    {"dtype": torch.int8}, {"speedup_margin": 0.0}, {"input_size": (3, 32)}, {"input_size": (3, 0, 32)},
    {"block_n": 48}, {"encoding": "bsr"},
])
def test_config_validation(kwargs):
    with pytest.raises(KernelConfigError):
        SparsifyConfig(**kwargs)


def test_measured_choices_follow_the_speedup_margin(monkeypatch):
    """The CUDA timing decision, with the clock replaced: convs 0.85x dense (kept), the head 0.95x (not)."""
    model = prune_globally(SmallNet())
    model.unused = nn.Linear(8, 8)  # pruned, but never called by forward
    with torch.no_grad():
        model.unused.weight[:, 1:] = 0
    monkeypatch.setattr(modules, "_measuring", lambda model, config: True)
    fake_ms = {nn.Conv2d: 1.0, nn.Linear: 1.0, SparseConv2d: 0.85, SparseLinear: 0.95}
    monkeypatch.setattr(modules, "_median_ms", lambda fn, x: fake_ms[type(fn)])
    sparsify_(model, SparsifyConfig(input_size=(3, 16, 16)))
    rows = {r["layer"]: r for r in sparsify_report(model)}
    for name in ("stem.0", "expand.0", "reduce", "dilated"):
        assert rows[name]["choice"] == "sparse" and (rows[name]["dense_ms"], rows[name]["sparse_ms"]) == (1.0, 0.85)
    assert rows["head"]["choice"] == "dense" and "not < 0.9x" in rows["head"]["reason"]
    assert rows["unused"]["choice"] == "dense" and rows["unused"]["reason"].startswith("not reached")
    assert type(model.head) is nn.Linear and isinstance(model.dilated, SparseConv2d)


def test_measuring_pass_records_shapes_without_touching_training_state():
    model = SmallNet().train()
    model.head.eval()  # a mixed-mode model must come back as it was
    before = copy.deepcopy(model.state_dict())
    layers = [model.stem[0], model.reduce, model.head]
    shapes = modules._input_shapes(model, layers, SparsifyConfig(batch_size=3, input_size=(3, 16, 16)))
    assert shapes == {"stem.0": (3, 3, 16, 16), "reduce": (3, 48, 8, 8), "head": (3, 24)}
    assert model.training and model.stem.training and not model.head.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN statistics unchanged


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_measured_sparsify_on_gpu(dtype, launches):
    torch.manual_seed(0)
    dense = trained_bn(prune_globally(torchvision.models.resnet18(num_classes=10))).cuda().to(dtype)
    model = copy.deepcopy(dense)
    sparsify_(model, SparsifyConfig(batch_size=1, input_size=(3, 64, 64)))
    for row in sparsify_report(model):
        if row["reason"].startswith("sparse "):
            faster = row["sparse_ms"] < 0.9 * row["dense_ms"]
            assert row["choice"] == ("sparse" if faster else "dense")
    assert launches and all(r[4] == "cuda" for r in launches)
    x = torch.randn(1, 3, 64, 64, device="cuda", dtype=dtype)
    tol = {"rtol": 1e-3, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    with torch.no_grad():
        assert_close(model(x), dense(x), **tol)
