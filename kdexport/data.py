"""Datasets, all yielding normalised 3xHxW float tensors: digits (embedded default), CIFAR-10/100, MNIST, image folders.

Nothing is downloaded unless the user passes `download=True` (`--download`).
"""

from __future__ import annotations

import gzip
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .errors import ConfigError, DataError

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "imagefolder")
SPLITS = ("train", "val", "test")
# Validation is carved out of the training part; 15% of digits' 1,437 training images is 216, the test split's 360
# images stay exactly as they were.
DEFAULT_VAL_FRACTION = 0.15
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
        return "affine" if self.affine else "crop+flip" if self.flip else "crop"


_INFO = {
    "digits": DatasetInfo("digits", 10, (3, 32, 32), (0.3054,) * 3, (0.3237,) * 3, False, affine=True),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    "mnist": DatasetInfo("mnist", 10, (3, 32, 32), (0.1307,) * 3, (0.3081,) * 3, False),
}


def dataset_info(name: str, root: str | Path | None = None) -> DatasetInfo:
    if name == "imagefolder":
        classes = _folder_classes(_require_root(name, root) / "train")
        return DatasetInfo("imagefolder", len(classes), (3, 32, 32), IMAGENET_MEAN, IMAGENET_STD, True)
    if name not in _INFO:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return _INFO[name]


class Augmented(Dataset):
    """Standard CIFAR augmentation on normalised tensors: random crop with 4-pixel zero padding, optional h-flip.

    Draws from torch's global RNG (the loaders run in the main process), as the shuffling does: training seeds
    it once, and the RNG state saved with each epoch then makes a resumed run draw what an uninterrupted one
    would have drawn.
    """

    def __init__(self, base: Dataset, flip: bool):
        self.base, self.flip = base, flip

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        h, w = x.shape[-2:]
        dy, dx = torch.randint(0, 9, (2,)).tolist()
        x = F.pad(x, (4, 4, 4, 4))[:, dy:dy + h, dx:dx + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, y


class AffineAugmented(Dataset):
    """Handwriting augmentation on normalised tensors: a random rotation (±`degrees`), scaling (`scale`) and shift
    (±`translate` of the side) per image, bilinear, with the uncovered border at `fill` (the normalised black).

    The standard augmentation for handwritten digits (elastic and affine distortions, Simard et al. 2003). A
    DataLoader fetches a whole batch through `__getitems__`, which transforms it in one `grid_sample`: per image
    it costs about as much as a padded crop, where torchvision's per-image RandomAffine cost ~20x more here.
    Draws from torch's global RNG, like `Augmented`, so a seeded run repeats and a resumed one continues.
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


def _folder_classes(path: Path) -> list[str]:
    if not path.is_dir():
        raise DataError(f"imagefolder: expected {path}/<class>/<image> folders (and test/, optionally val/)")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"imagefolder: {path} has no class folders; expected {path}/<class>/<image>")
    return classes


def _imagefolder(root: Path, split: str) -> Dataset:
    info = dataset_info("imagefolder", root)
    classes = _folder_classes(root / "train")
    folder = root / split
    _folder_classes(folder)
    files = [(p, classes.index(c.name)) for c in sorted(folder.iterdir()) if c.is_dir() and c.name in classes
             for p in sorted(c.iterdir()) if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".webp"}]
    if not files:
        raise DataError(f"imagefolder: no images under {folder}/<class>/")
    images = []
    for p, _ in files:
        with Image.open(p) as im:
            images.append(np.asarray(im.convert("RGB").resize(info.input_size[:0:-1], Image.BILINEAR)))
    return _to_tensor_dataset(np.stack(images), [y for _, y in files], info)


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


def load_part(name: str, part: str, root: str | Path | None = None, download: bool = False) -> Dataset:
    """One part of a dataset as it lies on disk: "train" or "test" (or an image folder's own "val")."""
    if name == "digits":
        return _digits(part)
    if name in ("cifar10", "cifar100"):
        if download and root is not None:
            Path(root).mkdir(parents=True, exist_ok=True)
        return _cifar(name, _require_root(name, root), part, download)
    if name == "mnist":
        return _mnist(_require_root(name, root), part)
    return _imagefolder(_require_root(name, root), part)


def get_dataset(name: str, split: str = "train", root: str | Path | None = None, augment: bool = False,
                download: bool = False, val_fraction: float = DEFAULT_VAL_FRACTION) -> Dataset:
    """A dataset of (normalised 3xHxW tensor, label) for one of the three splits.

    "test" is the dataset's own test part. "train" and "val" split its training part (`val_fraction` to val,
    stratified, fixed), except for an image folder that has a val/ folder: then val/ is val and train/ is train.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    info = dataset_info(name, root)
    val_fraction = check_val_fraction(val_fraction)
    if split == "test":
        ds: Dataset = load_part(name, "test", root, download)
    elif name == "imagefolder" and (_require_root(name, root) / "val").is_dir():
        ds = load_part(name, split, root, download)
    else:
        train, val = split_train_val(load_part(name, "train", root, download), val_fraction, name)
        ds = train if split == "train" else val
    if not augment:
        return ds
    if info.affine:
        return AffineAugmented(ds, -torch.tensor(info.mean) / torch.tensor(info.std))
    return Augmented(ds, info.flip)


def make_loader(name: str, split: str, batch_size: int, root: str | Path | None = None, augment: bool | None = None,
                limit: int | None = None, download: bool = False,
                val_fraction: float = DEFAULT_VAL_FRACTION) -> DataLoader:
    """A DataLoader; training splits are shuffled and augmented unless told otherwise. `limit` keeps a prefix.

    Shuffling and augmentation draw from torch's global RNG: seed it (train.seed_everything) for a repeatable run.
    """
    train = split == "train"
    ds = get_dataset(name, split, root, augment=train if augment is None else augment, download=download,
                     val_fraction=val_fraction)
    if limit is not None:
        ds = Subset(ds, range(min(limit, len(ds))))
    return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=False)


def sample_batch(name: str, n: int, root: str | Path | None = None, split: str = "test",
                 val_fraction: float = DEFAULT_VAL_FRACTION) -> torch.Tensor:
    """The first `n` real images of a split, for parity checks and calibration."""
    ds = get_dataset(name, split, root, val_fraction=val_fraction)
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


def write_cifar_batch(path: Path, images: np.ndarray, labels, label_key: str = "labels") -> None:
    """Write a CIFAR python batch (used by tests to build tiny datasets in the real layout).

    `images` is uint8 N x 3 x 32 x 32 (channel-major, as the archive stores rows), not N x 32 x 32 x 3.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    pickle.dump({"data": images.reshape(len(images), -1), label_key: list(map(int, labels))}, buf, protocol=2)
    path.write_bytes(buf.getvalue())
