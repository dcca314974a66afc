"""Tests of lycoris_core.training.dataset: folders, captions, buckets, epochs, feature caches.

Every image is drawn here (gradients and shapes with PIL); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lycoris_core.errors import LycorisError
from lycoris_core.training import DatasetError, DatasetSpec, FeatureCache, TrainingData
from lycoris_core.training.dataset import (
    IMAGE_EXTENSIONS,
    bucket_candidates,
    choose_bucket,
)

LOGGER = "lycoris_core.training.dataset"


# --------------------------------------------------------------------------- helpers


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """An asymmetric RGB test picture: a gradient, a rectangle and a disc placed off-centre."""
    rng = random.Random(seed)
    img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    r, g, b = img.split()
    img = Image.merge("RGB", (r, g.transpose(Image.Transpose.ROTATE_90).resize((width, height)), b))
    draw = ImageDraw.Draw(img)
    x0, y0 = int(width * rng.uniform(0.05, 0.3)), int(height * rng.uniform(0.05, 0.3))
    draw.rectangle((x0, y0, x0 + width // 4, y0 + height // 5), fill=(rng.randrange(256), 20, 200))
    cx, cy, rad = width * 0.7, height * 0.6, min(width, height) * 0.15
    draw.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=(250, rng.randrange(256), 30))
    return img


def save(folder: Path, name: str, size: tuple[int, int], caption: str | None, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    make_image(*size, seed=seed).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return path


def spec(**kwargs) -> DatasetSpec:
    base = {"resolution": 64, "bucket_step": 8}
    base.update(kwargs)
    return DatasetSpec(**base)


def warnings_of(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    save(root, "a.png", (96, 96), "  a red square  ", seed=1)
    save(root, "b.JPG", (128, 80), None, seed=2)  # no caption; upper-case extension
    save(root, "c.webp", (72, 120), "portrait picture", seed=3)
    (root / "notes.txt").write_text("not a caption of anything", encoding="utf-8")
    return root


# --------------------------------------------------------------------------- folders


def test_folder_captions_and_default_caption(folder: Path):
    data = TrainingData(spec(folder=str(folder), default_caption="a photo"))
    names = [Path(item.source).name for item in data.items]
    assert names == ["a.png", "b.JPG", "c.webp"]
    captions = {Path(i.source).name: i.caption for i in data.items}
    assert captions == {"a.png": "a red square", "b.JPG": "a photo", "c.webp": "portrait picture"}
    assert all(item.repeats == 1 for item in data.items)
    assert len(data) == 3
    assert data.items[0].size == (96, 96)


def test_kohya_repeats_and_ignored_subfolders(tmp_path: Path, caplog):
    root = tmp_path / "data"
    save(root, "root.png", (64, 64), "root")
    save(root / "3_char", "x.png", (64, 64), "x", seed=4)
    save(root / "3_char", "y.png", (64, 64), "y", seed=5)
    save(root / "10_style", "z.bmp", (64, 64), "z", seed=6)
    save(root / "misc", "ignored.png", (64, 64), "ignored", seed=7)
    save(root / "0_off", "off.png", (64, 64), "off", seed=8)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        data = TrainingData(spec(folder=str(root)))
    repeats = {item.caption: item.repeats for item in data.items}
    assert repeats == {"root": 1, "x": 3, "y": 3, "z": 10}
    assert "misc" in caplog.text and "N_name" in caplog.text
    order = data.epoch_order(0, seed=1, batch_size=4)
    flat = [i for batch in order for i in batch]
    counts = {data.items[i].caption: flat.count(i) for i in set(flat)}
    assert counts == {"root": 1, "x": 3, "y": 3, "z": 10}
    assert data.samples_per_epoch() == len(flat) == 17


def test_exif_orientation_is_applied(tmp_path: Path):
    root = tmp_path / "d"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees: portrait
    make_image(120, 80).save(root / "phone.jpg", exif=exif)
    item = TrainingData(spec(folder=str(root))).items[0]
    assert item.size == (80, 120) and item.bucket[0] < item.bucket[1]


def test_in_memory_batch_tensor_with_one_caption():
    batch = torch.rand(3, 72, 80, 3)
    data = TrainingData(spec(images=batch, captions=["a cat"]))
    assert len(data) == 3
    assert [i.caption for i in data.items] == ["a cat"] * 3
    assert [i.source for i in data.items] == ["image[0]", "image[1]", "image[2]"]
    # the keys are content hashes: different pixels -> different keys
    assert len({i.key for i in data.items}) == 3
    # later changes to the caller's tensor do not leak into the dataset
    before = data.pixels(0, random.Random(0))
    batch.zero_()
    assert torch.equal(data.pixels(0, random.Random(0)), before)


def test_in_memory_pil_list_with_per_image_captions_and_mixed_items():
    pils = [make_image(64, 64, seed=1), make_image(100, 60, seed=2).convert("RGBA")]
    data = TrainingData(spec(images=[*pils, torch.rand(64, 64, 1)], captions=["a", "b", "c"]))
    assert [i.caption for i in data.items] == ["a", "b", "c"]
    assert data.items[1].bucket[0] > data.items[1].bucket[1]  # landscape
    assert data.pixels(2, random.Random(0)).shape == (3, 64, 64)


def test_in_memory_pixels_match_the_image():
    img = make_image(64, 64, seed=3)
    data = TrainingData(spec(images=[img]))
    out = data.pixels(0, random.Random(0))
    expected = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()
    assert torch.allclose((out + 1) * 127.5, expected, atol=1e-3)


def test_tensor_image_matches_pil_image():
    img = make_image(80, 64, seed=9)
    tensor = torch.from_numpy(np.array(img)).float() / 255.0
    a = TrainingData(spec(images=[img])).pixels(0, random.Random(0))
    b = TrainingData(spec(images=tensor[None])).pixels(0, random.Random(0))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- buckets


@pytest.mark.parametrize("resolution,step", [(512, 64), (1024, 64), (64, 8), (256, 16)])
def test_bucket_candidates_invariants(resolution: int, step: int):
    cands = bucket_candidates(resolution, step, max_aspect=2.0)
    square = resolution // step * step
    assert (square, square) in cands
    for w, h in cands:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution * resolution
        assert max(w, h) / min(w, h) <= 2.0 + 1e-9
    # symmetric: every landscape bucket has its portrait twin
    assert sorted((h, w) for w, h in cands) == cands
    # area-preserving: every bucket holds at least ~70% of the target area
    assert min(w * h for w, h in cands) >= 0.7 * resolution**2


@pytest.mark.parametrize(
    "size", [(1000, 1000), (1200, 800), (800, 1200), (1920, 1080), (1080, 1920), (3000, 900)]
)
def test_choose_bucket_nearest_aspect(size: tuple[int, int]):
    resolution, step = 1024, 64
    cands = bucket_candidates(resolution, step, max_aspect=2.0)
    w, h = choose_bucket(*size, cands)
    aspect = size[0] / size[1]
    clamped = min(max(aspect, 0.5), 2.0)
    error = abs(math.log(w / h) - math.log(clamped))
    # no other candidate is closer in aspect
    assert all(abs(math.log(a / b) - math.log(aspect)) >= error - 1e-12 for a, b in cands)
    assert error < 0.1
    assert (w > h) == (size[0] > size[1]) or size[0] == size[1]
    if size[0] == size[1]:
        assert (w, h) == (1024, 1024)


def test_folder_buckets_portrait_landscape_and_area(folder: Path):
    data = TrainingData(spec(folder=str(folder)))
    by_name = {Path(i.source).name: i.bucket for i in data.items}
    assert by_name["a.png"] == (64, 64)
    lw, lh = by_name["b.JPG"]
    pw, ph = by_name["c.webp"]
    assert lw > lh and pw < ph
    for w, h in by_name.values():
        assert w % 8 == 0 and h % 8 == 0 and w * h <= 64 * 64
    assert sum(data.buckets().values()) == 3
    assert data.buckets()[(64, 64)] == 1


def test_max_aspect_and_min_bucket_side():
    cands = bucket_candidates(512, 64, max_aspect=1.5)
    assert all(max(w, h) / min(w, h) <= 1.5 for w, h in cands)
    assert choose_bucket(3000, 500, cands) == max(cands, key=lambda b: b[0] / b[1])
    assert all(min(b) >= 448 for b in bucket_candidates(512, 64, 4.0, min_side=448))


# --------------------------------------------------------------------------- pixels


def test_pixels_shape_range_and_center_crop_determinism(folder: Path):
    data = TrainingData(spec(folder=str(folder)))
    for index, item in enumerate(data.items):
        out = data.pixels(index, random.Random(index))
        w, h = item.bucket
        assert out.shape == (3, h, w) and out.dtype == torch.float32
        assert out.min() >= -1 and out.max() <= 1
        assert out.max() - out.min() > 0.5  # real content, not a blank
        assert torch.equal(out, data.pixels(index, random.Random(12345)))


def test_random_crop_depends_on_rng(tmp_path: Path):
    save(tmp_path / "d", "wide.png", (160, 64), "wide")
    data = TrainingData(spec(folder=str(tmp_path / "d"), center_crop=False, max_aspect=1.0))
    assert data.items[0].bucket == (64, 64)
    a = data.pixels(0, random.Random(7))
    assert torch.equal(a, data.pixels(0, random.Random(7)))
    crops = [data.pixels(0, random.Random(s)) for s in range(6)]
    assert any(not torch.equal(crops[0], c) for c in crops[1:])
    center = TrainingData(spec(folder=str(tmp_path / "d"), max_aspect=1.0)).pixels(0, None)
    assert any(not torch.equal(center, c) for c in crops)


def test_flip_mirrors_and_depends_on_rng(folder: Path):
    plain = TrainingData(spec(folder=str(folder)))
    flipping = TrainingData(spec(folder=str(folder), flip=True))
    base = plain.pixels(1, random.Random(0))
    seen = set()
    for seed in range(20):
        out = flipping.pixels(1, random.Random(seed))
        assert torch.equal(out, flipping.pixels(1, random.Random(seed)))
        flipped = random.Random(seed).random() < 0.5  # the one draw flip makes
        expected = torch.flip(base, dims=[-1]) if flipped else base
        assert torch.equal(out, expected)
        seen.add(flipped)
    assert seen == {True, False}
    assert not torch.equal(base, torch.flip(base, dims=[-1]))  # the image is not symmetric


# --------------------------------------------------------------------------- captions


def test_caption_dropout_rate_and_trigger_word(tmp_path: Path):
    save(tmp_path / "d", "a.png", (64, 64), "a red square")
    data = TrainingData(spec(folder=str(tmp_path / "d"), caption_dropout=0.2, trigger_word="sks"))
    rng = random.Random(1234)
    draws = [data.caption(0, rng) for _ in range(2000)]
    dropped = draws.count("")
    assert 0.17 < dropped / 2000 < 0.23
    assert set(draws) == {"", "sks, a red square"}


def test_trigger_word_placement_cases():
    images = [torch.rand(64, 64, 3) for _ in range(3)]
    data = TrainingData(spec(images=images, captions=["", "sks dog", "skster"], trigger_word="sks"))
    rng = random.Random(0)
    assert [data.caption(i, rng) for i in range(3)] == ["sks", "sks dog", "sks, skster"]
    no_trigger = TrainingData(spec(images=images, captions=["x", "y", "z"]))
    assert no_trigger.caption(1, rng) == "y"


# --------------------------------------------------------------------------- epochs


def test_epoch_order_deterministic_same_bucket_and_varies(tmp_path: Path):
    root = tmp_path / "d"
    sizes = [(64, 64), (96, 64), (64, 96), (100, 100), (120, 80), (80, 120), (70, 70)]
    for i, size in enumerate(sizes):
        save(root / "2_x", f"{i}.png", size, f"img {i}", seed=i)
    data = TrainingData(spec(folder=str(root)))
    assert len(data.buckets()) == 3
    a = data.epoch_order(3, seed=42, batch_size=2)
    assert a == data.epoch_order(3, seed=42, batch_size=2)
    assert a == TrainingData(spec(folder=str(root))).epoch_order(3, seed=42, batch_size=2)
    assert a != data.epoch_order(4, seed=42, batch_size=2)
    assert a != data.epoch_order(3, seed=43, batch_size=2)
    for batch in a:
        assert 1 <= len(batch) <= 2
        assert len({data.items[i].bucket for i in batch}) == 1
    flat = sorted(i for batch in a for i in batch)
    assert flat == sorted(list(range(len(sizes))) * 2)
    # per bucket, only the last batch may be short
    for bucket, count in data.buckets().items():
        lengths = [len(b) for b in a if data.items[b[0]].bucket == bucket]
        assert sum(lengths) == 2 * count
        assert sum(1 for n in lengths if n < 2) <= 1


def test_keys_and_fingerprint(folder: Path, tmp_path: Path):
    a = TrainingData(spec(folder=str(folder)))
    keys = [item.key for item in a.items]
    assert all(len(k) >= 16 and all(c in "0123456789abcdef" for c in k) for k in keys)
    assert len(set(keys)) == 3
    # stable across loads and independent of where the folder lives
    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    b = TrainingData(spec(folder=str(moved)))
    assert [i.key for i in b.items] == keys and b.fingerprint() == a.fingerprint()
    assert len(a.fingerprint()) == 64
    # caption, crop/flip settings and image bytes change keys and fingerprint
    (moved / "a.txt").write_text("another caption", encoding="utf-8")
    c = TrainingData(spec(folder=str(moved)))
    assert c.items[0].key != keys[0] and c.items[1].key == keys[1]
    assert c.fingerprint() != a.fingerprint()
    d = TrainingData(spec(folder=str(moved), center_crop=False))
    assert d.items[1].key != c.items[1].key
    make_image(128, 80, seed=99).save(moved / "b.JPG", format="JPEG")
    e = TrainingData(spec(folder=str(moved)))
    assert e.items[1].key != c.items[1].key


# --------------------------------------------------------------------------- errors


def test_missing_folder(tmp_path: Path):
    with pytest.raises(DatasetError, match="not found") as info:
        TrainingData(spec(folder=str(tmp_path / "nope")))
    assert str(tmp_path / "nope") in str(info.value)
    assert isinstance(info.value, LycorisError) and isinstance(info.value, ValueError)


def test_empty_folder_names_extensions(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError) as info:
        TrainingData(spec(folder=str(tmp_path / "empty")))
    message = str(info.value)
    assert "no images found" in message and "N_name" in message
    assert all(ext in message for ext in IMAGE_EXTENSIONS)


def test_corrupt_image_raises_or_is_skipped_with_one_warning(folder: Path, caplog):
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    (folder / "worse.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"bad\.png: corrupt") as info:
        TrainingData(spec(folder=str(folder)))
    assert "skip_bad" in str(info.value)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        data = TrainingData(spec(folder=str(folder), skip_bad=True))
    assert sorted(Path(i.source).name for i in data.items) == ["a.png", "b.JPG", "c.webp"]
    unpaired = [r for r in warnings_of(caplog) if "without" in r.getMessage()]
    assert len(unpaired) == 1 and "notes.txt" in unpaired[0].getMessage()  # its own warning
    records = [r for r in warnings_of(caplog) if r not in unpaired]
    assert len(records) == 1
    assert "bad.png" in records[0].getMessage() and "worse.jpg" in records[0].getMessage()
    assert "skipped 2 of 5" in records[0].getMessage()


def test_truncated_image_is_corrupt(tmp_path: Path):
    path = save(tmp_path / "d", "t.png", (96, 96), "t")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match="corrupt"):
        TrainingData(spec(folder=str(tmp_path / "d")))


def test_image_too_small_for_its_bucket(tmp_path: Path, caplog):
    save(tmp_path / "d", "big.png", (80, 80), "ok")
    save(tmp_path / "d", "tiny.png", (40, 30), "small")
    with pytest.raises(
        DatasetError,
        match=r"tiny.png: image is 40x30, smaller than its bucket 72x56.*at least 72x56",
    ) as info:
        TrainingData(spec(folder=str(tmp_path / "d")))
    assert "resolution" in str(info.value)
    data = TrainingData(spec(folder=str(tmp_path / "d"), skip_bad=True))
    assert [Path(i.source).name for i in data.items] == ["big.png"]
    assert len(warnings_of(caplog)) == 1
    with pytest.raises(DatasetError, match="no usable images"):
        TrainingData(spec(images=[torch.rand(30, 30, 3)], skip_bad=True))


def test_unreadable_caption(tmp_path: Path):
    path = save(tmp_path / "d", "a.png", (64, 64), None)
    path.with_suffix(".txt").write_bytes(b"\xff\xfe\xfa broken")
    with pytest.raises(DatasetError, match=r"a.txt: unreadable caption.*UTF-8"):
        TrainingData(spec(folder=str(tmp_path / "d")))


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({}, "exactly one of 'folder'.*neither"),
        ({"folder": "x", "images": [torch.rand(8, 8, 3)]}, "exactly one.*not both"),
        ({"folder": "x", "caption_dropout": -0.1}, "'caption_dropout' must be a probability"),
        ({"folder": "x", "caption_dropout": 1.5}, "'caption_dropout'"),
        ({"folder": "x", "bucket_step": 0}, "'bucket_step' must be an integer >= 1"),
        ({"folder": "x", "bucket_step": 8.0}, "'bucket_step'"),
        ({"folder": "x", "resolution": 4, "bucket_step": 8}, "'resolution' must be"),
        ({"folder": "x", "max_aspect": 0.5}, "'max_aspect' must be a number >= 1"),
        ({"folder": "x", "max_aspect": float("nan")}, "'max_aspect'"),
        ({"folder": "x", "min_bucket_side": 1000}, "'min_bucket_side'"),
        ({"folder": "x", "flip": "yes"}, "'flip' must be true or false"),
        ({"folder": "x", "trigger_word": 3}, "'trigger_word' must be a string"),
        ({"folder": "x", "captions": ["a"]}, "'captions' is only for in-memory"),
        ({"folder": ""}, "'folder' must be a non-empty path"),
        ({"images": []}, "'images' is empty"),
        ({"images": "pic.png"}, "'images' must be"),
        ({"images": [torch.rand(8, 8)]}, r"images\[0\] has shape \[8, 8\]"),
        ({"images": [42]}, r"images\[0\] is a int"),
        ({"images": torch.rand(2, 8, 8, 3), "captions": ["a", "b", "c"]}, "3 entries for 2"),
        ({"images": torch.rand(1, 8, 8, 3), "captions": "a cat"}, "'captions' must be a list"),
    ],
)
def test_bad_spec_values(kwargs: dict, pattern: str):
    with pytest.raises(DatasetError, match=pattern):
        DatasetSpec(**kwargs)


def test_spec_replace_revalidates_and_is_comparable(tmp_path: Path):
    s = DatasetSpec(folder=tmp_path)
    assert s.folder == str(tmp_path)
    assert dataclasses.replace(s, bucket_step=16).bucket_step == 16
    assert dataclasses.replace(s) == s and hash(dataclasses.replace(s)) == hash(s)
    with pytest.raises(DatasetError, match="bucket_step"):
        dataclasses.replace(s, bucket_step=-1)
    m = DatasetSpec(images=torch.rand(2, 8, 8, 3))
    assert dataclasses.replace(m, flip=True).flip is True
    with pytest.raises(DatasetError, match="NaN"):
        TrainingData(DatasetSpec(images=torch.full((1, 64, 64, 3), float("nan")), resolution=64))


def test_epoch_order_bad_arguments(folder: Path):
    data = TrainingData(spec(folder=str(folder)))
    with pytest.raises(DatasetError, match="batch_size"):
        data.epoch_order(0, 0, 0)
    with pytest.raises(DatasetError, match="epoch"):
        data.epoch_order(-1, 0, 1)
    with pytest.raises(DatasetError, match="seed"):
        data.epoch_order(0, "1", 1)
    assert data.epoch_order(0, np.int64(5), 2) == data.epoch_order(0, 5, 2)


# --------------------------------------------------------------------------- feature cache


def test_feature_cache_memory_only_computes_once():
    cache = FeatureCache(None, "latents-abc-64")
    calls = []

    def compute():
        calls.append(1)
        return {"latents": torch.arange(6.0).reshape(2, 3)}

    first = cache.get_or_compute("k1", compute)
    second = cache.get_or_compute("k1", compute)
    assert len(calls) == 1 and cache.misses == 1 and cache.hits == 1
    assert torch.equal(first["latents"], second["latents"])
    cache.clear_memory()
    cache.get_or_compute("k1", compute)
    assert len(calls) == 2 and cache.misses == 2


def test_feature_cache_disk_persistence(tmp_path: Path):
    value = {"latents": torch.randn(4, 8, 8), "pooled": torch.randn(3).to(torch.bfloat16)}
    one = FeatureCache(str(tmp_path), "ns1")
    one.get_or_compute("abc123", lambda: value)
    assert (tmp_path / "ns1" / "abc123.safetensors").is_file()
    two = FeatureCache(str(tmp_path), "ns1")

    def never():
        raise AssertionError("compute must not run on a disk hit")

    got = two.get_or_compute("abc123", never)
    assert two.hits == 1 and two.misses == 0
    assert got.keys() == value.keys()
    assert all(torch.equal(got[k], value[k]) and got[k].dtype == value[k].dtype for k in value)


def test_feature_cache_corrupt_file_is_recomputed(tmp_path: Path, caplog):
    FeatureCache(str(tmp_path), "ns").get_or_compute("k", lambda: {"x": torch.ones(5)})
    path = tmp_path / "ns" / "k.safetensors"
    path.write_bytes(path.read_bytes()[:20])  # truncated
    fresh = FeatureCache(str(tmp_path), "ns")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = fresh.get_or_compute("k", lambda: {"x": torch.full((5,), 2.0)})
    assert torch.equal(got["x"], torch.full((5,), 2.0))
    assert fresh.misses == 1 and len(warnings_of(caplog)) == 1
    assert "k.safetensors" in warnings_of(caplog)[0].getMessage()
    # the rewritten file is good again
    again = FeatureCache(str(tmp_path), "ns").get_or_compute("k", lambda: {})
    assert torch.equal(again["x"], torch.full((5,), 2.0))


def test_feature_cache_namespaces_are_separate(tmp_path: Path):
    a = FeatureCache(str(tmp_path), "model-a")
    b = FeatureCache(str(tmp_path), "model-b")
    a.get_or_compute("k", lambda: {"x": torch.zeros(2)})
    got = b.get_or_compute("k", lambda: {"x": torch.ones(2)})
    assert torch.equal(got["x"], torch.ones(2)) and b.misses == 1
    # a file moved into the wrong namespace is not trusted
    (tmp_path / "model-b" / "k.safetensors").unlink()
    (tmp_path / "model-a" / "k.safetensors").rename(tmp_path / "model-b" / "k.safetensors")
    c = FeatureCache(str(tmp_path), "model-b")
    assert torch.equal(c.get_or_compute("k", lambda: {"x": torch.ones(2)})["x"], torch.ones(2))
    assert c.misses == 1


@pytest.mark.parametrize("key", ["../x", "a/b", "", ".hidden", "a b", "x" * 300, 5])
def test_feature_cache_invalid_key_and_namespace(tmp_path: Path, key):
    cache = FeatureCache(str(tmp_path), "ok")
    with pytest.raises(DatasetError, match="not filesystem-safe"):
        cache.get_or_compute(key, lambda: {"x": torch.zeros(1)})
    with pytest.raises(DatasetError, match="not filesystem-safe"):
        FeatureCache(str(tmp_path), key)


def test_feature_cache_bad_compute_result_and_lru():
    cache = FeatureCache(None, "ns", max_items=2)
    with pytest.raises(DatasetError, match="must return a dict"):
        cache.get_or_compute("k", lambda: torch.zeros(1))
    for key in ("a", "b", "c"):
        cache.get_or_compute(key, lambda: {"x": torch.zeros(1)})
    assert len(cache) == 2
    cache.get_or_compute("a", lambda: {"x": torch.zeros(1)})
    assert cache.misses == 5  # the failed compute, a, b, c, then "a" again (evicted)


def test_feature_cache_with_training_data_keys(folder: Path, tmp_path: Path):
    data = TrainingData(spec(folder=str(folder)))
    cache = FeatureCache(str(tmp_path / "cache"), "latents-test-64")
    for i, item in enumerate(data.items):
        cache.get_or_compute(item.key, lambda i=i: {"p": data.pixels(i, random.Random(0))})
    reloaded = FeatureCache(str(tmp_path / "cache"), "latents-test-64")
    for i, item in enumerate(data.items):
        got = reloaded.get_or_compute(item.key, lambda: {})
        assert torch.equal(got["p"], data.pixels(i, random.Random(0)))
    assert reloaded.hits == 3
