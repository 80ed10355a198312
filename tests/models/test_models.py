"""The model zoo: the feature/head contract for every registered model, torchvision parity, the registry."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from kdexport import models
from kdexport.models.errors import ModelError, PretrainedWeightsError
from kdexport.models.registry import load_pretrained_, register_model

ALL = models.list_models()
RELU_FINAL = [m for m in ALL if not m.startswith("efficientnet")]  # EfficientNet's last activation is SiLU
LENETS = {"lenet5", "lenet300_100"}  # no stem: their 32x32 maps do not depend on it
# the cifar stem on every family, but not on the largest members (slow to build, same code path)
CIFAR_STEM = [m for m in ALL if m not in {"resnet101", "resnet152", "densenet161", "densenet201",
                                          "efficientnet_b3", "efficientnet_b4", "efficientnet_b5"}]
TORCHVISION = [m for m in ALL if m not in LENETS | {"mobilenet"}]


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def check_contract(name: str, stem: str, x: torch.Tensor) -> tuple[int, int]:
    """Assert the contract SimKD and pruning rely on; return the feature map's spatial size."""
    return check_model_contract(models.create_model(name, num_classes=10, stem=stem).eval(), x, name in RELU_FINAL)


def check_model_contract(model: nn.Module, x: torch.Tensor, relu_final: bool) -> tuple[int, int]:
    assert isinstance(model.num_features, int) and model.num_features > 0
    head = model.get_classifier()
    assert isinstance(head, nn.Module)
    own = {id(p) for p in model.parameters()}
    assert list(head.parameters()) and {id(p) for p in head.parameters()} <= own
    with torch.inference_mode():
        feat = model.forward_features(x)
        assert feat.ndim == 4 and feat.shape[:2] == (2, model.num_features)
        if relu_final:
            assert feat.min() >= 0, "forward_features must include the final ReLU"
        logits = model.forward_head(feat)
        assert logits.shape == (2, 10)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    return tuple(feat.shape[-2:])


@pytest.mark.parametrize("name", ALL)
def test_contract_imagenet_stem(name, x):
    check_contract(name, "imagenet", x)


@pytest.mark.parametrize("pair", ["res101-res18", "dens169-mobilenet", "effb1-effb0", "res50-squeezenet"])
def test_contract_distilled_student(pair, x):
    """SimKD's deployed model is a zoo model too: projected map (ReLU-final) -> the teacher's classifier."""
    p = models.resolve_pair(pair)
    model = models.DistilledStudent.from_names(p.teacher, p.student, num_classes=10, stem="imagenet",
                                               input_size=(3, 32, 32)).eval()
    check_model_contract(model, x, relu_final=True)
    teacher = models.create_model(p.teacher, num_classes=10)
    assert model.num_features == teacher.num_features
    assert models.is_distilled(model) and not models.is_distilled(teacher)


@pytest.mark.parametrize("name", CIFAR_STEM)
def test_contract_cifar_stem_keeps_larger_maps(name, x):
    hw_cifar = check_contract(name, "cifar", x)
    if name in LENETS:
        return
    with torch.device("meta"):  # the imagenet-stem map size, without building real weights twice
        model = models.create_model(name, num_classes=10, stem="imagenet")
        hw_imagenet = tuple(model.forward_features(x.to("meta")).shape[-2:])
    assert hw_cifar[0] > hw_imagenet[0] and hw_cifar[1] > hw_imagenet[1]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_parity_at_1000_classes(name):
    """Same parameter count, state_dict keys and shapes, and module tree as torchvision's (built on meta: no init)."""
    with torch.device("meta"):
        ours = models.create_model(name, num_classes=1000)
        # the zoo builds EfficientNets without their training-only regularisers (models/efficientnet.py)
        no_regularisers = {"dropout": 0.0, "stochastic_depth_prob": 0.0} if name.startswith("efficientnet") else {}
        ref = getattr(torchvision.models, name)(weights=None, **no_regularisers)
        if name.startswith("squeezenet"):
            ref.classifier[2] = nn.Identity()  # no ReLU on the logits (models/squeezenet.py)
        for bn in ref.modules():  # EfficientNet-B5's BatchNorm keeps torch's momentum (models/efficientnet.py)
            if name == "efficientnet_b5" and isinstance(bn, nn.BatchNorm2d):
                assert (bn.eps, bn.momentum) == (0.001, 0.01)
                bn.momentum = 0.1
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(sd[k].shape == ref_sd[k].shape for k in sd)
    assert repr(ours) == repr(ref)  # strides, eps, dropout rates: everything torchvision prints


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_bottleneck_resnets_start_with_zero_residual_branches(name):
    """ResNet-50/101/152 zero every block's last BatchNorm scale (and say so in their revision, which enters every
    run identity); ResNet-18/34 keep torchvision's default init, under which they already train."""
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=10)
    bottleneck = name == "resnet50"
    last_bns = [m.bn3 if bottleneck else m.bn2 for m in model.modules()
                if isinstance(m, (torchvision.models.resnet.Bottleneck, torchvision.models.resnet.BasicBlock))]
    assert last_bns and all(bool((bn.weight == 0).all()) is bottleneck for bn in last_bns)
    assert models.model_revision(name) == int(bottleneck)
    assert {models.model_revision(n) for n in ("resnet101", "resnet152")} == {1}
    if bottleneck:  # each block is the identity at first: the residual branch adds exactly zero
        block = model.layer1[1].eval()
        h = torch.relu(torch.randn(1, 256, 8, 8))
        with torch.inference_mode():
            torch.testing.assert_close(block(h), h, rtol=0, atol=0)


