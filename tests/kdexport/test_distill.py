"""kdexport.distill: SimKD training signal, the deployed DistilledStudent, projector, alignment, vanilla KD."""

from __future__ import annotations

import copy
import dataclasses
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdexport import models
from kdexport.data import get_dataset, sample_batch
from kdexport.distill import (
    DistillConfig,
    DistilledStudent,
    TeacherMemo,
    align,
    build_projector,
    distill,
    distillation_step,
    kd_loss,
)
from kdexport.errors import CheckpointError, ConfigError
from kdexport.prune import PruneConfig, prune_checkpoint
from kdexport.train import get_recipe


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_simkd_loss_decreases():
    """Ten SGD steps of the real SimKD step (resnet18 teacher, lenet5 student) on 64 digits lower the MSE."""
    torch.manual_seed(0)
    teacher = models.create_model("resnet18")
    student = DistilledStudent.from_models(teacher, models.create_model("lenet5"))
    step = distillation_step(student, teacher, "simkd")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = sample_batch("digits", 64, split="train")
    y = torch.zeros(64, dtype=torch.long)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    student.train()
    losses = []
    for _ in range(10):
        loss, logits = step(student, x, y)
        assert logits.shape == (64, 10) and not logits.requires_grad
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in student.head.parameters())


@pytest.fixture(scope="module")
def dens_mobile():
    torch.manual_seed(0)
    teacher = models.create_model("densenet169")
    student = models.create_model("mobilenet")
    backbone = n_params(student) - n_params(student.get_classifier())
    return teacher, DistilledStudent.from_models(teacher, student, projector_factor=2), backbone


def test_distilled_student_holds_no_teacher_backbone(dens_mobile):
    teacher, ds, backbone = dens_mobile
    expected = backbone + n_params(ds.projector) + n_params(teacher.get_classifier())
    assert n_params(ds) == expected
    assert n_params(ds.head) == 1664 * 10 + 10 and n_params(ds.student) == backbone
    assert isinstance(ds.student.get_classifier(), nn.Identity)  # the student's own classifier is dropped
    own = {id(p) for p in ds.parameters()}
    parts = [*ds.student.parameters(), *ds.projector.parameters(), *ds.head.parameters()]
    assert own == {id(p) for p in parts} and len(own) == len(parts)
    assert not own & {id(p) for p in teacher.parameters()}  # the head is a copy, not the teacher's tensor
    torch.testing.assert_close(ds.head.classifier.weight, teacher.get_classifier().weight)
    keys = list(ds.state_dict())
    assert not any("denseblock" in k or "transition" in k for k in keys)
    assert {k.split(".")[0] for k in keys} == {"student", "projector", "head"}


def test_distilled_forward_is_student_projector_head(dens_mobile, digits_x):
    _, ds, _ = dens_mobile
    ds.eval()
    with torch.inference_mode():
        out = ds(digits_x)
        torch.testing.assert_close(out, ds.head(ds.projector(ds.student.forward_features(digits_x))))
    assert out.shape == (2, 10)


