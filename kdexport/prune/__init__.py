"""L1 pruning of distilled students: weight (torch.nn.utils.prune) and channel (Torch-Pruning 1.6.1).

- `prune_weights_` / `remove_masks_` / `rewind_weights_`: masks during fine-tuning, zeros baked in to save.
- `prune_channels_`: a physically slimmer dense module; kdexport.structure records and rebuilds its shapes, so
  a checkpoint never pickles a module.
- `prune_checkpoint`: load, prune in `steps` (geometric schedule), optionally rewind, fine-tune with the
  student's own objective, save with the "prune" (and "structure") spec, return the metrics.

Re-pruning is allowed: `amount` is a fraction of what remains. A weight-pruned checkpoint pruned by weight again
keeps its zeros (masked, so fine-tuning cannot revive them) and loses `amount` of its non-zero weights; a
channel-pruned one loses `amount` of its current channels; the two methods combine. Refused with one-line
CheckpointErrors: a checkpoint whose structure spec does not match its tensors, a resumable training state
file (*.state.pt), a state_dict with unbaked masks, an unknown kind, and for fine-tuning a missing teacher or
one that is not the student's (same model name and class count).
"""

from ..vocab import FINETUNE_SCOPES, METHODS, SCOPES
from .channel import L1Importance, ignored_layers, prune_channels, prune_channels_, replay_channels_
from .config import PruneConfig, step_amount
from .run import finetune_parts, load_prunable, prune_checkpoint
from .weight import has_masks, prunable_layers, prune_weights_, remove_masks_, rewind_weights_

__all__ = [
    "PruneConfig", "METHODS", "SCOPES", "FINETUNE_SCOPES", "step_amount",
    "prune_weights_", "remove_masks_", "rewind_weights_", "prunable_layers", "has_masks",
    "prune_channels_", "prune_channels", "replay_channels_", "ignored_layers", "L1Importance",
    "prune_checkpoint", "load_prunable", "finetune_parts",
]
