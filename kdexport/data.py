"""Datasets, all yielding normalised 3xHxW float tensors: digits (embedded default), CIFAR-10/100, MNIST, image folders.

Digits, CIFAR and MNIST are small and held in memory at 32x32 (another image size resizes each image as it is
read, `memory_transform`); image folders stream from disk at the chosen size (`kdexport.imagefolder`). Nothing
is downloaded unless the user passes `download=True` (`--download`).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision.transforms import v2

from .augment import AffineAugmented
from .errors import ConfigError, DataError
from .imagefolder import IMAGENET_MEAN, IMAGENET_STD, folder_classes, image_folder

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "imagefolder")
SPLITS = ("train", "val", "test")
# Validation is carved out of the training part; 15% of digits' 1,437 training images is 216, the test split's 360
# images stay exactly as they were.
DEFAULT_VAL_FRACTION = 0.15
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 4096
FOLDER_IMAGE_SIZE = 224  # image folders' default: the convention of pretrained torchvision weights
IN_MEMORY = ("digits", "cifar10", "cifar100", "mnist")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    flip: bool  # horizontal flips are a valid augmentation (not for digits)
    affine: bool = False  # augment with small rotations, scalings and shifts (handwriting) instead of padded crops

    @property
    def augmentation(self) -> str:
        """What training augments with: part of a run's identity, so a run made with another is not reused."""
        if self.name == "imagefolder":
            return "resized-crop+flip"
        return "affine" if self.affine else "crop+flip" if self.flip else "crop"


_INFO = {
    "digits": DatasetInfo("digits", 10, (3, 32, 32), (0.3054,) * 3, (0.3237,) * 3, False, affine=True),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    "mnist": DatasetInfo("mnist", 10, (3, 32, 32), (0.1307,) * 3, (0.3081,) * 3, False),
}


def parse_image_size(value: str | int | Sequence[int] | None) -> tuple[int, int] | None:
    """`--image-size`: N (square) or H,W, each side in 32..4096 -> (H, W); None stays None (the default)."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            sides = tuple(int(p) for p in value.replace("x", ",").split(","))
        else:
            sides = (value,) if isinstance(value, int) else tuple(value)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in sides):
                raise ValueError
    except ValueError:
        sides = ()
    if len(sides) == 1:
        sides *= 2
    if len(sides) != 2 or min(sides) < MIN_IMAGE_SIZE or max(sides) > MAX_IMAGE_SIZE:
        raise ConfigError(f"--image-size must be N or H,W with every side a whole number >= {MIN_IMAGE_SIZE} "
                          f"(and <= {MAX_IMAGE_SIZE}; e.g. 224 or 192,256), got {value!r}")
    return sides


def default_image_size(name: str) -> tuple[int, int]:
    """32 for digits, CIFAR and MNIST (their native size); 224 for image folders."""
    return (FOLDER_IMAGE_SIZE,) * 2 if name == "imagefolder" else (32, 32)


def size_field(name: str, input_size: Sequence[int]) -> tuple[int, int] | None:
    """(H, W) of `input_size` when it is not `name`'s default size, else None: what a run identity records."""
    size = tuple(int(s) for s in input_size)[-2:]
    return None if size == default_image_size(name) else size


def check_image_size(given, recorded: Sequence[int], what: str) -> tuple[int, int]:
    """The size a checkpoint was made at ((C,) H, W recorded in its spec); an explicit size must agree with it."""
    recorded = tuple(int(s) for s in recorded)[-2:]
    size = parse_image_size(given)
    if size is not None and size != recorded:
        raise ConfigError(f"{what} was made at {recorded[0]}x{recorded[1]} px, not {size[0]}x{size[1]}: drop "
                          "--image-size (the size comes from the checkpoint) or train one at that size")
    return recorded


def dataset_info(name: str, root: str | Path | None = None, image_size=None) -> DatasetInfo:
    """What a model for `name` needs to know; `image_size` (N, (H, W) or "H,W") overrides the default size."""
    size = parse_image_size(image_size) or default_image_size(name)
    if name == "imagefolder":
        classes = folder_classes(_require_root(name, root) / "train")
        return DatasetInfo("imagefolder", len(classes), (3, *size), IMAGENET_MEAN, IMAGENET_STD, True)
    if name not in _INFO:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return dataclasses.replace(_INFO[name], input_size=(3, *size))


def default_workers(name: str) -> int:
    """DataLoader workers: none for the in-memory datasets (nothing to decode); for image folders one per core
    this process may use, less one for the training loop, at most 8."""
    if name in IN_MEMORY:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores - 1))


def check_workers(workers: int | None, name: str) -> int:
    if workers is None:
        return default_workers(name)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"--workers must be a whole number >= 0, got {workers!r}")
    return workers


