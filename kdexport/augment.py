"""Batched augmentations of in-memory image tensors (the digits' handwriting distortions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class AffineAugmented(Dataset):
    """Handwriting augmentation on normalised tensors: a random rotation (±`degrees`), scaling (`scale`) and shift
    (±`translate` of the side) per image, bilinear, with the uncovered border at `fill` (the normalised black).

    The standard augmentation for handwritten digits (elastic and affine distortions, Simard et al. 2003). A
    DataLoader fetches a whole batch through `__getitems__`, which transforms it in one `grid_sample`: per image
    it costs about as much as a padded crop, where torchvision's per-image RandomAffine cost ~20x more here.
    Draws from torch's global RNG, like `data.memory_transform`, so a seeded run repeats and a resumed one continues.
    """

    def __init__(self, base: Dataset, fill: torch.Tensor, degrees: float = 10.0, translate: float = 0.1,
                 scale: tuple[float, float] = (0.9, 1.1)):
        self.base, self.fill = base, fill.view(1, -1, 1, 1)
        self.degrees, self.translate, self.scale = degrees, translate, scale

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        items = [self.base[i] for i in indices]
        x = torch.stack([item[0] for item in items])
        return list(zip(self.transform(x), (item[1] for item in items), strict=True))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        angle = torch.empty(n).uniform_(-self.degrees, self.degrees).deg2rad()
        zoom = torch.empty(n).uniform_(*self.scale)
        shift = torch.empty(n, 2).uniform_(-2 * self.translate, 2 * self.translate)  # grid units: the side is 2
        cos, sin = angle.cos() / zoom, angle.sin() / zoom
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x - self.fill, grid, align_corners=False) + self.fill
