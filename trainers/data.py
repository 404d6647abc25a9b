"""Data for a job: images as (N, C, H, W), labels as class indices, and what both have in common.

Two kinds of source:

* in memory (`digits`, `mnist`, `idx`): small sets, loaded whole by every process that needs them
  as float32 arrays, already preprocessed. Under online distillation a worker puts its training
  inputs into the object store once, and its teacher requests carry row indices into them;
* streamed (`parquet`, `image_folder`, trainers/image_sources.py): decoded once into a prepared
  copy on disk and streamed to the workers by Ray Data, never held whole by one process.

Preprocessing is the same for both, in this order: resize to `image_size` (bilinear,
antialiased), convert to `channels`, pixels to [0, 1], normalize by the mean and std (given, or
`auto`: computed once on the training set). Teacher and student receive the same tensor.
Training augmentation (random shifts by padding and cropping, horizontal flips) is applied per
training batch by `augment_batch`, with randomness drawn from (seed, epoch, sample id), so that a
sample gets the same crop in an epoch however the stream is batched or sharded.

Every sample has a stable id: its row in the training (or test) set, in the source's order. The
logit cache is keyed by it.
"""

from __future__ import annotations

import gzip
import hashlib
import queue
import struct
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specs.errors import InputError
from specs.job import DigitsData, IdxData, ImagePreprocessing, MnistData, Normalization


class DataError(InputError):
    """The data named by the spec is missing, damaged or unreadable."""


# ------------------------------------------------------------------------------ preprocessing


def normalization_stats(spec: ImagePreprocessing, channels: int,
                        auto: tuple[list[float], list[float]] | None) -> tuple[list, list] | None:
    """(mean, std) per channel that the data is normalized with, or None for `normalize: none`.
    `auto` is the training set's own (mean, std), used for `normalize: auto`."""
    if spec.normalize == "none":
        return None
    if spec.normalize == "auto":
        return auto
    norm: Normalization = spec.normalize
    if len(norm.mean) not in (1, channels):
        raise DataError(f"`data.normalize` gives {len(norm.mean)} values for {channels}-channel "
                        "images: give one per channel (or one for all)")
    return ([float(norm.mean[i % len(norm.mean)]) for i in range(channels)],
            [float(norm.std[i % len(norm.std)]) for i in range(channels)])


def normalize(x: np.ndarray, stats: tuple[list, list] | None) -> np.ndarray:
    """(N, C, H, W) float32 pixels in [0, 1] -> normalized float32."""
    if stats is None:
        return x
    mean, std = stats
    if len(mean) == 1:  # Python floats: the same arithmetic the single-channel sets always used
        return (x - mean[0]) / std[0]
    m = np.asarray(mean, np.float32)[None, :, None, None]
    s = np.asarray(std, np.float32)[None, :, None, None]
    return (x - m) / s


def resize_and_convert(x: np.ndarray, spec: ImagePreprocessing) -> np.ndarray:
    """(N, C, H, W) float32 -> the spec's `image_size` and `channels` (same value range)."""
    import torch
    from torch.nn import functional as F

    if spec.image_size is not None and tuple(x.shape[2:]) != tuple(spec.image_size):
        t = F.interpolate(torch.from_numpy(np.ascontiguousarray(x)), size=tuple(spec.image_size),
                          mode="bilinear", antialias=True, align_corners=False)
        x = t.numpy()
    if spec.channels is not None and x.shape[1] != spec.channels:
        x = convert_channels(x, spec.channels)
    return np.ascontiguousarray(x, dtype=np.float32)


def convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """(N, C, H, W) to 1 channel (ITU-R 601-2 luma, as Pillow's "L") or 3 (grey repeated)."""
    if channels == 3 and x.shape[1] == 1:
        return np.repeat(x, 3, axis=1)
    if channels == 1 and x.shape[1] == 3:
        luma = np.asarray([0.299, 0.587, 0.114], dtype=x.dtype)[None, :, None, None]
        return (x * luma).sum(axis=1, keepdims=True)
    raise DataError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (N, C, H, W) pixels, accumulated in float64."""
    flat = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).astype(np.float64)
    return flat.mean(1).tolist(), np.maximum(flat.std(1), 1e-6).tolist()


# ------------------------------------------------------------------------------ augmentation


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: uint64 -> well-mixed uint64 (vectorised, wraps on overflow)."""
    z = values.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_random_bits(ids: np.ndarray, seed: int, epoch_key: int) -> np.ndarray:
    """64 random bits per sample, a pure function of (seed, epoch, sample id)."""
    with np.errstate(over="ignore"):
        base = _mix64(np.array([seed * 1_000_003 + epoch_key], dtype=np.uint64))[0]
        return _mix64(np.asarray(ids, dtype=np.uint64) ^ base)


