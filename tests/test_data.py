"""Tests for gradinv.data: built-in sources, image folders, .npz files, transforms and sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradinv.data import (
    BUILTIN_SOURCES,
    ImageDataset,
    Normalization,
    center_crop_resize,
    list_data_sources,
    load_dataset,
    sample_batch,
    to_channels,
)
from gradinv.errors import ConfigError, DataError


def _save_rgb(path: Path, size: tuple[int, int] = (20, 12), colour: tuple[int, int, int] = (200, 30, 90)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _save_grey(path: Path, size: tuple[int, int] = (16, 16), value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)


def _check_dataset(ds: ImageDataset, *, n: int, channels: int, size: int) -> None:
    assert len(ds) == n
    assert ds.images.shape == (n, channels, size, size)
    assert ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (n,)
    assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
    assert ds.channels == channels and ds.image_size == size
    assert len(ds.mean) == channels and len(ds.std) == channels
    assert all(s >= 1e-3 for s in ds.std)


# --- built-in sources -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_digits(size: int) -> None:
    ds = load_dataset("digits", image_size=size)
    _check_dataset(ds, n=1797, channels=1, size=size)
    assert ds.num_classes == 10 and ds.class_names == tuple(str(i) for i in range(10))
    assert set(ds.labels.tolist()) == set(range(10))
    assert float(ds.images.max()) > 0.9  # 0..16 scaled to [0, 1]


def test_digits_as_rgb() -> None:
    ds = load_dataset("digits", image_size=32, channels=3)
    _check_dataset(ds, n=1797, channels=3, size=32)
    assert torch.equal(ds.images[:, 0], ds.images[:, 1]) and torch.equal(ds.images[:, 0], ds.images[:, 2])
    assert ds.mean[0] == pytest.approx(ds.mean[2])


@pytest.mark.parametrize("size", [32, 64])
def test_photos(size: int) -> None:
    ds = load_dataset("photos", image_size=size)
    assert len(ds) >= 6
    _check_dataset(ds, n=len(ds), channels=3, size=size)
    assert ds.labels.tolist() == list(range(len(ds)))
    assert ds.num_classes == len(ds) == len(ds.class_names)
    assert "astronaut" in ds.class_names
    assert load_dataset("photos", image_size=size).class_names == ds.class_names  # deterministic order


def test_stats_are_deterministic_and_from_images() -> None:
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.mean == b.mean and a.std == b.std
    assert a.mean[0] == pytest.approx(float(a.images.mean()), abs=1e-5)


def test_list_sources() -> None:
    names = [name for name, _ in list_data_sources()]
    assert names == list(BUILTIN_SOURCES) == ["digits", "photos", "photo-crops", "synthetic:K"]


def test_synthetic_many_class_source() -> None:
    ds = load_dataset("synthetic:1000", image_size=8)
    assert ds.num_classes == 1000 and len(ds) == 4000 and ds.images.shape[1:] == (3, 8, 8)
    again = load_dataset("synthetic:1000", image_size=8)
    assert torch.equal(ds.images, again.images) and torch.equal(ds.labels, again.labels)
    assert load_dataset("synthetic", image_size=8).num_classes == 100
    for bad in ("synthetic:x", "synthetic:1"):
        with pytest.raises(ConfigError, match="synthetic"):
            load_dataset(bad, image_size=8)


@pytest.mark.parametrize("size", [3, 1025])
def test_bad_image_size(size: int) -> None:
    with pytest.raises(ConfigError, match="4 to 1024"):
        load_dataset("digits", image_size=size)


def test_bad_channels() -> None:
    with pytest.raises(ConfigError, match="channels"):
        load_dataset("digits", channels=2)


# --- image folders ----------------------------------------------------------------------------------------


def test_image_folder_layout(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    _save_rgb(root / "dog" / "a.png")
    _save_rgb(root / "dog" / "b.jpg", size=(30, 40))
    _save_grey(root / "cat" / "c.bmp")
    _save_rgb(root / "bird" / "sub" / "d.PNG")
    (root / "bird" / "notes.txt").write_text("not an image")
    ds = load_dataset(root, image_size=16)
    _check_dataset(ds, n=4, channels=3, size=16)  # RGB because some images are colour
    assert ds.name == "pets"
    assert ds.class_names == ("bird", "cat", "dog") and ds.num_classes == 3
    assert ds.labels.tolist() == [0, 1, 2, 2]
    grey = ds.images[1]  # cat/c.bmp, grey -> repeated channels
    assert torch.allclose(grey, torch.full_like(grey, 128 / 255), atol=1e-5)
    red = ds.images[2]
    assert red[0].mean().item() == pytest.approx(200 / 255, abs=1e-4)


def test_flat_folder_grey(tmp_path: Path) -> None:
    for i in range(3):
        _save_grey(tmp_path / f"img{i}.png", size=(10 + i, 12), value=40 * i)
    ds = load_dataset(tmp_path, image_size=8)
    _check_dataset(ds, n=3, channels=1, size=8)
    assert ds.class_names == ("images",) and ds.labels.tolist() == [0, 0, 0]
    assert load_dataset(tmp_path, image_size=8, channels=3).images.shape == (3, 3, 8, 8)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*folder of images"):
        load_dataset(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_dataset(empty)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("hi")
    with pytest.raises(DataError, match=r"no images with a known extension.*a\.txt"):
        load_dataset(texts)
    broken = tmp_path / "broken"
    _save_rgb(broken / "good.png")
    (broken / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"bad\.png"):
        load_dataset(broken)
    empty_class = tmp_path / "classes"
    _save_rgb(empty_class / "a" / "x.png")
    (empty_class / "b").mkdir()
    with pytest.raises(DataError, match="class folder .*b"):
        load_dataset(empty_class)
    not_npz = tmp_path / "image.png"
    _save_rgb(not_npz)
    with pytest.raises(DataError, match="not an .npz"):
        load_dataset(not_npz)


# --- .npz files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "channels"),
    [((5, 12, 12), 1), ((5, 12, 12, 3), 3), ((5, 3, 12, 12), 3), ((5, 12, 12, 1), 1), ((5, 1, 12, 12), 1)],
)
def test_npz_layouts(tmp_path: Path, shape: tuple[int, ...], channels: int) -> None:
    rng = np.random.default_rng(0)
    images = rng.random(shape, dtype=np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, images=images, labels=np.array([0, 1, 2, 1, 0]))
    ds = load_dataset(path, image_size=12)
    _check_dataset(ds, n=5, channels=channels, size=12)
    assert ds.name == "data" and ds.num_classes == 3 and ds.labels.tolist() == [0, 1, 2, 1, 0]
    if len(shape) == 4 and shape[-1] == 3:  # NHWC -> NCHW without scaling
        assert torch.allclose(ds.images, torch.from_numpy(images).permute(0, 3, 1, 2))


def test_npz_uint8_and_class_names(tmp_path: Path) -> None:
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    images[1] = 255
    path = tmp_path / "u8.npz"
    np.savez(path, images=images, labels=np.array([1, 0]), class_names=np.array(["cat", "dog", "eel"]))
    ds = load_dataset(path, image_size=8)
    assert float(ds.images[0].max()) == 0.0 and float(ds.images[1].min()) == 1.0
    assert ds.class_names == ("cat", "dog", "eel") and ds.num_classes == 3
    resized = load_dataset(path, image_size=4)
    assert resized.images.shape == (2, 3, 4, 4)


def test_npz_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    np.savez(path, pixels=np.zeros((2, 4, 4)), targets=np.zeros(2))
    with pytest.raises(DataError, match=r"no 'images' or 'labels'.*pixels, targets"):
        load_dataset(path)
    np.savez(path, images=np.zeros((3, 4, 4)), labels=np.zeros(2, dtype=int))
    with pytest.raises(DataError, match="3 images but 2 labels"):
        load_dataset(path)
    np.savez(path, images=np.zeros((2, 4, 4)), labels=np.array([0, -1]))
    with pytest.raises(DataError, match="negative"):
        load_dataset(path)
    np.savez(path, images=np.zeros((2, 4, 4, 5)), labels=np.array([0, 1]))
    with pytest.raises(DataError, match="expected"):
        load_dataset(path)
    np.savez(path, images=np.full((2, 4, 4), 300.0), labels=np.array([0, 1]))
    with pytest.raises(DataError, match="0..255"):
        load_dataset(path)
    np.savez(path, images=np.zeros((0, 4, 4)), labels=np.zeros(0, dtype=int))
    with pytest.raises(DataError, match="empty"):
        load_dataset(path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(tmp_path / "junk.npz")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "missing.npz")


# --- transforms -------------------------------------------------------------------------------------------


def test_center_crop_resize() -> None:
    img = torch.zeros(3, 10, 20)
    img[:, :, 5:15] = 1.0  # the centre square is all ones
    out = center_crop_resize(img, 4)
    assert out.shape == (3, 4, 4) and torch.allclose(out, torch.ones_like(out))
    assert center_crop_resize(torch.rand(2, 1, 7, 9), 5).shape == (2, 1, 5, 5)


def test_to_channels() -> None:
    grey = torch.rand(2, 1, 4, 4)
    rgb = to_channels(grey, 3)
    assert rgb.shape == (2, 3, 4, 4) and torch.equal(rgb[:, 2], grey[:, 0])
    back = to_channels(rgb, 1)
    assert torch.allclose(back, grey, atol=1e-6)  # luma weights sum to 1
    red = torch.zeros(3, 2, 2)
    red[0] = 1.0
    assert torch.allclose(to_channels(red, 1), torch.full((1, 2, 2), 0.299))
    with pytest.raises(DataError):
        to_channels(torch.rand(4, 2, 2), 3)
    with pytest.raises(ConfigError):
        to_channels(grey, 2)


# --- normalisation and sampling ---------------------------------------------------------------------------


def test_normalization_round_trip() -> None:
    norm = Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    x = torch.rand(4, 3, 5, 5, dtype=torch.float64)
    assert torch.allclose(norm.denormalize(norm.normalize(x)), x)
    single = torch.rand(3, 5, 5)
    y = norm.normalize(single)
    assert y.dtype == torch.float32 and torch.allclose(y[1], (single[1] - 0.4) / 0.25)
    ident = Normalization.identity(1)
    z = torch.rand(1, 3, 3)
    assert torch.equal(ident.normalize(z), z)
    ds = load_dataset("digits", image_size=8)
    n = ds.normalization
    assert n.mean == ds.mean and torch.allclose(n.denormalize(n.normalize(ds.images)), ds.images, atol=1e-5)
    assert abs(float(n.normalize(ds.images).mean())) < 1e-4


def test_sample_batch() -> None:
    ds = load_dataset("digits", image_size=8)
    state = torch.get_rng_state()
    x1, y1 = sample_batch(ds, batch_size=16, seed=7)
    x2, y2 = sample_batch(ds, batch_size=16, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (16, 1, 8, 8) and y1.shape == (16,)
    x3, _ = sample_batch(ds, batch_size=16, seed=8)
    assert not torch.equal(x1, x3)
    # without replacement: every image of a tiny dataset drawn exactly once
    ids = torch.arange(6, dtype=torch.float32) / 5
    tiny = ImageDataset.from_tensors("tiny", ids.view(6, 1, 1, 1).expand(6, 1, 4, 4), torch.arange(6) % 3)
    xt, yt = sample_batch(tiny, batch_size=6, seed=3)
    assert sorted(xt[:, 0, 0, 0].tolist()) == ids.tolist() and torch.equal(yt, (xt[:, 0, 0, 0] * 5).round().long() % 3)
    _, yd = sample_batch(ds, batch_size=10, seed=1, distinct_labels=True)
    assert sorted(yd.tolist()) == list(range(10))


def test_sample_batch_errors() -> None:
    ds = load_dataset("photos", image_size=8)
    with pytest.raises(ConfigError, match=f"has {len(ds)} images"):
        sample_batch(ds, batch_size=len(ds) + 1, seed=0)
    digits = load_dataset("digits", image_size=8)
    with pytest.raises(ConfigError, match="only 10 classes"):
        sample_batch(digits, batch_size=11, seed=0, distinct_labels=True)
    with pytest.raises(ConfigError):
        sample_batch(digits, batch_size=0, seed=0)


# --- memory estimates -------------------------------------------------------------------------------------


def _one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_loading_that_would_not_fit_is_refused_before_allocating(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRADINV_MEMORY_LIMIT", "100MB")
    with pytest.raises(ConfigError) as info:  # 1,797 x (1 + 3) x 1024^2 x 4 bytes: about 30 GB
        load_dataset("digits", image_size=1024, channels=3)
    message = _one_line(info)
    assert "digits" in message and "1024x1024" in message and "30.1 GB" in message
    assert "GRADINV_MEMORY_LIMIT" in message and "--image-size" in message
    with pytest.raises(ConfigError, match=r"photos.*--image-size"):
        load_dataset("photos", image_size=1024)
    with pytest.raises(ConfigError, match=r"synthetic:100000.*4\.9 GB.*synthetic:K"):  # 400,000 images
        load_dataset("synthetic:100000", image_size=32)
    for i in range(3):
        _save_grey(tmp_path / "flat" / f"{i}.png")
    monkeypatch.setenv("GRADINV_MEMORY_LIMIT", "10MB")  # 3 grey images at 1024 px: 12.6 MB
    with pytest.raises(ConfigError, match=r"data folder .*flat.*--image-size"):
        load_dataset(tmp_path / "flat", image_size=1024)
    for i in range(3):
        _save_rgb(tmp_path / "colour" / f"{i}.png")
    monkeypatch.setenv("GRADINV_MEMORY_LIMIT", "8MB")  # at 512 px: grey would take 3.1 MB, RGB 9.4 MB
    with pytest.raises(ConfigError, match=r"colour.*3 channel\(s\).*9\.4 MB"):
        load_dataset(tmp_path / "colour", image_size=512)
    monkeypatch.setenv("GRADINV_MEMORY_LIMIT", "100MB")
    np.savez(tmp_path / "big.npz", images=np.zeros((30, 8, 8), np.uint8), labels=np.zeros(30, np.int64))
    with pytest.raises(ConfigError, match=r"big\.npz.*--image-size"):
        load_dataset(tmp_path / "big.npz", image_size=1024)
    assert len(load_dataset("digits", image_size=8, channels=3)) == 1797  # what fits still loads


def test_channel_stats_in_chunks_match_one_pass(monkeypatch) -> None:
    from gradinv.data import dataset as dataset_module

    images = torch.rand(50, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    x = images.double()
    monkeypatch.setattr(dataset_module, "_STATS_CHUNK", 3 * 36 * 4)  # 4 images a chunk, a ragged last one
    mean, std = dataset_module.channel_stats(images)
    assert mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-12)


def test_photo_crops_are_seeded_crops_of_every_photo_never_a_whole_photo() -> None:
    from gradinv.data import load_photo_crops

    ds = load_dataset("photo-crops", image_size=16)
    photos = load_dataset("photos", image_size=16)
    assert ds.class_names == photos.class_names
    assert ds.labels.bincount().tolist() == [100] * len(photos)
    _check_dataset(ds, n=100 * len(photos), channels=3, size=16)
    again = load_photo_crops(image_size=16, per_photo=3, seed=0)
    assert torch.equal(again.images, load_photo_crops(image_size=16, per_photo=3, seed=0).images)
    assert not torch.equal(again.images, load_photo_crops(image_size=16, per_photo=3, seed=1).images)
    gap = torch.cdist(ds.images.flatten(1), photos.images.flatten(1)).min()
    assert float(gap) > 0.1  # no crop is the whole (centre-cropped) photo
