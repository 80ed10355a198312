"""kdexport.data: digits split and normalisation, augmentation, and tiny datasets in the real on-disk formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from kdexport.data import (
    AffineAugmented,
    Transformed,
    dataset_info,
    get_dataset,
    load_part,
    make_loader,
    memory_transform,
    read_idx,
    sample_batch,
    split_train_val,
    write_cifar_batch,
)
from kdexport.errors import ConfigError, DataError


# ---------------------------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits", "train"), get_dataset("digits", "test")


def test_digits_three_splits_disjoint_and_stratified():
    """train + val are the old 1,437-image training part (val 15%, stratified); test is untouched."""
    train, val, test = (get_dataset("digits", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (1221, 216, 360)
    assert not set(train.indices) & set(val.indices) and len(set(train.indices) | set(val.indices)) == 1437
    per_train, per_val = labels_of(train).bincount(minlength=10), labels_of(val).bincount(minlength=10)
    assert ((per_val - 0.15 * (per_train + per_val)).abs() <= 1).all()
    again = get_dataset("digits", "val")
    assert again.indices == val.indices  # fixed: the same images on every run
    assert len(get_dataset("digits", "val", val_fraction=0.3)) == 432


def test_val_fraction_and_too_small_to_split(tmp_path):
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ConfigError, match="--val-fraction"):
            get_dataset("digits", "val", val_fraction=bad)
    one = torch.utils.data.TensorDataset(torch.zeros(1, 3, 32, 32), torch.tensor([0]))
    with pytest.raises(DataError, match="too few to split"):
        split_train_val(one, 0.5, "tiny")
    three = torch.utils.data.TensorDataset(torch.zeros(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    train, val = split_train_val(three, 0.5, "tiny")  # too few to stratify: a plain seeded split
    assert (len(train), len(val)) == (1, 2)


def labels_of(ds) -> torch.Tensor:
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))])


def test_digits_split_is_stratified(digits):
    train, test = digits
    assert (len(train), len(test)) == (1221, 360)
    per_test = labels_of(test).bincount(minlength=10)
    total = labels_of(train).bincount(minlength=10) + labels_of(get_dataset("digits", "val")).bincount(minlength=10)
    total += per_test
    assert ((per_test - 0.2 * total).abs() <= 1).all()  # each class keeps its 20% share in the test split


def test_digits_deterministic_shape_and_normalised(digits):
    train, test = digits
    again = get_dataset("digits", "test")
    assert torch.equal(test.tensors[0], again.tensors[0]) and torch.equal(test.tensors[1], again.tensors[1])
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= int(y) < 10
    xs = train.dataset.tensors[0]
    assert torch.equal(xs[:, 0], xs[:, 1]) and torch.equal(xs[:, 0], xs[:, 2])  # grey replicated to 3 channels
    assert abs(xs.mean().item()) < 0.1 and 0.9 < xs.std().item() < 1.1


def crops(x: torch.Tensor) -> list[torch.Tensor]:
    """Every 32x32 crop of the 4-pixel zero-padded image."""
    p = F.pad(x, (4, 4, 4, 4))
    return [p[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]


def test_digits_augmentation_is_affine_without_flips(digits):
    train, _ = digits
    torch.manual_seed(1)
    aug = get_dataset("digits", "train", augment=True)
    assert isinstance(aug, AffineAugmented) and dataset_info("digits").flip is False
    changed = 0
    for i in range(8):
        x, y = train[i]
        xa, ya = aug[i]
        assert xa.shape == x.shape and int(ya) == int(y)
        changed += not torch.allclose(xa, x, atol=1e-4)
    assert changed >= 6


def test_affine_augmentation_fills_with_the_background_and_draws_per_image():
    fill = -torch.tensor(dataset_info("digits").mean) / torch.tensor(dataset_info("digits").std)
    blank = torch.ones(4, 3, 32, 32) * fill.view(1, 3, 1, 1)
    aug = AffineAugmented(TensorDataset(blank, torch.zeros(4, dtype=torch.long)), fill)
    torch.manual_seed(0)
    assert torch.allclose(aug.transform(blank), blank, atol=1e-5)  # uncovered borders are black, not grey
    still = AffineAugmented(aug.base, fill, degrees=0.0, translate=0.0, scale=(1.0, 1.0))
    ramp = torch.linspace(-1, 2, 32).expand(2, 3, 32, 32)
    assert torch.allclose(still.transform(ramp), ramp, atol=1e-5)  # no rotation, shift or zoom: the image
    moved = aug.transform(ramp)
    assert not torch.allclose(moved[0], moved[1], atol=1e-3)  # each image its own draw


def test_a_loader_augments_a_whole_batch_at_once(monkeypatch):
    aug = get_dataset("digits", "train", augment=True)
    calls = []
    real = AffineAugmented.__getitems__
    monkeypatch.setattr(AffineAugmented, "__getitems__", lambda self, idx: calls.append(len(idx)) or real(self, idx))
    x, y = next(iter(DataLoader(aug, batch_size=16, shuffle=True)))
    assert calls == [16] and x.shape == (16, 3, 32, 32) and y.shape == (16,)


def test_make_loader_limit_and_order():
    loader = make_loader("digits", "test", batch_size=8, limit=10)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [8, 2]
    assert torch.equal(batches[0][0], sample_batch("digits", 8))  # test split: not shuffled, not augmented


def test_a_training_loader_drops_only_a_partial_last_batch():
    """drop_last (every recipe's default) drops the few images left over, unless there is no full batch at all."""
    sizes = lambda **kw: [len(y) for _, y in make_loader("digits", "train", 8, **kw)]  # noqa: E731
    assert sorted(sizes(limit=20)) == [4, 8, 8]
    assert sizes(limit=20, drop_last=True) == [8, 8]
    assert sizes(limit=5, drop_last=True) == [5]  # too small for one batch: it still trains


# ----------------------------------------------------------------------------------------------- CIFAR
def cifar_images(n: int) -> np.ndarray:
    """NCHW uint8 (the batch layout): even images pure red, odd ones a blue left-to-right ramp."""
    images = np.zeros((n, 3, 32, 32), np.uint8)
    images[0::2, 0] = 255
    images[1::2, 2] = (np.arange(32) * 8).astype(np.uint8)[None, None, :]
    return images


def write_cifar10(root: Path, per_batch: int = 2) -> Path:
    base = root / "cifar-10-batches-py"
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        write_cifar_batch(base / name, cifar_images(per_batch), [(i + j) % 10 for j in range(per_batch)])
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with (base / "batches.meta").open("wb") as fh:
        pickle.dump({"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}, fh, protocol=2)
    return root


def write_cifar100(root: Path) -> Path:
    base = root / "cifar-100-python"
    write_cifar_batch(base / "train", cifar_images(4), [99, 0, 57, 3], label_key="fine_labels")
    with (base / "test").open("wb") as fh:  # the real archive's keys: fine and coarse labels side by side
        pickle.dump({"data": cifar_images(2).reshape(2, -1), "fine_labels": [42, 7], "coarse_labels": [1, 2],
                     "filenames": ["a.png", "b.png"], "batch_label": "testing batch 1 of 1"}, fh, protocol=2)
    with (base / "meta").open("wb") as fh:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)],
                     "coarse_label_names": [f"c{i}" for i in range(20)]}, fh, protocol=2)
    return root


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    return write_cifar100(write_cifar10(root))