def ids_multiset_hash(ids: np.ndarray) -> int:
    """A hash of a multiset of sample ids that adds up over batches and ranks: the sum of each
    id's 64-bit mix, mod 2^64. Two epochs' hashes agree when they saw the same ids the same
    number of times (a different multiset collides with probability about 2^-64)."""
    mixed = _mix64(np.asarray(ids, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    with np.errstate(over="ignore"):
        return int(mixed.sum(dtype=np.uint64))


def augment_batch(x, ids: np.ndarray, seed: int, epoch_key: int, padding: int, hflip: bool,
                  pad_value: list[float]):
    """Random shifts (pad by `padding`, crop back at a random offset) and horizontal flips of a
    (B, C, H, W) float tensor; padded pixels take `pad_value` per channel (a black pixel,
    normalized). The same sample in the same epoch always gets the same transform."""
    import torch

    bits = sample_random_bits(ids, seed, epoch_key)
    b, c, h, w = x.shape
    if padding > 0:
        span = np.uint64(2 * padding + 1)
        dy = torch.from_numpy((bits % span).astype(np.int64))  # (B,) offsets in [0, 2p]
        dx = torch.from_numpy(((bits // span) % span).astype(np.int64))
        fill = torch.tensor(pad_value, dtype=x.dtype).view(1, c, 1, 1)
        padded = fill.expand(b, c, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding:padding + h, padding:padding + w] = x
        rows = dy[:, None] + torch.arange(h)[None, :]  # (B, H)
        cols = dx[:, None] + torch.arange(w)[None, :]  # (B, W)
        batch = torch.arange(b)[:, None, None]
        # (B, H, W, C) gathered per sample, back to (B, C, H, W)
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if hflip:
        flip = torch.from_numpy(((bits >> np.uint64(40)) & np.uint64(1)).astype(bool))
        if bool(flip.any()):
            x = x.clone()
            x[flip] = x[flip].flip(-1)
    return x.contiguous()


# ----------------------------------------------------------------------------- in-memory sets


@dataclass(frozen=True)
class Dataset:
    """A data set held in memory, preprocessed: the training and test images and labels."""

    x_train: np.ndarray  # (N, C, H, W) float32, normalized
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    classes: tuple[str, ...] = ()
    normalization: tuple[list, list] | None = None  # (mean, std) per channel, None: not normalized
    source: dict = field(default_factory=dict)  # where it came from, for the run dir and report

    streamed = False

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def train_rows(self) -> int:
        return len(self.y_train)

    @property
    def test_rows(self) -> int:
        return len(self.y_test)

    @property
    def pad_value(self) -> list[float]:
        """A black pixel after normalization, per channel (what augmentation pads with)."""
        return pad_value(self.normalization, self.image_shape[0])

    def fingerprint(self) -> str:
        """Content hash of the preprocessed training inputs (keys the logit cache)."""
        h = hashlib.sha256(np.ascontiguousarray(self.x_train).tobytes())
        h.update(str(self.x_train.shape).encode())
        return h.hexdigest()

    def test_batches(self, batch_size: int = 1024):
        """(x, y) numpy batches over the test set, in order."""
        for i in range(0, self.test_rows, batch_size):
            yield self.x_test[i:i + batch_size], self.y_test[i:i + batch_size]

    def calibration(self, n: int) -> np.ndarray:
        """The first `n` training images (activation ranges for static int8)."""
        return self.x_train[:n]

    def describe(self) -> dict:
        """What the report records about the data."""
        return {"classes": list(self.classes), "image_shape": list(self.image_shape),
                "train_rows": self.train_rows, "test_rows": self.test_rows,
                "normalization": None if self.normalization is None else
                {"mean": self.normalization[0], "std": self.normalization[1]},
                "streamed": False, **self.source}


def pad_value(stats: tuple[list, list] | None, channels: int) -> list[float]:
    if stats is None:
        return [0.0] * channels
    return [-m / s for m, s in zip(*stats)]


def _fits_in_memory(spec: ImagePreprocessing, rows: int, channels: int, size) -> None:
    """An in-memory set is held by the driver and by every worker (a copy each): refuse sizes
    that cannot fit, before allocating them."""
    import psutil

    c = spec.channels or channels
    h, w = spec.image_size or size
    per_copy = rows * c * h * w * 4  # float32
    available = psutil.virtual_memory().available
    if per_copy * 3 > available:  # the driver and two workers, at least
        raise DataError(
            f"`data.image_size` {[h, w]} makes the in-memory set {per_copy / 2**30:.1f} GiB "
            f"({rows:,} images x {c} x {h} x {w} float32) per process, and the driver and every "
            f"worker hold a copy; this machine has {available / 2**30:.1f} GiB free: use a "
            "smaller `image_size`, or a streamed source (`parquet`, `image_folder`)"
        )


def _finish(spec: ImagePreprocessing, x_train: np.ndarray, y_train: np.ndarray,
            x_test: np.ndarray, y_test: np.ndarray, classes: list[str], source: dict) -> Dataset:
    """Resize, convert and normalize pixels in [0, 1]; check the labels; build the Dataset."""
    _fits_in_memory(spec, len(x_train) + len(x_test), x_train.shape[1], x_train.shape[2:])
    x_train = resize_and_convert(x_train, spec)
    x_test = resize_and_convert(x_test, spec)
    channels = x_train.shape[1]
    stats = normalization_stats(spec, channels,
                                channel_stats(x_train) if spec.normalize == "auto" else None)
    check_classes(y_train, y_test, classes)
    return Dataset(normalize(x_train, stats), y_train.astype(np.int64), normalize(x_test, stats),
                   y_test.astype(np.int64), num_classes=len(classes), classes=tuple(classes),
                   normalization=stats, source=source)


def check_classes(y_train: np.ndarray, y_test: np.ndarray, classes: list[str]) -> None:
    """Every class in both sets, and no label outside the classes."""
    k = len(classes)
    for name, y in (("training", y_train), ("test", y_test)):
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise DataError(f"the {name} labels run from {y.min()} to {y.max()}, outside the "
                            f"{k} classes {classes[:10]}")
    present = {"training": set(np.unique(y_train).tolist()), "test": set(np.unique(y_test).tolist())}
    for name, seen in present.items():
        missing = [classes[i] for i in range(k) if i not in seen]
        if missing:
            raise DataError(
                f"classes missing from the {name} set: {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''} ({len(seen)} of {k} present): every "
                "class must be trained and tested"
            )


def load_digits(spec: DigitsData, seed: int) -> Dataset:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8), pixels in [0, 1]
    y = bunch.target.astype(np.int64)
    n_test = int(np.ceil(spec.test_fraction * len(y)))  # what train_test_split takes
    if not 10 <= n_test <= len(y) - 10:
        raise DataError(
            f"`data.test_fraction` {spec.test_fraction} leaves {n_test} test and "
            f"{len(y) - n_test} training images of 1797: a stratified split needs at least one "
            "image of each of the 10 classes on each side"
        )
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=spec.test_fraction, random_state=seed, stratify=y
    )
    return _finish(spec, x_train, y_train, x_test, y_test, [str(i) for i in range(10)],
                   {"source": "digits"})


# ------------------------------------------------------------------------------------ IDX sets

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


def _read_idx_file(path: Path, md5: str | None) -> np.ndarray:
    """An IDX file, gunzipped if it is gzip, verified by the md5 of its uncompressed bytes."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot decompress ({err})") from None
    if md5 is not None:
        digest = hashlib.md5(raw).hexdigest()
        if digest != md5:
            raise DataError(f"{path}: md5 of the uncompressed file is {digest}, expected {md5}")
    return read_idx(raw, path.name)


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
    raise DataError(f"`data.download`: could not download {name}: " + "; ".join(errors))


def _idx_images(images: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) uint8 -> (N, C, H, W) float32 in [0, 1]."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{name}: images of shape {images.shape[1:]}; expected (H, W) or (H, W, C)")
    return images.astype(np.float32) / 255.0


def load_idx(spec: IdxData | MnistData, data_dir: str | None) -> Dataset:
    """Four IDX files: MNIST (from `<data dir>/mnist/`, with its md5 sums) or any `idx` set."""
    if isinstance(spec, MnistData):
        root = data_dir or spec.dir
        if root is None:
            raise DataError("MNIST needs a data dir: pass --data-dir or set `data.dir` in the spec")
        folder = Path(root) / "mnist"
        names = list(MNIST_FILES)
        md5 = dict(MNIST_FILES)
    else:
        folder = resolve_path(spec.dir, data_dir) if spec.dir else (
            Path(data_dir) if data_dir else None)
        if folder is None:
            raise DataError("`data.dir` is not set and no --data-dir was given")
        files = spec.files
        names = [files.train_images, files.train_labels, files.test_images, files.test_labels]
        unknown = sorted(set(spec.md5) - set(names))
        if unknown:
            raise DataError(f"`data.md5` names {unknown}, which are not among the set's files "
                            f"{names}")
        md5 = dict(spec.md5)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing and isinstance(spec, MnistData) and spec.download:
        for name in missing:
            _download(folder, name)
        missing = []
    if missing:
        hint = " (set `data.download: true` to fetch them)" if isinstance(spec, MnistData) else ""
        where = "`data.dir` (or --data-dir)" if isinstance(spec, MnistData) else \
            "`data.dir` and `data.files`"
        raise DataError(f"{where}: IDX files missing in {str(folder)!r}: {missing} (expected "
                        f"all of: {names}){hint}")
    x_train, y_train, x_test, y_test = (_read_idx_file(folder / n, md5.get(n)) for n in names)
    for images, labels, a, b in ((x_train, y_train, names[0], names[1]),
                                 (x_test, y_test, names[2], names[3])):
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{b} holds {labels.shape} labels for the {len(images)} images of {a}")
    limit = spec.train_limit
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
    x_train, x_test = _idx_images(x_train, names[0]), _idx_images(x_test, names[2])
    values = np.unique(y_train)
    classes = (list(spec.classes) if isinstance(spec, IdxData) and spec.classes
               else [str(v) for v in values.tolist()])
    if isinstance(spec, IdxData) and spec.classes:
        y_train_i, y_test_i = y_train.astype(np.int64), y_test.astype(np.int64)
    else:  # labels by their sorted values: 0..9 stay 0..9
        unseen = sorted(set(np.unique(y_test).tolist()) - set(values.tolist()))
        if unseen:
            raise DataError(f"`data.files`: test labels {unseen[:10]} never occur in the training "
                            f"set{' (of the first `data.train_limit` images)' if limit else ''}")
        y_train_i = np.searchsorted(values, y_train).astype(np.int64)
        y_test_i = np.searchsorted(values, y_test).astype(np.int64)
    source = {"source": spec.kind, "dir": str(folder.resolve())}
    return _finish(spec, x_train, y_train_i, x_test, y_test_i, classes, source)


def resolve_path(path: str, data_dir: str | None) -> Path:
    """A relative dataset path is relative to `--data-dir` when one is given."""
    p = Path(path)
    return p if p.is_absolute() or data_dir is None else Path(data_dir) / p


def load_dataset(spec, data_dir: str | None, seed: int) -> Dataset:
    """An in-memory source (digits, mnist, idx) loaded and preprocessed."""
    if isinstance(spec, DigitsData):
        return load_digits(spec, seed)
    if isinstance(spec, (MnistData, IdxData)):
        return load_idx(spec, data_dir)
    raise TypeError(f"{type(spec).__name__} is a streamed source: see trainers/image_sources.py")


def load_mnist(spec: MnistData, data_dir: str | None) -> Dataset:
    return load_idx(spec, data_dir)


# ------------------------------------------------------------------------------------ batches


def epoch_shard(
    num_samples: int, batch_size: int, epoch: int, seed: int, rank: int, world_size: int
) -> list[np.ndarray]:
    """This rank's batches of sample indices for one epoch (in-memory sets).

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
