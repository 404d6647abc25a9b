"""Datasets: digits offline, MNIST verified by md5, clear errors for missing or damaged files."""

import gzip
import struct

import numpy as np
import pytest

from specs.job import DigitsData, MnistData
from trainers.data import MNIST_FILES, DataError, epoch_shard, load_digits, load_mnist, read_idx


def test_digits_loads_offline():
    ds = load_digits(DigitsData(kind="digits"), seed=0)
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.x_train.dtype == np.float32
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert set(np.unique(ds.y_test)) == set(range(10))


def test_mnist_from_shared_data(shared_data):
    ds = load_mnist(MnistData(kind="mnist", train_limit=1000), str(shared_data))
    assert ds.x_train.shape == (1000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_test.dtype == np.int64 and abs(float(ds.x_test.mean())) < 0.1  # normalised


def _mnist_copy(shared_data, tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in MNIST_FILES:
        (folder / name).symlink_to(shared_data / "mnist" / name)
    return folder


def test_missing_files_are_named(shared_data, tmp_path):
    folder = _mnist_copy(shared_data, tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        load_mnist(MnistData(kind="mnist"), str(tmp_path))
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)
    assert "train-images-idx3-ubyte.gz" in str(info.value)  # lists what is expected


def test_wrong_md5_is_rejected(shared_data, tmp_path):
    folder = _mnist_copy(shared_data, tmp_path)
    target = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(target.read_bytes()))
    raw[100] ^= 1
    target.unlink()
    target.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="md5"):
        load_mnist(MnistData(kind="mnist"), str(tmp_path))


def test_truncated_gzip_is_rejected(shared_data, tmp_path):
    folder = _mnist_copy(shared_data, tmp_path)
    target = folder / "t10k-labels-idx1-ubyte.gz"
    data = target.read_bytes()
    target.unlink()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot decompress"):
        load_mnist(MnistData(kind="mnist"), str(tmp_path))


def test_no_data_dir_is_a_clear_error():
    with pytest.raises(DataError, match="--data-dir"):
        load_mnist(MnistData(kind="mnist"), None)


def test_idx_header_checks():
    good = struct.pack(">HBB2I", 0, 8, 2, 2, 3) + bytes(6)
    assert read_idx(good, "x").shape == (2, 3)
    with pytest.raises(DataError, match="truncated"):
        read_idx(good[:-1], "x")
    with pytest.raises(DataError, match="magic"):
        read_idx(b"\x01" + good[1:], "x")


def test_epoch_shards_are_disjoint_and_equal():
    shards = [epoch_shard(1001, 32, epoch=3, seed=7, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # same step count on every rank
    flat = np.concatenate([np.concatenate(s) for s in shards])
    assert len(flat) == len(set(flat.tolist()))
    again = epoch_shard(1001, 32, epoch=3, seed=7, rank=1, world_size=3)
    assert all((a == b).all() for a, b in zip(again, shards[1]))
    other = epoch_shard(1001, 32, epoch=4, seed=7, rank=1, world_size=3)
    assert not (other[0] == shards[1][0]).all()


def test_prefetcher_keeps_order_raises_where_the_source_failed_and_stops_early():
    import threading

    from trainers.data import Prefetcher

    with Prefetcher(iter(range(50)), depth=3) as items:
        assert list(items) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise ValueError("bad shard")

    got = []
    with pytest.raises(ValueError, match="bad shard"):
        with Prefetcher(failing(), depth=2) as items:
            for item in items:
                got.append(item)
    assert got == [1, 2]  # every item before the failure arrived first

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    prefetcher = Prefetcher(endless(), depth=2)
    for item in prefetcher:
        if item == 5:
            break
    prefetcher.close()
    assert not any(t.name == "stillhouse-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(produced) <= 5 + 1 + 2 + 1  # at most `depth` (+ the one being put) ahead