def test_cifar10_labels_and_pixel_order(cifar_root):
    train = load_part("cifar10", "train", cifar_root)
    test = get_dataset("cifar10", "test", cifar_root)
    assert (len(train), len(test)) == (10, 2)
    assert labels_of(train).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5] and labels_of(test).tolist() == [5, 6]
    info = dataset_info("cifar10")
    red, ramp = train[0][0], train[1][0]
    assert red.shape == (3, 32, 32)
    assert torch.allclose(red[0], torch.full((32, 32), (1 - info.mean[0]) / info.std[0]))
    assert torch.allclose(red[1], torch.full((32, 32), -info.mean[1] / info.std[1]))
    assert (red[0] > red[1]).all() and (red[0] > red[2]).all()  # red is the first channel
    blue = ramp[2]
    assert torch.equal(blue, blue[:1].expand(32, -1))  # constant down each column
    assert (blue[:, 1:] > blue[:, :-1]).all()  # increasing left to right: width is the last axis
    assert torch.allclose(blue[0, 1] * info.std[2] + info.mean[2], torch.tensor(8 / 255))


def test_cifar100_reads_fine_labels(cifar_root):
    train = load_part("cifar100", "train", cifar_root)
    test = get_dataset("cifar100", "test", cifar_root)
    assert labels_of(train).tolist() == [99, 0, 57, 3] and labels_of(test).tolist() == [42, 7]
    assert dataset_info("cifar100").num_classes == 100


