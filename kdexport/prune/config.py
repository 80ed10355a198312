"""PruneConfig: what to prune, how much, in which scope, in how many steps."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..vocab import METHODS, SCOPES


@dataclass(frozen=True)
class PruneConfig:
    """L1 pruning settings.

    - `amount`: fraction in [0, 1) of what is still there to remove: the non-zero conv/linear weights
      (weight; weights already zero count as pruned and stay zero), or each group's current channels (channel).
    - `scope`: "global" ranks all layers together, "layer" prunes every layer by `amount`. Default: global for
      weights (as the paper), layer for channels: raw L1 filter norms differ in scale from layer to layer, and
      one global ranking of them empties whole layers (50% of ResNet-18's channels by global L1 at init
      removes 98% of its parameters, layer by layer it removes 75%).
    - `round_to`: channel pruning keeps a multiple of this many channels per layer (1: no rounding).
    - `steps`: iterative pruning, each step removing 1 - (1 - amount) ** (1 / steps) of what remains, with
      fine-tuning between steps (in `prune_checkpoint`); without training between, k steps equal one.
    - `min_layer_density`: global weight pruning keeps at least this fraction of every layer's weights
      (0: plain global L1; at most 1 - amount is used). Without it, 90% global L1 emptied a SimKD projector
      and left the student at chance.
    - `rewind`: lottery-ticket rewinding, after each pruning step the survivors go back to their
      post-distillation values (the input checkpoint's) before fine-tuning; a no-op when steps == 1.
    """

    method: str = "weight"
    amount: float = 0.5
    scope: str | None = None
    round_to: int = 8
    steps: int = 1
    rewind: bool = False
    min_layer_density: float = 0.02

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown pruning method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if isinstance(self.amount, bool) or not isinstance(self.amount, int | float) or not (
                math.isfinite(self.amount) and 0 <= self.amount < 1):
            raise ConfigError(f"--amount must be a fraction in [0, 1), got {self.amount!r}")
        if self.scope is None:
            object.__setattr__(self, "scope", "global" if self.method == "weight" else "layer")
        if self.scope not in SCOPES:
            raise ConfigError(f"unknown pruning scope {self.scope!r}; choose one of: {', '.join(SCOPES)}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"--round-to must be an integer >= 1 (1: no rounding), got {self.round_to!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"--steps must be an integer >= 1, got {self.steps!r}")
        if isinstance(self.min_layer_density, bool) or not isinstance(self.min_layer_density, int | float) or not (
                0 <= self.min_layer_density <= 1):
            raise ConfigError(f"min_layer_density must be a fraction in [0, 1], got {self.min_layer_density!r}")
        if not isinstance(self.rewind, bool):
            raise ConfigError(f"rewind must be true or false, got {self.rewind!r}")
        object.__setattr__(self, "amount", float(self.amount))

    def step_amount(self) -> float:
        """The fraction of what remains that each of the `steps` steps removes."""
        return step_amount(self.amount, self.steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def step_amount(amount: float, steps: int) -> float:
    """Geometric schedule: removing this fraction of the remainder `steps` times leaves 1 - amount."""
    return 1.0 - (1.0 - amount) ** (1.0 / steps)