def test_head_frozen_and_its_dropout_off_in_train_mode(digits_x):
    torch.manual_seed(0)
    teacher = models.create_model("efficientnet_b0")  # its classifier starts with Dropout(0.2)
    ds = DistilledStudent.from_models(teacher, models.create_model("lenet5"))
    assert isinstance(ds.head.classifier[0], nn.Dropout)
    assert not any(p.requires_grad for p in ds.head.parameters())
    assert all(p.requires_grad for p in ds.student.parameters()) and all(
        p.requires_grad for p in ds.projector.parameters())
    ds.train()
    assert ds.training and ds.student.training and ds.projector.training and not ds.head.training
    feat = torch.rand(4, 1280, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(ds.head(feat), ds.head(feat), rtol=0, atol=0)


def test_projector_structure():
    proj = build_projector(120, 512, factor=2)
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 3
    convs = [m for m in proj if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (120, 256, (1, 1)), (256, 256, (3, 3)), (256, 512, (1, 1))]
    assert convs[1].padding == (1, 1) and all(c.bias is None for c in convs)
    assert proj[-3] is convs[-1]  # the last conv, which channel pruning must leave alone
    assert build_projector(120, 512, factor=4)[0].out_channels == 128
    out = proj(torch.rand(2, 120, 3, 3))
    assert out.shape == (2, 512, 3, 3) and out.min() >= 0


def test_projector_kernel_follows_the_students_last_map():
    """1x1 where the student ends at 1x1 (every zoo student at 32 px, ImageNet stem); 3x3 where the map has extent."""
    assert models.projector_kernel(models.create_model("mobilenet"), (3, 32, 32)) == 1
    assert models.projector_kernel(models.create_model("resnet18"), (3, 64, 64)) == 3
    wide = models.create_model("resnet18", stem="cifar", input_size=(3, 32, 32)).train()
    assert models.projector_kernel(wide, (3, 32, 32)) == 3 and wide.training  # mode restored


def test_a_1x1_projector_computes_what_a_3x3_one_computes_on_1x1_maps():
    """The eight outer taps of a padded 3x3 conv only ever multiply padding on a 1x1 map."""
    torch.manual_seed(0)
    p3 = build_projector(16, 32, kernel=3).eval()
    torch.manual_seed(0)
    p1 = build_projector(16, 32, kernel=1).eval()  # starts as the 3x3 conv's centre tap: the same start
    assert torch.equal(p1[3].weight, p3[3].weight[:, :, 1:2, 1:2]) and torch.equal(p1[0].weight, p3[0].weight)
    x = torch.randn(4, 16, 1, 1)
    torch.testing.assert_close(p1(x), p3(x))
    assert n_params(p3) - n_params(p1) == 16 * 16 * 8
    with pytest.raises(models.ModelError, match="1x1 or 3x3"):
        build_projector(16, 32, kernel=5)


def test_distilled_checkpoints_record_their_projector_kernel(teacher_ckpt, tmp_path):
    """A new SimKD checkpoint records its kernel; a spec without one (written before) rebuilds the 3x3 projector."""
    from kdexport.checkpoint import build_model, load_checkpoint

    out = tmp_path / "s.pt"
    distill(teacher_ckpt, "lenet5:mobilenet", out, config=DistillConfig(), recipe=get_recipe("simkd"), epochs=1)
    _, spec = load_checkpoint(out)
    assert spec["projector_kernel"] == 1
    assert build_model(spec).projector[3].kernel_size == (1, 1)
    old = {k: v for k, v in spec.items() if k != "projector_kernel"}
    assert build_model(old).projector[3].kernel_size == (3, 3)


def test_res101_res18_projector_outweighs_the_student():
    """The DESIGN's warning: with f=2 the projector (~12.07M) is larger than ResNet-18's backbone."""
    proj = n_params(build_projector(512, 2048, factor=2))
    assert proj == 512 * 1024 + 1024 * 1024 * 9 + 1024 * 2048 + 2 * (1024 + 1024 + 2048) == 12_066_816
    with torch.device("meta"):
        r18 = models.create_model("resnet18")
    assert proj > n_params(r18) - n_params(r18.fc) == 11_176_512


def test_align_pools_the_larger_map():
    big = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    small = torch.rand(2, 3, 2, 2)
    a, b = align(big, small)
    assert a.shape == b.shape == (2, 3, 2, 2) and torch.equal(b, small)
    torch.testing.assert_close(a, F.avg_pool2d(big, 2))
    b2, a2 = align(small, big)
    assert torch.equal(b2, small) and torch.equal(a2, a)
    wide = torch.rand(2, 3, 2, 6)  # pooled per axis: to (2, 4) against a (4, 4) map
    assert [t.shape[-2:] for t in align(wide, big)] == [(2, 4), (2, 4)]
    same = torch.rand(2, 3, 4, 4)
    assert align(big, same) == (big, same)


def test_vanilla_kd_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    ls, lt = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    y = torch.tensor([1, 2, 3, 9])
    t, alpha = 4.0, 0.9
    p_t = (lt / t).exp() / (lt / t).exp().sum(1, keepdim=True)
    log_p_s = ls / t - (ls / t).exp().sum(1, keepdim=True).log()
    kl = (p_t * (p_t.log() - log_p_s)).sum() / 4
    ce = -(ls - ls.exp().sum(1, keepdim=True).log())[torch.arange(4), y].mean()
    torch.testing.assert_close(kd_loss(ls, lt, y, t, alpha), alpha * t * t * kl + (1 - alpha) * ce)
    torch.testing.assert_close(kd_loss(ls, ls, y, t, 1.0), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_kd_step_uses_teacher_logits(digits_x):
    torch.manual_seed(0)
    teacher, student = models.create_model("lenet5"), models.create_model("lenet300_100")
    step = distillation_step(student, teacher, "kd", temperature=2.0, alpha=0.5)
    y = torch.tensor([0, 1])
    loss, logits = step(student, digits_x, y)
    with torch.no_grad():
        expected = kd_loss(student(digits_x), teacher(digits_x), y, 2.0, 0.5)
    torch.testing.assert_close(loss.detach(), expected)
    assert logits.shape == (2, 10) and loss.requires_grad


def test_simkd_cls_weight_adds_cross_entropy_through_the_frozen_head(digits_x):
    torch.manual_seed(0)
    teacher = models.create_model("lenet5")
    ds = DistilledStudent.from_models(teacher, models.create_model("lenet300_100")).eval()
    y = torch.tensor([3, 7])
    mse, logits0 = distillation_step(ds, teacher, "simkd")(ds, digits_x, y)
    both, logits = distillation_step(ds, teacher, "simkd", cls_weight=0.5)(ds, digits_x, y)
    torch.testing.assert_close(logits, logits0)
    torch.testing.assert_close(both - mse, 0.5 * F.cross_entropy(logits, y))
    both.backward()
    assert all(p.grad is None for p in ds.head.parameters())
    assert ds.projector[0].weight.grad.abs().sum() > 0 and ds.student.features[1].weight.grad is not None


def test_simkd_needs_a_distilled_student():
    with pytest.raises(ConfigError, match="DistilledStudent"):
        distillation_step(models.create_model("lenet300_100"), models.create_model("lenet5"), "simkd")


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="fitnet"), "fitnet"), (dict(projector_factor=0), "projector-factor"),
    (dict(temperature=0.0), "temperature"), (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"),
    (dict(cls_weight=-1.0), "cls-weight"),
])
def test_distill_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DistillConfig(**kwargs)