def test_cifar_augmentation_keeps_shape_and_flips(cifar_root):
    base = load_part("cifar10", "train", cifar_root)
    aug = Transformed(base, memory_transform(dataset_info("cifar10"), augment=True))
    ramp = base[1][0]
    plain, flipped = crops(ramp), crops(ramp.flip(-1))
    kinds = set()
    for _ in range(20):
        x = aug[1][0]
        assert x.shape == (3, 32, 32)
        kinds.add("plain" if any(torch.equal(x, c) for c in plain) else
                  "flipped" if any(torch.equal(x, c) for c in flipped) else "other")
    assert kinds == {"plain", "flipped"}


def test_augmentation_draws_what_the_hand_written_one_drew():
    """transforms.v2 replaced a hand-written crop and flip; every figure in RESULTS.md relies on the same draws."""
    x = torch.randn(30, 3, 32, 32)
    aug = Transformed(TensorDataset(x, torch.zeros(30)), memory_transform(dataset_info("cifar10"), augment=True))
    torch.manual_seed(0)
    got = [aug[i][0] for i in range(30)]
    after = torch.get_rng_state()
    torch.manual_seed(0)
    for i in range(30):  # the replaced code, verbatim
        dy, dx = torch.randint(0, 9, (2,)).tolist()
        ref = F.pad(x[i], (4, 4, 4, 4))[:, dy:dy + 32, dx:dx + 32]
        if torch.rand(()) < 0.5:
            ref = ref.flip(-1)
        assert torch.equal(got[i], ref), i
    assert torch.equal(torch.get_rng_state(), after)


def test_cifar_missing_or_incomplete_names_the_layout(tmp_path):
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*data_batch_1.*--download"):
        get_dataset("cifar10", "train", tmp_path)
    write_cifar_batch(tmp_path / "cifar-10-batches-py" / "data_batch_1", cifar_images(2), [0, 1])
    with pytest.raises(DataError, match="missing data_batch_2"):
        get_dataset("cifar10", "train", tmp_path)
    with pytest.raises(DataError, match="cifar-100-python"):
        get_dataset("cifar100", "test", tmp_path)


class Exploit:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_malicious_pickle_is_refused_without_running(tmp_path):
    root = write_cifar10(tmp_path / "data")
    marker = tmp_path / "pwned"
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({"data": Exploit(marker), "labels": [0]}, protocol=2))
    with pytest.raises(DataError, match=r"test_batch is not a valid CIFAR batch \(refusing global"):
        get_dataset("cifar10", "test", root)
    assert not marker.exists()
    get_dataset("cifar10", "train", root)  # the untouched batches still load


@pytest.mark.parametrize("content", [
    b"", b"\x80\x02}q\x00(X\x04\x00\x00\x00data", b"\x00" * 40,
    b"\x80\x02cnumpy._core.multiarray\n_reconstruct\n)R.",  # an allowed global, called wrongly: TypeError
], ids=["empty", "truncated", "zeros", "bad-call"])
def test_cifar_damaged_batch_is_a_data_error(tmp_path, content):
    root = write_cifar10(tmp_path)
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(content)
    with pytest.raises(DataError, match="not a valid CIFAR batch"):
        get_dataset("cifar10", "test", root)


# ----------------------------------------------------------------------------------------------- MNIST
def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray) -> None:
    raw = idx_bytes(arr)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


