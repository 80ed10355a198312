"""Image folders that stream from disk: torchvision's ImageFolder, decoded lazily, with ImageNet-style transforms.

Layout: <root>/train/<class>/<image>, <root>/test/<class>/<image> and, optionally, <root>/val/<class>/<image>.
Nothing is decoded up front, so memory does not grow with the number of images; each image is decoded when a
batch needs it, in the DataLoader's worker processes when there are any.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from .errors import DataError, UnreadableImage

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EVAL_CROP = 0.875  # evaluation resizes the shorter side to size / 0.875, then crops the centre (224 of 256)


def load_rgb(path: str) -> Image.Image:
    """Decode one image as RGB (grayscale, palette and RGBA images are converted); one line naming a bad file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"cannot decode image {path} ({type(exc).__name__}: {exc}); replace or delete the "
                              "file") from None


def eval_resize(size: Sequence[int]) -> int:
    """The shorter side an image is resized to before the evaluation crop of `size` (H, W)."""
    return round(max(size) / EVAL_CROP)


def folder_transform(size: Sequence[int], train: bool) -> v2.Compose:
    """ImageNet-style transforms at `size` (H, W): RandomResizedCrop + flip for training, Resize + CenterCrop for
    evaluation, then float in [0, 1] normalised with ImageNet's statistics."""
    size = tuple(size)
    geometry = ([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()] if train else
                [v2.Resize(eval_resize(size), antialias=True), v2.CenterCrop(size)])
    return v2.Compose([*geometry, v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def folder_classes(path: Path) -> list[str]:
    """The class folders of one split, sorted (ImageFolder's order)."""
    if not path.is_dir():
        raise DataError(f"imagefolder: expected {path}/<class>/<image> folders (and test/, optionally val/)")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"imagefolder: {path} has no class folders; expected {path}/<class>/<image>")
    return classes


def image_folder(root: Path, split: str, size: Sequence[int], train: bool) -> ImageFolder:
    """One split of an image folder (train/, val/ or test/), lazily decoded with `folder_transform`.

    Every split must have train/'s classes, and every class folder at least one image (extensions as
    torchvision's ImageFolder: .jpg .jpeg .png .bmp .webp .tif .tiff .ppm .pgm).
    """
    classes = folder_classes(root / "train")
    folder = root / split
    if split != "train" and (found := folder_classes(folder)) != classes:
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise DataError(f"imagefolder: {folder} has other classes than {root / 'train'} ("
                        + "; ".join(f"{what}: {', '.join(names[:3])}" + (" ..." if len(names) > 3 else "")
                                    for what, names in (("only here", extra), ("missing here", missing)) if names)
                        + "); give every split the same class folders")
    ds = ImageFolder(str(folder), transform=folder_transform(size, train), loader=load_rgb, allow_empty=True)
    counts = torch.bincount(torch.tensor(ds.targets, dtype=torch.long), minlength=len(classes))
    if (empty := [c for c, n in zip(classes, counts.tolist(), strict=True) if n == 0]):
        raise DataError(f"imagefolder: class folder {folder / empty[0]} has no images "
                        f"({' '.join(IMG_EXTENSIONS[:5])} ...); add images or remove the folder from every split")
    return ds


def write_image_folder(root: str | Path, *, classes: int = 3, per_class: dict[str, int] | None = None,
                       size: tuple[int, int] = (192, 256), seed: int = 0, grayscale: int = 0,
                       corrupt: int = 0) -> Path:
    """Generate an image folder in the real layout (tests and benchmarks): <root>/<split>/class<k>/<i>.jpg|.png.

    Each class has its own colour under smooth noise, so a model can learn it. Sizes vary around `size` (W, H;
    non-square, every image different), files alternate JPEG and PNG; the first `grayscale` training images are
    single-channel, and `corrupt` more training files are truncated JPEGs that no decoder reads.
    """
    root, rng = Path(root), np.random.default_rng(seed)
    per_class = per_class or {"train": 8, "test": 2}
    colours = rng.uniform(40, 215, size=(classes, 3))
    n = 0
    for split, count in per_class.items():
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = (int(s * rng.uniform(0.75, 1.25)) for s in size)
                noise = rng.normal(0, 40, size=(max(2, h // 16), max(2, w // 16), 3))
                small = Image.fromarray(np.clip(colours[k] + noise, 0, 255).astype(np.uint8))
                image = small.resize((w, h), Image.BILINEAR)
                if split == "train" and n < grayscale:
                    image = image.convert("L")
                name = folder / f"{i}.{'png' if (i + k) % 4 == 3 else 'jpg'}"
                image.save(name, **({"quality": 90} if name.suffix == ".jpg" else {}))
                n += 1
    for j in range(corrupt):
        bad = root / "train" / f"class{j % classes}" / f"corrupt{j}.jpg"
        image.save(bad, quality=90)
        bad.write_bytes(bad.read_bytes()[:200])
    return root