class Transformed(Dataset):
    """A dataset of (image tensor, label) whose images go through `transform` (torchvision transforms v2)."""

    def __init__(self, base: Dataset, transform: v2.Transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return self.transform(x), y


def memory_transform(info: DatasetInfo, augment: bool) -> v2.Compose | None:
    """What the in-memory (32x32, normalised) datasets go through: with `augment`, the standard CIFAR augmentation
    (random crop with 4-pixel zero padding, h-flip where `info.flip`; `info.affine` datasets get AffineAugmented
    instead); at another size, a resize. None: nothing.

    The augmentation draws from torch's global RNG (these loaders run in the main process), as the shuffling does:
    training seeds it once, and the RNG state saved with each epoch makes a resumed run draw what an uninterrupted
    one would have drawn. Its draws (two crop offsets, then one flip) are those of the hand-written version it
    replaced, so the figures in benchmarks/RESULTS.md are unchanged.
    """
    steps: list[v2.Transform] = []
    if augment and not info.affine:
        steps += [v2.RandomCrop(32, padding=4), *([v2.RandomHorizontalFlip()] if info.flip else [])]
    if info.input_size[1:] != (32, 32):
        steps.append(v2.Resize(info.input_size[1:], antialias=True))
    return v2.Compose(steps) if steps else None


def _to_tensor_dataset(images: np.ndarray, labels, info: DatasetInfo) -> TensorDataset:
    """uint8/float images NHWC or NHW in [0,255] -> normalised float 3x32x32 tensors."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32) / 255.0
    if x.ndim == 3:
        x = x[:, None]
    else:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != info.input_size[1:]:
        x = F.interpolate(x, size=info.input_size[1:], mode="bilinear", align_corners=False)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    return TensorDataset(((x - mean) / std).contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.long))


def _digits(split: str) -> TensorDataset:
    """scikit-learn's bundled 1,797 digits (8x8, 0..16), upsampled to 32x32; fixed stratified 80/20 train/test."""
    # lazy: scikit-learn is heavy and only the digits dataset needs it
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = d.images * (255.0 / 16.0)
    idx_train, idx_test = train_test_split(np.arange(len(d.target)), test_size=0.2, stratify=d.target,
                                           random_state=0)
    idx = idx_train if split == "train" else idx_test
    return _to_tensor_dataset(images[idx], d.target[idx], _INFO["digits"])


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles; allow only the numpy globals an array needs, nothing executable."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            batch = _CifarUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # a damaged or crafted pickle can raise almost any type from the unpickler
        raise DataError(f"{path} is not a valid CIFAR batch ({exc}); re-extract the dataset archive") from None
    if not isinstance(batch, dict) or "data" not in batch:
        raise DataError(f"{path} is not a valid CIFAR batch (no 'data'); re-extract the dataset archive")
    return batch


def _cifar(name: str, root: Path, split: str, download: bool) -> TensorDataset:
    folder, files, key = {
        "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                    "labels"),
        "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "fine_labels"),
    }[name]
    base = root / folder
    if download and not base.is_dir():
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(str(root), train=True, download=True)
    missing = [f for f in files[split] if not (base / f).is_file()]
    if missing:
        raise DataError(f"{name}: expected {base}/{{{','.join(files[split])}}} (the python version of the dataset);"
                        f" missing {missing[0]}; extract the archive there or pass --download")
    data, labels = [], []
    for f in files[split]:
        batch = _read_cifar_batch(base / f)
        data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(batch[key])
    return _to_tensor_dataset(np.concatenate(data), labels, _INFO[name])


def read_idx(path: Path) -> np.ndarray:
    """Parse an MNIST idx file (optionally gzipped)."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path} is truncated or not gzip ({exc}); re-extract the MNIST archive") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file; re-extract the MNIST archive")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated (incomplete header); re-extract the MNIST archive")
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path} is truncated ({len(raw)} of {expected} bytes); re-extract the MNIST archive")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()  # writable for torch


def _mnist(root: Path, split: str) -> TensorDataset:
    prefix = "train" if split == "train" else "t10k"
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [root / f"{prefix}-{kind}{ext}" for ext in ("", ".gz")]
        candidates += [root / "MNIST" / "raw" / c.name for c in candidates]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise DataError(f"mnist: expected {root}/{prefix}-{kind}[.gz] (idx files); put the MNIST files there")
        found.append(hit)
    return _to_tensor_dataset(read_idx(found[0]), read_idx(found[1]), _INFO["mnist"])


def _require_root(name: str, root: str | Path | None) -> Path:
    if root is None:
        raise DataError(f"{name} needs a local data directory: pass --data-dir PATH")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}; pass --data-dir pointing at the {name} files")
    return root


def check_val_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise ConfigError(f"--val-fraction must be a fraction in (0, 1), got {fraction!r}")
    return float(fraction)


def _labels(ds: Dataset) -> np.ndarray:
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].numpy()
    if hasattr(ds, "targets"):  # an image folder: its labels without decoding an image
        return np.asarray(ds.targets)
    return np.asarray([ds[i][1] for i in range(len(ds))])


def split_train_val(ds: Dataset, fraction: float, name: str) -> tuple[Subset, Subset]:
    """A fixed (seed 0) (train, val) split of a training part: the same on every run, class-stratified where every
    class has an image for each side (otherwise a plain seeded shuffle)."""
    from sklearn.model_selection import train_test_split  # lazy: scikit-learn is heavy (1-2 s at start-up)

    labels = _labels(ds)
    n_val = int(np.ceil(fraction * len(labels)))
    if len(labels) - n_val < 1:
        raise DataError(f"{name}: {len(labels)} training image(s) are too few to split {fraction:g} off for "
                        "validation; add images, lower --val-fraction, or give the data a val/ folder")
    classes, counts = np.unique(labels, return_counts=True)
    stratify = labels if counts.min() >= 2 and len(classes) <= min(n_val, len(labels) - n_val) else None
    idx_train, idx_val = train_test_split(np.arange(len(labels)), test_size=n_val, stratify=stratify,
                                          random_state=0)
    return Subset(ds, np.sort(idx_train).tolist()), Subset(ds, np.sort(idx_val).tolist())


def load_part(name: str, part: str, root: str | Path | None = None, download: bool = False, image_size=None,
              augment: bool = False) -> Dataset:
    """One part of a dataset as it lies on disk: "train" or "test" (or an image folder's own "val").

    The in-memory datasets come at 32x32 (resized later, see `get_dataset`); an image folder streams at
    `image_size` with training (`augment`) or evaluation transforms.
    """
    if name == "digits":
        return _digits(part)
    if name in ("cifar10", "cifar100"):
        if download and root is not None:
            Path(root).mkdir(parents=True, exist_ok=True)
        return _cifar(name, _require_root(name, root), part, download)
    if name == "mnist":
        return _mnist(_require_root(name, root), part)
    size = parse_image_size(image_size) or default_image_size(name)
    return image_folder(_require_root(name, root), part, size, train=augment)


def get_dataset(name: str, split: str = "train", root: str | Path | None = None, augment: bool = False,
                download: bool = False, val_fraction: float = DEFAULT_VAL_FRACTION, image_size=None) -> Dataset:
    """A dataset of (normalised 3xHxW tensor, label) for one of the three splits, at `image_size` (default: the
    dataset's, `default_image_size`).

    "test" is the dataset's own test part. "train" and "val" split its training part (`val_fraction` to val,
    stratified, fixed), except for an image folder that has a val/ folder: then val/ is val and train/ is train.
    `augment`: the in-memory datasets' random crop (and flip) or affine distortion, an image folder's
    RandomResizedCrop and flip.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    info = dataset_info(name, root, image_size)
    val_fraction = check_val_fraction(val_fraction)
    folder = name == "imagefolder"
    part = dict(root=root, download=download, image_size=info.input_size[1:], augment=augment and folder)
    if split == "test":
        ds: Dataset = load_part(name, "test", **part)
    elif folder and (_require_root(name, root) / "val").is_dir():
        ds = load_part(name, split, **part)
    else:
        train, val = split_train_val(load_part(name, "train", **part), val_fraction, name)
        ds = train if split == "train" else val
    if folder:
        return ds
    if augment and info.affine:
        ds = AffineAugmented(ds, -torch.tensor(info.mean) / torch.tensor(info.std))
    transform = memory_transform(info, augment)
    return ds if transform is None else Transformed(ds, transform)


def make_loader(name: str, split: str, batch_size: int, root: str | Path | None = None, augment: bool | None = None,
                limit: int | None = None, download: bool = False, val_fraction: float = DEFAULT_VAL_FRACTION,
                image_size=None, workers: int | None = None, pin_memory: bool = False, drop_last=False) -> DataLoader:
    """A DataLoader; training splits are shuffled and augmented unless told otherwise. `limit` keeps a prefix.
    `drop_last` drops the partial last batch, but only when the split holds at least one full batch.

    Shuffling and augmentation draw from torch's global RNG: seed it (train.seed_everything) for a repeatable run.
    With `workers` > 0 (image folders' default, `default_workers`) each worker's RNG is seeded from that RNG when
    an epoch starts, so a run is repeatable for a given number of workers.
    """
    train = split == "train"
    ds = get_dataset(name, split, root, augment=train if augment is None else augment, download=download,
                     val_fraction=val_fraction, image_size=image_size)
    if limit is not None:
        ds = Subset(ds, range(min(limit, len(ds))))
    return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=drop_last and len(ds) >= batch_size,
                      num_workers=check_workers(workers, name), pin_memory=pin_memory)


def sample_batch(name: str, n: int, root: str | Path | None = None, split: str = "test",
                 val_fraction: float = DEFAULT_VAL_FRACTION, image_size=None) -> torch.Tensor:
    """The first `n` real images of a split (evaluation transforms), for parity checks and calibration."""
    ds = get_dataset(name, split, root, val_fraction=val_fraction, image_size=image_size)
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


def write_cifar_batch(path: Path, images: np.ndarray, labels, label_key: str = "labels") -> None:
    """Write a CIFAR python batch (used by tests to build tiny datasets in the real layout).

    `images` is uint8 N x 3 x 32 x 32 (channel-major, as the archive stores rows), not N x 32 x 32 x 3.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    pickle.dump({"data": images.reshape(len(images), -1), label_key: list(map(int, labels))}, buf, protocol=2)
    path.write_bytes(buf.getvalue())
