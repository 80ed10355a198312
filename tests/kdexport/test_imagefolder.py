"""Image folders on real files (JPEG and PNG, non-square, mixed sizes, grayscale, corrupt), the image size option,
and the in-memory datasets at another size."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from kdexport.data import (
    check_image_size,
    dataset_info,
    default_workers,
    get_dataset,
    make_loader,
    parse_image_size,
    sample_batch,
)
from kdexport.errors import ConfigError, DataError, UnreadableImage
from kdexport.imagefolder import write_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes, 6 train + 2 test images each, 60-100 x 45-75 px, JPEG and PNG, the first one grayscale."""
    return write_image_folder(tmp_path_factory.mktemp("images"), classes=3, per_class={"train": 6, "test": 2},
                              size=(80, 60), grayscale=1)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_the_generated_folder_is_what_the_tests_claim(folder):
    files = sorted((folder / "train").rglob("*.*"))
    assert len(files) == 18 and {f.suffix for f in files} == {".jpg", ".png"}
    sizes = set()
    modes = set()
    for f in files:
        with Image.open(f) as im:
            sizes.add(im.size)
            modes.add(im.mode)
    assert len(sizes) > 10 and all(w != h for w, h in sizes) and modes == {"RGB", "L"}


@pytest.mark.parametrize("size", [64, (48, 80)])
def test_train_and_eval_transforms_give_the_chosen_size(folder, size):
    h, w = parse_image_size(size)
    train = get_dataset("imagefolder", "train", folder, augment=True, image_size=size)
    test = get_dataset("imagefolder", "test", folder, image_size=size)
    assert len(train) + len(get_dataset("imagefolder", "val", folder, image_size=size)) == 18 and len(test) == 6
    for ds in (train, test):
        x, y = ds[0]
        assert x.shape == (3, h, w) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal(test[1][0], test[1][0])  # evaluation is deterministic: Resize + CenterCrop
    torch.manual_seed(0)
    a = train[0][0]
    torch.manual_seed(1)
    assert not torch.equal(a, train[0][0])  # RandomResizedCrop + flip, drawn from torch's RNG
    grey = get_dataset("imagefolder", "train", folder, augment=False, image_size=size)
    assert grey.dataset.samples[0][0].endswith("class0/0.jpg")  # the grayscale file, read as 3 equal channels
    x = grey.dataset[0][0]
    std = torch.tensor(dataset_info("imagefolder", folder).std).view(3, 1, 1)
    mean = torch.tensor(dataset_info("imagefolder", folder).mean).view(3, 1, 1)
    raw = x * std + mean
    assert torch.allclose(raw[0], raw[1], atol=1e-6) and torch.allclose(raw[1], raw[2], atol=1e-6)


def test_nothing_is_decoded_until_an_image_is_read(folder, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("decoded at start-up")

    monkeypatch.setattr(Image, "open", refuse)
    ds = get_dataset("imagefolder", "train", folder, augment=True, image_size=64)  # split too: labels only
    assert len(ds) > 0
    with pytest.raises(AssertionError, match="decoded at start-up"):
        ds[0]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_is_one_line_naming_the_file(folder, tmp_path, workers):
    root = copy_of(folder, tmp_path)
    bad = root / "test" / "class1" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    loader = make_loader("imagefolder", "test", 4, root, image_size=32, workers=workers)
    with pytest.raises(UnreadableImage) as info:
        list(loader)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"cannot decode image {bad} (")
    assert message.endswith("replace or delete the file")


def test_layout_errors_name_what_to_fix(folder, tmp_path):
    root = copy_of(folder, tmp_path)
    (root / "train" / "class9").mkdir()
    (root / "train" / "class9" / "notes.txt").write_text("not an image")
    (root / "test" / "class9").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/class9 has no images"):
        get_dataset("imagefolder", "train", root, image_size=32)
    shutil.rmtree(root / "train" / "class9")
    with pytest.raises(DataError, match=r"test has other classes than .*train \(only here: class9\)"):
        get_dataset("imagefolder", "test", root, image_size=32)
    shutil.rmtree(root / "test" / "class9")
    shutil.copytree(root / "test", root / "val")
    shutil.rmtree(root / "val" / "class2")
    with pytest.raises(DataError, match=r"val has other classes .*missing here: class2\); give every split"):
        get_dataset("imagefolder", "val", root, image_size=32)


def test_val_folder_is_val_and_train_stays_whole(folder, tmp_path):
    root = copy_of(folder, tmp_path)
    shutil.copytree(root / "test", root / "val")
    assert len(get_dataset("imagefolder", "train", root, image_size=32)) == 18
    assert len(get_dataset("imagefolder", "val", root, image_size=32)) == 6


def test_workers_default_and_repeatable_draws(folder):
    assert default_workers("digits") == default_workers("cifar10") == 0
    assert 1 <= default_workers("imagefolder") <= 8
    assert make_loader("digits", "train", 8).num_workers == 0
    with pytest.raises(ConfigError, match="--workers"):
        make_loader("imagefolder", "test", 4, folder, workers=-1)

    def epoch():
        torch.manual_seed(0)
        loader = make_loader("imagefolder", "train", 4, folder, image_size=32, workers=1)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(epoch(), epoch())  # the worker's RNG is seeded from the main one: a resumed run replays


@pytest.mark.parametrize("text,size", [("96", (96, 96)), ("160,224", (160, 224)), ("64x48", (64, 48)), (32, (32, 32)),
                                       ((40, 50), (40, 50)), (None, None)])
def test_parse_image_size(text, size):
    assert parse_image_size(text) == size


@pytest.mark.parametrize("bad", ["31", "abc", "0", "-64", "64,", "1,2,3", "64.5", "5000", 16, (32, 8), True])
def test_bad_image_sizes_say_what_to_pass(bad):
    with pytest.raises(ConfigError, match=r"--image-size must be N or H,W with every side a whole number >= 32"):
        parse_image_size(bad)


def test_a_checkpoint_decides_its_size():
    assert check_image_size(None, [3, 64, 64], "t.pt") == (64, 64)
    assert check_image_size("64", [3, 64, 64], "t.pt") == (64, 64)
    with pytest.raises(ConfigError, match="t.pt was made at 64x64 px, not 96x96: drop --image-size"):
        check_image_size("96", [3, 64, 64], "t.pt")


def test_in_memory_datasets_at_another_size():
    assert dataset_info("digits").input_size == (3, 32, 32) == dataset_info("mnist").input_size
    assert dataset_info("digits", image_size=64).input_size == (3, 64, 64)
    native, big = sample_batch("digits", 4), sample_batch("digits", 4, image_size=64)
    assert native.shape == (4, 3, 32, 32) and big.shape == (4, 3, 64, 64)
    # the same images: shrinking the 64 px ones back gives the 32 px ones, up to resampling
    back = torch.nn.functional.interpolate(big, size=(32, 32), mode="bilinear", antialias=True)
    assert (back - native).abs().mean() < 0.1 * native.abs().mean()
    x, _ = get_dataset("digits", "train", augment=True, image_size=(48, 40))[0]
    assert x.shape == (3, 48, 40)
