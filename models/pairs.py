"""Teacher-student pairs: the paper's ten, res50-squeezenet, and any "TEACHER:STUDENT"."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelError
from .registry import list_models


@dataclass(frozen=True)
class Pair:
    name: str
    teacher: str
    student: str


PAIRS: dict[str, Pair] = {
    p.name: p
    for p in [
        Pair("res101-res50", "resnet101", "resnet50"),
        Pair("res152-res34", "resnet152", "resnet34"),
        Pair("res101-res18", "resnet101", "resnet18"),
        Pair("dens169-mobilenet", "densenet169", "mobilenet"),
        Pair("dens161-dens169", "densenet161", "densenet169"),
        Pair("dens161-dens201", "densenet161", "densenet201"),
        Pair("effb1-effb0", "efficientnet_b1", "efficientnet_b0"),
        Pair("effb3-effb2", "efficientnet_b3", "efficientnet_b2"),
        Pair("effb3-mobilenet", "efficientnet_b3", "mobilenet"),
        Pair("effb5-effb4", "efficientnet_b5", "efficientnet_b4"),
        Pair("res50-squeezenet", "resnet50", "squeezenet1_1"),
    ]
}
PAPER_PAIRS = tuple(list(PAIRS)[:10])


def resolve_pair(name: str) -> Pair:
    """A registered pair by name, or an ad-hoc "TEACHER:STUDENT" of registered model names."""
    if name in PAIRS:
        return PAIRS[name]
    if ":" in name:
        teacher, student = name.split(":", 1)
        unknown = [m for m in (teacher, student) if m not in list_models()]
        if unknown:
            known = ", ".join(list_models())
            raise ModelError(f"unknown model {unknown[0]!r} in pair {name!r}; known models: {known}")
        return Pair(name, teacher, student)
    raise ModelError(f"unknown pair {name!r}; use one of {', '.join(PAIRS)} or TEACHER:STUDENT")
