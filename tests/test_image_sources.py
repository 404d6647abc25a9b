"""Streamed image sources without Ray: listing and its errors, decoding, the per-rank epoch
reader, preprocessing and augmentation. Files are written the way their tools write them: PNGs
by Pillow, parquet by pyarrow (scripts/digits_files.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq
import pytest
import torch

from specs.job import DigitsData, ImageFolderData, ParquetData
from trainers.data import (
    DataError, augment_batch, channel_stats, ids_multiset_hash, load_digits, sample_random_bits,
)
from trainers.image_sources import (
    FORMAT, MANIFEST, StreamedData, decode_image, image_cells, list_source, rank_ranges,
    steps_per_epoch,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import digits_files  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return digits_files.write_image_folder(tmp_path_factory.mktemp("png") / "digits", limit=40)


def _image_folder(root: Path, **extra) -> ImageFolderData:
    return ImageFolderData(kind="image_folder", train=str(root / "train"), test=str(root / "test"),
                           **extra)


def test_image_folder_listing(folder):
    listing = list_source(_image_folder(folder), None)
    assert listing.classes == [str(d) for d in range(10)]
    assert listing.channels == 1 and listing.size == (8, 8) and listing.fixed_size
    assert listing.train_rows == len(list((folder / "train").rglob("*.png")))
    again = list_source(_image_folder(folder, image_size=(16, 16), channels=3), None)
    assert (again.channels, again.size, again.fixed_size) == (3, (16, 16), False)
    assert again.key != listing.key  # another preprocessing, another prepared copy


def test_missing_class_in_the_test_set_is_named(folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "test" / "7")
    with pytest.raises(DataError, match=r"classes missing from the test set: \['7'\]"):
        list_source(_image_folder(copy), None)


def test_parquet_listing_checks_columns_and_labels(tmp_path):
    root = digits_files.write_parquet(tmp_path / "pq", labels_as="str")
    spec = ParquetData(kind="parquet", train=str(root / "train-*.parquet"),
                       test=str(root / "test-*.parquet"))
    listing = list_source(spec, None)
    assert listing.classes == [f"digit-{d}" for d in range(10)]  # string labels, sorted
    with pytest.raises(DataError, match="`data.image_column`.*'pixels'"):
        list_source(spec.model_copy(update={"image_column": "pixels"}), None)
    with pytest.raises(DataError, match="no file matches"):
        list_source(spec.model_copy(update={"train": str(root / "nothing-*.parquet")}), None)
    # the test set's labels lack a class the training set has
    for path in root.glob("test-*.parquet"):
        t = pq.read_table(path)
        pq.write_table(t.filter(pa.compute.not_equal(t.column("label"), "digit-3")), path)
    with pytest.raises(DataError, match=r"classes missing from the test set: \['digit-3'\]"):
        list_source(spec, None)


def test_decode_images_and_arrays():
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    png = digits_files.png_bytes(image)
    assert np.array_equal(decode_image(png, 1, None, "x")[0], image)
    rgb = decode_image(png, 3, (16, 16), "x")
    assert rgb.shape == (3, 16, 16) and np.array_equal(rgb[0], rgb[2])
    assert np.array_equal(decode_image(image.tolist(), 1, None, "x")[0], image)
    with pytest.raises(DataError, match="not a readable image"):
        decode_image(b"\x89PNG not really", 1, None, "bad.png")
    with pytest.raises(DataError, match="outside 0..255"):
        decode_image(np.full((8, 8), 300), 1, None, "x")


def _prepared(tmp_path: Path, sizes: list[int]) -> StreamedData:
    """A prepared copy whose shards hold the given row counts, ids permuted across shards."""
    n = sum(sizes)
    ids = np.random.default_rng(0).permutation(n)
    shards, start = [], 0
    for i, size in enumerate(sizes):
        part = ids[start:start + size]
        start += size
        pixels = np.repeat(part % 256, 4).astype(np.uint8).reshape(size, 4)
        table = pa.table({"id": part, "label": part % 3, "image": image_cells(pixels)})
        pq.write_table(table, tmp_path / f"s{i}.parquet")
        shards.append({"file": f"s{i}.parquet", "rows": size})
    manifest = {"format": FORMAT, "key": "k", "image_shape": [1, 2, 2], "classes": ["a", "b", "c"],
                "normalization": None, "train": shards, "test": shards, "train_rows": n,
                "test_rows": n, "source": {}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    return StreamedData.open(tmp_path)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch", [32, 499, 500])
def test_each_rank_reads_its_share_once_with_equal_steps(tmp_path, world, batch):
    data = _prepared(tmp_path, [300, 300, 250, 151])  # 1001 rows
    n = data.train_rows
    seen, steps = [], []
    for rank in range(world):
        batches = list(data.epoch_batches(batch, 5, 0, rank, world, buffer_rows=128))
        steps.append(len(batches))
        assert all(len(b[0]) >= 2 for b in batches)  # never a batch of one (BatchNorm)
        for ids, images, labels in batches:
            assert np.array_equal(labels, ids % 3) and np.array_equal(images[:, 0, 0, 0], ids % 256)
            seen += ids.tolist()
    assert len(seen) == len(set(seen)) == n // world * world  # once each; < world rows left out
    assert steps == [steps_per_epoch(n, world, batch)] * world  # no rank waits on another
    # evaluation covers every row, split over the ranks
    assert sum(len(y) for r in range(world) for _, y in data.eval_batches(r, world, 100)) == n


def test_epoch_order_is_a_function_of_seed_and_epoch(tmp_path):
    data = _prepared(tmp_path, [200, 200, 100])

    def first(epoch, seed=0):
        return next(iter(data.epoch_batches(16, epoch, seed, 0, 2, 64)))[0].tolist()

    assert first(1) == first(1) and first(1) != first(2) and first(1, seed=1) != first(1)


def test_rank_ranges_cover_exactly():
    sizes = [5, 7, 3]
    pieces = [rank_ranges(sizes, r, 2, exact=False) for r in range(2)]
    rows = sum(b - a for p in pieces for _, a, b in p)
    assert rows == 15
    assert sum(b - a for _, a, b in rank_ranges(sizes, 1, 2, exact=True)) == 7


def test_ids_hash_proves_each_sample_once():
    ids = np.arange(1000)
    whole = ids_multiset_hash(ids)
    parts = np.array_split(np.random.default_rng(0).permutation(1000), 3)
    assert sum(ids_multiset_hash(p) for p in parts) % (1 << 64) == whole
    twice = np.r_[ids[:-1], 0]  # one sample twice, one never
    assert ids_multiset_hash(twice) != whole


def test_augmentation_is_per_sample_and_shifts_within_padding():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    ids = np.array([10, 11])
    a = augment_batch(x, ids, 0, 3, padding=2, hflip=True, pad_value=[-1.0])
    # the same sample in another batch (alone, or after another) gets the same transform
    alone = augment_batch(x[1:], ids[1:], 0, 3, padding=2, hflip=True, pad_value=[-1.0])
    assert torch.equal(a[1:], alone)
    assert not torch.equal(augment_batch(x, ids, 0, 4, 2, True, [-1.0]), a)  # another epoch
    # every output pixel is an input pixel (maybe mirrored) or the pad value
    for i in range(2):
        values = set(a[i].flatten().tolist())
        assert values <= set(x[i].flatten().tolist()) | {-1.0}
    bits = sample_random_bits(ids, 0, 3)
    assert bits.dtype == np.uint64 and bits[0] != bits[1]


def test_preprocessing_of_an_in_memory_source():
    plain = load_digits(DigitsData(kind="digits"), seed=0)
    rgb = load_digits(DigitsData(kind="digits", image_size=(16, 16), channels=3, normalize="auto"),
                      seed=0)
    assert rgb.image_shape == (3, 16, 16) and plain.image_shape == (1, 8, 8)
    mean, std = channel_stats(rgb.x_train)
    # normalized by the training set's own statistics: mean 0, std 1 per channel (float32 sums)
    assert np.allclose(mean, 0.0, atol=1e-4) and np.allclose(std, 1.0, atol=1e-3)
    assert rgb.normalization is not None and len(rgb.normalization[0]) == 3
    with pytest.raises(DataError, match="test_fraction"):
        load_digits(DigitsData(kind="digits", test_fraction=0.000001), seed=0)
