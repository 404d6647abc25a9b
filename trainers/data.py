"""Datasets named by the spec, loaded into memory as float32 arrays shaped (N, C, H, W).

Both sets are small (MNIST is 47 MB as uint8), so every Ray Train worker loads its own copy and
takes its shard by index. Under online distillation a worker puts its training inputs into the
object store once, and its teacher requests carry row indices into them.
"""

from __future__ import annotations

import gzip
import hashlib
import queue
import struct
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specs.errors import InputError
from specs.job import DigitsData, MnistData


class DataError(InputError):
    """The data named by the spec is missing, damaged or unreadable."""


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray  # (N, C, H, W) float32, normalised
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


# name -> md5 of the *uncompressed* IDX file (gzip bytes may differ between re-packs)
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def read_idx(raw: bytes, name: str) -> np.ndarray:
    """Parse an uncompressed IDX file (big-endian header: magic, then one uint32 per dimension)."""
    if len(raw) < 4:
        raise DataError(f"{name}: too short to be an IDX file ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DataError(f"{name}: not an unsigned-byte IDX file (bad magic)")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{name}: truncated or padded: {len(raw)} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_verified(path: Path) -> bytes:
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot decompress ({err})") from None
    digest = hashlib.md5(raw).hexdigest()
    if digest != MNIST_FILES[path.name]:
        raise DataError(
            f"{path}: md5 of the uncompressed file is {digest}, expected {MNIST_FILES[path.name]}"
        )
    return raw


def _download(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in MNIST_MIRRORS:
        try:
            with urllib.request.urlopen(mirror + name, timeout=30) as response:
                data = response.read()
            tmp = folder / f".{name}.part"
            tmp.write_bytes(data)
            tmp.rename(folder / name)
            return
        except OSError as err:
            errors.append(f"{mirror}: {err}")
    raise DataError(f"could not download {name}: " + "; ".join(errors))


def load_mnist(spec: MnistData, data_dir: str | None) -> Dataset:
    root = data_dir or spec.dir
    if root is None:
        raise DataError("MNIST needs a data dir: pass --data-dir or set `data.dir` in the spec")
    folder = Path(root) / "mnist"
    missing = [n for n in MNIST_FILES if not (folder / n).is_file()]
    if missing and spec.download:
        for name in missing:
            _download(folder, name)
        missing = []
    if missing:
        raise DataError(
            f"MNIST files missing in {folder}: {', '.join(missing)} "
            f"(expected all of: {', '.join(MNIST_FILES)}; set `data.download: true` to fetch them)"
        )
    arrays = {n: read_idx(_read_verified(folder / n), n) for n in MNIST_FILES}
    x_train = arrays["train-images-idx3-ubyte.gz"]
    y_train = arrays["train-labels-idx1-ubyte.gz"]
    if spec.train_limit is not None:
        x_train, y_train = x_train[: spec.train_limit], y_train[: spec.train_limit]

    def norm(x: np.ndarray) -> np.ndarray:  # (N, 28, 28) uint8 -> (N, 1, 28, 28) float32
        return ((x.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD)[:, None]

    return Dataset(
        x_train=norm(x_train),
        y_train=y_train.astype(np.int64),
        x_test=norm(arrays["t10k-images-idx3-ubyte.gz"]),
        y_test=arrays["t10k-labels-idx1-ubyte.gz"].astype(np.int64),
        num_classes=10,
    )


def load_digits(spec: DigitsData, seed: int) -> Dataset:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8), pixels in [0, 1]
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=spec.test_fraction, random_state=seed, stratify=y
    )
    return Dataset(x_train, y_train, x_test, y_test, num_classes=10)


def load_dataset(spec: DigitsData | MnistData, data_dir: str | None, seed: int) -> Dataset:
    if isinstance(spec, DigitsData):
        return load_digits(spec, seed)
    if isinstance(spec, MnistData):
        return load_mnist(spec, data_dir)
    raise TypeError(f"no loader for {type(spec).__name__}")


def epoch_shard(
    num_samples: int, batch_size: int, epoch: int, seed: int, rank: int, world_size: int
) -> list[np.ndarray]:
    """This rank's batches of sample indices for one epoch.

    One permutation per (seed, epoch), shared by all ranks, dealt out round-robin. Every rank gets
    the same number of full batches (the tail is dropped): unequal step counts would leave one rank
    waiting forever in a collective.
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    per_rank = num_samples // world_size
    mine = order[rank::world_size][:per_rank]
    steps = per_rank // batch_size
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


class Prefetcher:
    """Runs an iterator on a background thread, `depth` items ahead of the consumer.

    A training step spends most of its time in torch ops that release the GIL, so the next
    batch's gather, logit-cache read and teacher round trip happen on the other core meanwhile.
    An exception in the iterator is raised to the consumer at the item where it happened;
    `close()` (or leaving a `with` block) stops the thread.
    """

    _END = object()

    def __init__(self, iterable, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(iterable),), daemon=True,
                                        name="stillhouse-prefetch")
        self._thread.start()

    def _put(self, entry: tuple) -> bool:
        """Queue `entry` once there is room; False if stopped first."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source) -> None:
        try:
            for item in source:
                if not self._put((item, None)):
                    return
            entry = (self._END, None)
        except BaseException as err:  # handed to the consumer, raised there
            entry = (None, err)
        self._put(entry)

    def __iter__(self):
        while True:
            item, error = self._queue.get()
            if error is not None:
                raise error
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