def test_torchvision_list_is_complete():
    expected = {f"resnet{d}" for d in (18, 34, 50, 101, 152)} | {f"densenet{d}" for d in (161, 169, 201)}
    expected |= {f"efficientnet_b{i}" for i in range(6)} | {"mobilenet_v2", "squeezenet1_1"}
    assert set(TORCHVISION) == expected
    assert set(ALL) == expected | LENETS | {"mobilenet"}


def test_mobilenet_v1_parameter_count():
    with torch.device("meta"):
        model = models.create_model("mobilenet", num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 4_231_976  # Howard et al. 2017: 4.2M
    assert model.num_features == 1024


@pytest.fixture(scope="module")
def tv_resnet18_file(tmp_path_factory):
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("pretrained") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_load_pretrained_skips_the_new_head(tv_resnet18_file):
    path, state = tv_resnet18_file
    model = models.create_model("resnet18", num_classes=10, pretrained=path)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert model.fc.weight.shape == (10, 512)  # the 1000-class fc is not loaded


def test_load_pretrained_cifar_stem_skips_the_stem(tv_resnet18_file):
    path, state = tv_resnet18_file
    model = models.create_model("resnet18", num_classes=10, stem="cifar", pretrained=path)
    assert model.conv1.weight.shape == (64, 3, 3, 3)
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_load_pretrained_refuses_foreign_files(tmp_path):
    model = models.create_model("lenet5")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a state dict" * 64)
    pickled = tmp_path / "module.pth"
    torch.save(nn.Linear(2, 2), pickled)
    other = tmp_path / "other.pth"
    torch.save(models.create_model("lenet300_100").state_dict(), other)
    for path, match in [(garbage, "not a loadable state_dict"), (pickled, "not a loadable state_dict"),
                        (other, "unexpected keys"), (tmp_path / "missing.pth", "not found")]:
        with pytest.raises(PretrainedWeightsError, match=match):
            load_pretrained_(model, path)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ModelError) as info:
        models.create_model("resnet19")
    msg = str(info.value)
    assert "resnet19" in msg and all(name in msg for name in ALL)


@pytest.mark.parametrize("kwargs", [dict(stem="tiny"), dict(num_classes=0)])
def test_bad_options_are_config_errors(kwargs):
    with pytest.raises(ModelError):
        models.create_model("lenet5", **kwargs)


def test_duplicate_registration_is_an_error():
    def resnet18(num_classes, stem, input_size):  # same name as a registered model
        raise AssertionError("must not be registered")

    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet18)
    assert models.list_models() == ALL
    assert isinstance(models.create_model("resnet18"), nn.Module)


@pytest.mark.parametrize("name", ["squeezenet1_1", "mobilenet_v2", "efficientnet_b0", "densenet169"])
def test_pretrained_torchvision_weights_at_224_with_a_new_head(name, tmp_path):
    """A torchvision state_dict loads into the zoo model (ImageNet stem) with its classifier re-initialised for
    the user's class count, and at 224 px the backbone computes exactly what torchvision's does."""
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(weights=None).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(ref.state_dict(), path)
    model = models.create_model(name, num_classes=7, pretrained=path, input_size=(3, 224, 224)).eval()
    ours, theirs = model.state_dict(), ref.state_dict()
    head = {k for k in theirs if ours[k].shape != theirs[k].shape}
    assert head and all(k.startswith(model.classifier_attr) for k in head)  # only the classifier is new
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs if k not in head)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert model(x).shape == (1, 7)
        torch.testing.assert_close(model.forward_features(x), ref.features(x) if name != "densenet169" else
                                   torch.relu(ref.features(x)), rtol=0, atol=0)


def test_simkd_projector_is_3x3_on_the_7x7_maps_of_224_px():
    student = models.create_model("resnet18", 10, input_size=(3, 224, 224))
    assert models.projector_kernel(student, (3, 224, 224)) == 3
    assert models.projector_kernel(student, (3, 32, 32)) == 1  # a 1x1 map at 32 px
    distilled = models.DistilledStudent.from_names("resnet50", "resnet18", num_classes=10, stem="imagenet",
                                                   input_size=(3, 224, 224), projector_kernel=3).eval()
    with torch.no_grad():
        assert distilled.forward_features(torch.zeros(1, 3, 224, 224)).shape == (1, 2048, 7, 7)