MNIST_IMAGES = np.stack([np.full((28, 28), 255, np.uint8), np.zeros((28, 28), np.uint8),
                         np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1))])


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mnist")
    write_idx(root / "train-images-idx3-ubyte", MNIST_IMAGES)
    write_idx(root / "train-labels-idx1-ubyte", np.array([7, 0, 3], np.uint8))
    write_idx(root / "t10k-images-idx3-ubyte.gz", MNIST_IMAGES[:2])
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array([1, 9], np.uint8))
    return root


def test_mnist_idx_plain_and_gz(mnist_root):
    info = dataset_info("mnist")
    train, test = load_part("mnist", "train", mnist_root), get_dataset("mnist", "test", mnist_root)
    assert labels_of(train).tolist() == [7, 0, 3] and labels_of(test).tolist() == [1, 9]
    white, black = train[0][0], test[1][0]
    assert white.shape == (3, 32, 32)
    assert torch.allclose(white, torch.full_like(white, (1 - info.mean[0]) / info.std[0]))
    assert torch.allclose(black, torch.full_like(black, -info.mean[0] / info.std[0]))
    ramp = train[2][0]
    assert torch.equal(ramp[0], ramp[1]) and (ramp[0, 5, 1:] >= ramp[0, 5, :-1]).all()
    assert np.array_equal(read_idx(mnist_root / "t10k-images-idx3-ubyte.gz"), MNIST_IMAGES[:2])


@pytest.mark.parametrize("name, keep, match", [
    ("train-images-idx3-ubyte", 2000, r"truncated \(2000 of 2368 bytes\)"),  # in the pixels
    ("train-images-idx3-ubyte", 10, "truncated"),  # in the header's dimensions
    ("train-images-idx3-ubyte", 2, "not an unsigned-byte idx"),
    ("t10k-images-idx3-ubyte.gz", 30, "truncated or not gzip"),
])
def test_mnist_truncated_idx_is_a_data_error(tmp_path, name, keep, match):
    raw = idx_bytes(MNIST_IMAGES)
    if name.endswith(".gz"):
        raw = gzip.compress(raw)
    (tmp_path / name).write_bytes(raw[:keep])
    with pytest.raises(DataError, match=match):
        read_idx(tmp_path / name)
    tmp_path.joinpath("train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    if name.startswith("train"):  # and through the dataset
        with pytest.raises(DataError, match=match):
            get_dataset("mnist", "train", tmp_path)


def test_mnist_missing_files_name_the_layout(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[\.gz\]"):
        get_dataset("mnist", "train", tmp_path)


# ---------------------------------------------------------------------------------------- image folder
@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split, n in (("train", 2), ("test", 1)):
        for cls, rgb in colours.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8 + i, 8), rgb).save(root / split / cls / f"{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder(folder_root):
    assert dataset_info("imagefolder", folder_root).input_size == (3, 224, 224)  # the default: torchvision's size
    info = dataset_info("imagefolder", folder_root, 32)
    assert info.num_classes == 2 and info.input_size == (3, 32, 32)
    train = load_part("imagefolder", "train", folder_root, image_size=32)
    test = get_dataset("imagefolder", "test", folder_root, image_size=32)
    assert labels_of(train).tolist() == [0, 0, 1, 1] and labels_of(test).tolist() == [0, 1]
    red, blue = test[0][0], test[1][0]
    assert red.shape == (3, 32, 32)
    assert torch.allclose(red[0], torch.full((32, 32), (1 - info.mean[0]) / info.std[0]))
    assert torch.allclose(blue[2], torch.full((32, 32), (1 - info.mean[2]) / info.std[2]))


def test_imagefolder_without_train_folder(tmp_path):
    with pytest.raises(DataError, match="<class>/<image>"):
        get_dataset("imagefolder", "train", tmp_path)


# ----------------------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "imagefolder"])
def test_missing_data_dir(name, tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        get_dataset(name, "train")
    with pytest.raises(DataError, match="not found"):
        get_dataset(name, "train", tmp_path / "nowhere")


def test_unknown_dataset_and_split():
    with pytest.raises(ConfigError, match="digits"):
        get_dataset("svhn")
    with pytest.raises(ConfigError, match="train, val, test"):
        get_dataset("digits", "holdout")