def test_distill_config_defaults_and_frozen():
    config = DistillConfig()
    assert (config.method, config.projector_factor, config.temperature, config.alpha) == ("simkd", 2, 4.0, 0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.alpha = 0.5  # type: ignore[misc]


def test_distill_refuses_a_teacher_of_another_pair(teacher_ckpt, tmp_path):
    kw = dict(config=DistillConfig(), recipe=get_recipe("simkd"), epochs=1, device="cpu")
    with pytest.raises(CheckpointError, match="needs teacher resnet101"):
        distill(teacher_ckpt, "res101-res18", tmp_path / "s.pt", **kw)
    with pytest.raises(models.ModelError, match="unknown pair"):
        distill(teacher_ckpt, "nope", tmp_path / "s.pt", **kw)
    with pytest.raises(CheckpointError, match="not found"):
        distill(tmp_path / "missing.pt", "lenet5:lenet300_100", tmp_path / "s.pt", **kw)
    assert list(tmp_path.iterdir()) == []


def test_teacher_memo_is_exact_keyed_by_weights_and_input(digits_x):
    """A hit is the teacher's own output for the same weights and batch; other weights or inputs are misses."""
    TeacherMemo.clear()
    torch.manual_seed(0)
    teacher = models.create_model("lenet5").eval()
    first = TeacherMemo(teacher).forward_features(digits_x)
    assert torch.equal(first, teacher.forward_features(digits_x))
    again = TeacherMemo(copy.deepcopy(teacher)).forward_features(digits_x.clone())  # a reload, the same batch
    assert again is first and (TeacherMemo.hits, TeacherMemo.misses) == (1, 1)
    assert torch.equal(TeacherMemo(teacher)(digits_x), teacher(digits_x))  # logits are keyed apart from features
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.parameters())[0].add_(1.0)
    assert not torch.equal(TeacherMemo(other).forward_features(digits_x), first)
    assert not torch.equal(TeacherMemo(teacher).forward_features(digits_x.flip(-1)), first)
    assert TeacherMemo.misses == 4
    TeacherMemo.clear()


def test_teacher_memo_stays_within_its_bytes(digits_x, monkeypatch):
    TeacherMemo.clear()
    teacher = models.create_model("lenet5").eval()
    one = teacher.forward_features(digits_x).nbytes
    monkeypatch.setattr(TeacherMemo, "MAX_BYTES", 2 * one)
    memo = TeacherMemo(teacher)
    for shift in range(5):
        memo.forward_features(digits_x.roll(shift, -1))
    assert len(TeacherMemo._store) == 2 and TeacherMemo._bytes == 2 * one
    memo.forward_features(digits_x.roll(4, -1))  # the most recent survives
    assert TeacherMemo.hits == 1
    TeacherMemo.clear()


def test_fine_tuning_after_distillation_reuses_the_teachers_outputs(teacher_ckpt, tmp_path):
    """Distillation and fine-tuning start their loaders from the same seed and draw the same batches, so in one
    process the teacher runs once per batch: what makes compress's fine-tuning cheap (and exact)."""
    TeacherMemo.clear()
    shutil.copy(teacher_ckpt, tmp_path / "teacher.pt")
    student = tmp_path / "student.pt"
    distill(tmp_path / "teacher.pt", "lenet5:lenet5", student, config=DistillConfig(), recipe=get_recipe("cosine"),
            epochs=1, seed=3)
    batches = TeacherMemo.misses
    assert batches == len(get_dataset("digits", "train")) // get_recipe("cosine").batch_size  # full batches only
    assert TeacherMemo.hits == 0
    prune_checkpoint(student, PruneConfig("weight", 0.5), tmp_path / "w.pt", finetune_epochs=1, seed=3)
    assert (TeacherMemo.hits, TeacherMemo.misses) == (batches, batches)
    TeacherMemo.clear()
