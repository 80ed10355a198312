"""Teacher-student pairs: the paper's ten plus res50-squeezenet, and ad-hoc TEACHER:STUDENT names."""

from __future__ import annotations

import dataclasses

import pytest

from kdexport import models
from kdexport.models.errors import ModelError
from kdexport.models.pairs import PAIRS, PAPER_PAIRS, Pair, resolve_pair

EXPECTED = {
    "res101-res50": ("resnet101", "resnet50"),
    "res152-res34": ("resnet152", "resnet34"),
    "res101-res18": ("resnet101", "resnet18"),
    "dens169-mobilenet": ("densenet169", "mobilenet"),
    "dens161-dens169": ("densenet161", "densenet169"),
    "dens161-dens201": ("densenet161", "densenet201"),
    "effb1-effb0": ("efficientnet_b1", "efficientnet_b0"),
    "effb3-effb2": ("efficientnet_b3", "efficientnet_b2"),
    "effb3-mobilenet": ("efficientnet_b3", "mobilenet"),
    "effb5-effb4": ("efficientnet_b5", "efficientnet_b4"),
    "res50-squeezenet": ("resnet50", "squeezenet1_1"),
}


def test_the_eleven_pairs():
    assert {name: (p.teacher, p.student) for name, p in PAIRS.items()} == EXPECTED
    assert all(p.name == name for name, p in PAIRS.items())
    known = set(models.list_models())
    assert all({p.teacher, p.student} <= known for p in PAIRS.values())


def test_paper_pairs_are_the_first_ten():
    assert len(PAPER_PAIRS) == 10 and "res50-squeezenet" not in PAPER_PAIRS
    assert set(PAPER_PAIRS) < set(PAIRS)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_resolve_named_pair(name):
    assert resolve_pair(name) == Pair(name, *EXPECTED[name])


def test_resolve_teacher_colon_student():
    pair = resolve_pair("resnet18:lenet5")
    assert (pair.name, pair.teacher, pair.student) == ("resnet18:lenet5", "resnet18", "lenet5")


def test_pair_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PAIRS["res101-res18"].student = "lenet5"  # type: ignore[misc]


def test_unknown_pair_names_the_choices():
    with pytest.raises(ModelError) as info:
        resolve_pair("res101-res17")
    msg = str(info.value)
    assert "res101-res17" in msg and "res101-res18" in msg and "TEACHER:STUDENT" in msg and "\n" not in msg


@pytest.mark.parametrize("name, bad", [("resnet18:lenet6", "lenet6"), ("vgg16:lenet5", "vgg16"), (":lenet5", "")])
def test_unknown_model_in_teacher_colon_student(name, bad):
    with pytest.raises(ModelError) as info:
        resolve_pair(name)
    msg = str(info.value)
    assert f"unknown model {bad!r}" in msg and "resnet18" in msg and "lenet300_100" in msg
