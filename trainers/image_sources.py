"""Streamed image sources: parquet files and image folders, prepared once, then read in shards.

A user's images are rarely stored the way training wants them: PNG or JPEG bytes of any size and
mode, parquet files sorted by class, folders of millions of files. Decoding them again every
epoch would cost more than training a small student, so a job first *prepares* them:

1. listing (the driver, no Ray): files matched by the globs, class names, the first image (its
   size and mode set the defaults), every label checked against the classes; the prepared
   copy's key hashes this listing (paths, sizes, modification times) and the preprocessing;
2. decoding (a Ray Data job, in parallel and memory-bounded): images decoded with Pillow (or
   taken as arrays), resized, converted to the spec's channels and written as uint8 (C, H, W)
   rows with their `id` and `label` into parquet shards of about `shard_rows` rows, in a random
   order (an image folder's files are shuffled before decoding, parquet rows by Ray Data's
   `random_shuffle`), so that any run of shards mixes the classes;
3. committing: a manifest (shards, row counts, classes, image shape, normalization statistics),
   written last under a staging name that is renamed into place. A prepared copy is reused by
   every later job with the same key.

Training reads the prepared shards directly (`epoch_batches`): per epoch the shards are put in
an order drawn from (seed, epoch), the rows of that order are split into one contiguous range
per rank of exactly N // world rows (so every sample is seen once per epoch, bar the < world
rows that do not divide, and every rank takes the same number of steps), and each rank shuffles
its range through a buffer of `shuffle_buffer_rows` rows. This is a pure function of
(seed, epoch, rank, world): reproducible, resumable at any epoch, and each rank reads only its
own rows from memory-mapped files. It replaced Ray Data's `streaming_split` for the training
stream after measurement: for MNIST that spent several seconds per epoch in scheduling and its
local shuffle, more than the student's steps, and hands blocks to ranks in the order they finish.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specs.job import ImageFolderData, ParquetData
from trainers.data import DataError, normalize, normalization_stats, pad_value

# v2: each image one fixed-size binary cell (C*H*W uint8 bytes), LZ4, no dictionary. v1's list
# of uint8 took 9x longer to decode (132 against 14 ms for 10k MNIST rows), on the core the
# training step needs.
FORMAT = "stillhouse-prepared-v2"
MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")


# ---------------------------------------------------------------------------------- file systems


def _filesystem(uri: str):
    """(pyarrow file system, path within it) for a local path or any URI pyarrow reads."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as err:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError
        raise DataError(f"cannot open {uri!r}: {err}") from None


def glob_files(pattern: str) -> list[str]:
    """Files matching `pattern` (a path or URI with * ? [] wildcards), sorted."""
    if "://" not in pattern:
        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    import pyarrow.fs as pafs

    scheme = pattern.split("://", 1)[0] + "://"
    fs, path = _filesystem(pattern.split("*")[0].split("?")[0].rsplit("/", 1)[0] + "/")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    inside = pattern[len(scheme):]
    return sorted(scheme + i.path for i in infos
                  if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, inside))


def read_bytes(uri: str) -> bytes:
    fs, path = _filesystem(uri)
    with fs.open_input_file(path) as f:
        return f.read()


def _stat(uri: str) -> tuple[int, int]:
    """(size, modification time in ns) of a file; part of the prepared copy's key."""
    fs, path = _filesystem(uri)
    info = fs.get_file_info(path)
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    return int(info.size or 0), int(mtime)


# -------------------------------------------------------------------------------------- decoding


def decode_image(data, channels: int, size: tuple[int, int] | None, where: str) -> np.ndarray:
    """PNG/JPEG bytes, or an (H, W) / (H, W, C) array, -> (C, H, W) uint8 at `size` (H, W)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DataError(f"{where}: not a readable image ({err})") from None
    else:
        array = np.asarray(data)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise DataError(f"{where}: an array of shape {array.shape} is not an (H, W) or "
                            "(H, W, C) image")
        if array.dtype != np.uint8:
            if array.size and (array.min() < 0 or array.max() > 255):
                raise DataError(f"{where}: pixel values outside 0..255 ({array.dtype})")
            array = array.astype(np.uint8)
        image = Image.fromarray(array)
    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    out = np.asarray(image, dtype=np.uint8)
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


def _image_mode(data, where: str) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) of an image as stored: 1 for grey, 3 for anything in colour."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            image = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{where}: not a readable image ({err})") from None
        grey = image.mode in ("1", "L", "LA", "I", "I;16", "F")
        return (1 if grey else 3), (image.size[1], image.size[0])
    array = np.asarray(data)
    grey = array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1)
    return (1 if grey else 3), (array.shape[0], array.shape[1])


# --------------------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class Listing:
    """What the driver learns about a streamed source before anything starts."""

    train: list[dict]  # image_folder: {path, label}; parquet: {path, rows}
    test: list[dict]
    classes: list[str]
    channels: int
    size: tuple[int, int]  # (H, W) of every prepared image
    fixed_size: bool  # the images must all be `size` already (no `image_size` given)
    train_rows: int
    test_rows: int
    key: str


def _resolve(pattern: str, data_dir: str | None) -> str:
    if "://" in pattern or os.path.isabs(pattern) or data_dir is None:
        return pattern
    return os.path.join(data_dir, pattern)


def _folder_items(root: str, where: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(path, class name) of every image under root/<class>/, sorted, and the class names."""
    import pyarrow.fs as pafs

    fs, base = _filesystem(root)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise DataError(f"`data.{where}`: {root} is not a folder")
    prefix = root.split("://", 1)[0] + "://" if "://" in root else ""
    classes, items = [], []
    for entry in sorted(fs.get_file_info(pafs.FileSelector(base)), key=lambda i: i.base_name):
        if entry.type != pafs.FileType.Directory or entry.base_name.startswith("."):
            continue
        classes.append(entry.base_name)
        files = fs.get_file_info(pafs.FileSelector(entry.path, recursive=True))
        for f in sorted(files, key=lambda i: i.path):
            if f.type == pafs.FileType.File and not f.base_name.startswith("."):
                items.append((prefix + f.path, entry.base_name))
    if not classes:
        raise DataError(f"`data.{where}`: {root} holds no class folders (expected "
                        f"{root}/<class name>/<image file>)")
    return items, classes


def list_source(spec: ParquetData | ImageFolderData, data_dir: str | None) -> Listing:
    """Check and describe a streamed source without decoding it (cheap; no Ray)."""
    if isinstance(spec, ImageFolderData):
        train_items, train_classes = _folder_items(_resolve(spec.train, data_dir), "train")
        test_items, test_classes = _folder_items(_resolve(spec.test, data_dir), "test")
        classes = list(spec.classes) if spec.classes else train_classes
        unknown = sorted((set(train_classes) | set(test_classes)) - set(classes))
        if unknown:
            raise DataError(f"`data.classes`: class folders {unknown[:10]} are not among them")
        for name, found in (("training", train_classes), ("test", test_classes)):
            missing = [c for c in classes if c not in found]
            if missing:
                raise DataError(f"classes missing from the {name} set: {missing[:10]} (no "
                                "folder of that name): every class must be trained and tested")
        index = {c: i for i, c in enumerate(classes)}
        empty = [c for c in classes
                 if not any(cls == c for _, cls in train_items)
                 or not any(cls == c for _, cls in test_items)]
        if empty:
            raise DataError(f"class folders with no images: {empty[:10]}")
        train = [{"path": p, "label": index[c]} for p, c in train_items]
        test = [{"path": p, "label": index[c]} for p, c in test_items]
        first = read_bytes(train[0]["path"])
        first_where = train[0]["path"]
        train_rows, test_rows = len(train), len(test)
    else:
        train, test, classes, first, first_where = _parquet_listing(spec, data_dir)
        train_rows = sum(i["rows"] for i in train)
        test_rows = sum(i["rows"] for i in test)
    channels, size = _image_mode(first, first_where)
    channels = spec.channels or channels
    fixed = spec.image_size is None
    size = tuple(spec.image_size) if spec.image_size is not None else size
    h = hashlib.sha256(FORMAT.encode())
    preprocessing = spec.model_dump(mode="json", include={"image_size", "channels"})
    h.update(json.dumps({"pre": preprocessing, "classes": classes, "channels": channels,
                         "size": list(size), "kind": spec.kind,
                         "columns": [getattr(spec, "image_column", None),
                                     getattr(spec, "label_column", None)]},
                        sort_keys=True).encode())
    for split in (train, test):
        for item in split:
            h.update(json.dumps([item["path"], *_stat(item["path"]), item.get("label")]).encode())
    return Listing(train, test, classes, channels, size, fixed, train_rows, test_rows,
                   h.hexdigest()[:24])


def _parquet_listing(spec: ParquetData, data_dir: str | None):
    import pyarrow.parquet as pq

    splits, labels = {}, {}
    for split in ("train", "test"):
        pattern = _resolve(getattr(spec, split), data_dir)
        files = glob_files(pattern)
        if not files:
            raise DataError(f"`data.{split}`: no file matches {pattern!r}")
        items, values = [], []
        for path in files:
            fs, inner = _filesystem(path)
            try:
                with fs.open_input_file(inner) as f:
                    table_file = pq.ParquetFile(f)
                    names = table_file.schema_arrow.names
                    for column in (spec.image_column, spec.label_column):
                        if column not in names:
                            field = "image_column" if column == spec.image_column else "label_column"
                            raise DataError(f"`data.{field}`: {path} has no column {column!r} "
                                            f"(it has {names})")
                    rows = table_file.metadata.num_rows
                    values.append(table_file.read(columns=[spec.label_column]).column(0)
                                  .to_numpy(zero_copy_only=False))
            except DataError:
                raise
            except Exception as err:  # pyarrow's errors for a file that is not parquet
                raise DataError(f"`data.{split}`: {path} is not a readable parquet file "
                                f"({err})") from None
            items.append({"path": path, "rows": rows})
        splits[split] = items
        labels[split] = np.concatenate(values) if values else np.array([])
    train_labels, test_labels = labels["train"], labels["test"]
    if train_labels.dtype.kind in "iu":
        found = sorted(set(np.unique(train_labels).tolist()))
        classes = list(spec.classes) if spec.classes else [str(v) for v in found]
        if spec.classes:
            index = {i: i for i in range(len(classes))}
        else:
            index = {v: i for i, v in enumerate(found)}
    elif train_labels.dtype.kind in "OUS":
        found = sorted(set(str(v) for v in train_labels.tolist()))
        classes = list(spec.classes) if spec.classes else found
        index = {c: i for i, c in enumerate(classes)}
    else:
        raise DataError(f"`data.label_column` {spec.label_column!r} holds {train_labels.dtype} "
                        "values; labels are integers or strings")
    for name, values in (("training", train_labels), ("test", test_labels)):
        keys = [v if train_labels.dtype.kind in "iu" else str(v) for v in np.unique(values).tolist()]
        unknown = [k for k in keys if k not in index]
        if unknown:
            raise DataError(f"`data.label_column`: {name} labels {unknown[:10]} are not among the "
                            f"classes {classes[:10]}")
        present = {index[k] for k in keys}
        missing = [classes[i] for i in range(len(classes)) if i not in present]
        if missing:
            raise DataError(f"`data.label_column`: classes missing from the {name} set: "
                            f"{missing[:10]} ({len(present)} of {len(classes)} present): every "
                            "class must be trained and tested")
    for items in splits.values():  # the label mapping travels with each file
        for item in items:
            item["label_index"] = {str(k): v for k, v in index.items()}
    first_path = splits["train"][0]["path"]
    fs, inner = _filesystem(first_path)
    with fs.open_input_file(inner) as f:
        first_table = pq.ParquetFile(f).read_row_group(0, columns=[spec.image_column])
    if first_table.num_rows == 0:
        raise DataError(f"{first_path}: its first row group is empty")
    first = _cell(first_table.column(0), 0)
    return splits["train"], splits["test"], classes, first, f"{first_path} row 0"


def _cell(column, i: int):
    """One image cell of a pyarrow column: bytes, or an array for list columns."""
    value = column[i]
    if hasattr(value, "as_py"):
        value = value.as_py()
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if isinstance(value, list):
        return _square(np.asarray(value))
    return value


def _cells(column) -> list:
    """Every image cell of a pyarrow column: bytes, or numpy arrays for (nested) list columns
    (read from the column's buffers at once, not row by row through Python objects)."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = column.type
    if pa.types.is_struct(kind):  # Hugging Face datasets' Image feature
        column = column.field("bytes")
        kind = column.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return column.to_pylist()
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        out = []
        offsets = column.offsets.to_numpy() if not pa.types.is_fixed_size_list(kind) else None
        values = column.flatten()
        depth_two = pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type)
        if depth_two or offsets is None:
            return [_cell(column, i) for i in range(len(column))]
        flat = values.to_numpy(zero_copy_only=False)  # flatten() starts at offsets[0]
        for i in range(len(column)):
            a, b = offsets[i] - offsets[0], offsets[i + 1] - offsets[0]
            out.append(_square(flat[a:b]))
        return out
    return [_cell(column, i) for i in range(len(column))]


def _square(array: np.ndarray) -> np.ndarray:
    """A flat row of pixels as a square image: n*n grey or n*n*3 RGB values."""
    if array.ndim != 1:
        return array
    side = int(round(len(array) ** 0.5))
    if side * side == len(array):
        return array.reshape(side, side)
    side = int(round((len(array) / 3) ** 0.5))
    if 3 * side * side == len(array):
        return array.reshape(side, side, 3)
    return array  # refused by the decoder, which names the row


# ------------------------------------------------------------------------------------- preparing


class _Decoder:
    """Ray Data map function: a batch of source items -> prepared rows (id, label, image)."""

    def __init__(self, kind: str, channels: int, size: tuple[int, int], fixed: bool,
                 image_column: str | None, label_column: str | None):
        self.kind, self.channels, self.size, self.fixed = kind, channels, tuple(size), fixed
        self.image_column, self.label_column = image_column, label_column

    def _image(self, data, where: str) -> np.ndarray:
        if self.fixed:
            _, size = _image_mode(data, where)
            if size != self.size:
                raise DataError(
                    f"{where} is {size[0]}x{size[1]} (H x W) but the first image is "
                    f"{self.size[0]}x{self.size[1]}: images of mixed sizes need "
                    "`data.image_size` to resize them to one size"
                )
        return decode_image(data, self.channels, None if self.fixed else self.size, where)

    def __call__(self, batch: dict) -> dict:
        import pyarrow.parquet as pq

        ids, labels, images = [], [], []
        if self.kind == "image_folder":
            for path, label, sample_id in zip(batch["path"], batch["label"], batch["id"]):
                images.append(self._image(read_bytes(str(path)), str(path)))
                labels.append(int(label))
                ids.append(int(sample_id))
        else:
            for path, group, first_id, mapping in zip(batch["path"], batch["row_group"],
                                                      batch["id"], batch["label_index"]):
                mapping = json.loads(mapping)
                fs, inner = _filesystem(str(path))
                with fs.open_input_file(inner) as f:
                    table = pq.ParquetFile(f).read_row_group(
                        int(group), columns=[self.image_column, self.label_column])
                cells, raw_labels = _cells(table.column(0)), table.column(1).to_pylist()
                for i, (cell, raw) in enumerate(zip(cells, raw_labels)):
                    where = f"{path} row group {group} row {i}"
                    images.append(self._image(cell, where))
                    labels.append(mapping[str(raw)])
                    ids.append(int(first_id) + i)
        flat = np.stack(images).reshape(len(images), -1) if images else np.zeros((0, 1), np.uint8)
        return {
            "id": np.asarray(ids, dtype=np.int64),
            "label": np.asarray(labels, dtype=np.int64),
            "image": image_cells(flat),
        }


def _items(spec, listing: Listing, split: str, key: str) -> list[dict]:
    """One Ray Data row per unit of decoding work, with the sample ids it covers."""
    if isinstance(spec, ImageFolderData):
        items = [{"path": it["path"], "label": it["label"], "id": i}
                 for i, it in enumerate(getattr(listing, split))]
        if split == "train":  # shuffled before decoding: shards then mix the classes
            order = np.random.default_rng(int(key[:8], 16)).permutation(len(items))
            items = [items[i] for i in order]
        return items
    import pyarrow.parquet as pq

    rows, offset = [], 0
    for it in getattr(listing, split):
        fs, inner = _filesystem(it["path"])
        with fs.open_input_file(inner) as f:
            meta = pq.ParquetFile(f).metadata
        mapping = json.dumps(it["label_index"])
        for g in range(meta.num_row_groups):
            rows.append({"path": it["path"], "row_group": g, "id": offset,
                         "label_index": mapping})
            offset += meta.row_group(g).num_rows
    return rows


def prepare(spec: ParquetData | ImageFolderData, data_dir: str | None, cache_root: Path,
            seed_listing: Listing | None = None) -> "StreamedData":
    """The prepared copy of a streamed source: reused if complete, else decoded now by a Ray
    Data job (needs a connected Ray cluster)."""
    listing = seed_listing or list_source(spec, data_dir)
    cache_root = Path(cache_root)
    folder = cache_root / listing.key
    if (folder / MANIFEST).is_file():
        return StreamedData.open(folder)
    import ray.data

    staging = cache_root / f".partial-{listing.key}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    shards = {}
    for split in ("train", "test"):
        items = _items(spec, listing, split, listing.key)
        decoder = _Decoder(spec.kind, listing.channels, listing.size, listing.fixed_size,
                           getattr(spec, "image_column", None), getattr(spec, "label_column", None))
        batch = 64 if isinstance(spec, ImageFolderData) else 1
        ds = ray.data.from_items(items).map_batches(
            decoder, batch_size=batch, batch_format="numpy", num_cpus=1)
        if split == "train" and isinstance(spec, ParquetData):
            ds = ds.random_shuffle(seed=int(listing.key[:8], 16))
        out = staging / split
        try:
            ds.write_parquet(str(out), min_rows_per_file=spec.shard_rows, compression="lz4",
                             use_dictionary=False)
        except Exception as err:  # Ray wraps the decoder's DataError; surface it as bad input
            raise _data_error(err) from None
        shards[split] = _shard_list(out, staging)
    manifest = _manifest(spec, listing, shards, staging)
    with open(staging / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if folder.exists():  # another job prepared the same copy meanwhile: keep theirs
        shutil.rmtree(staging)
    else:
        os.rename(staging, folder)
    return StreamedData.open(folder)


def _data_error(err: BaseException) -> Exception:
    """The DataError a decoder raised, from inside Ray's wrappers; else the error itself."""
    seen = err
    for _ in range(10):
        if isinstance(seen, DataError):
            return DataError(str(seen))
        cause = getattr(seen, "cause", None) or seen.__cause__ or seen.__context__
        if cause is None:
            break
        seen = cause
    text = str(err)
    marker = "DataError: "
    if marker in text:  # the original message, as Ray printed it into its own
        return DataError(text.split(marker, 1)[1].strip().splitlines()[0])
    return err


def _shard_list(folder: Path, staging: Path) -> list[dict]:
    import pyarrow.parquet as pq

    shards = []
    for path in sorted(folder.glob("*.parquet")):
        rows = pq.ParquetFile(path).metadata.num_rows
        if rows:
            shards.append({"file": str(path.relative_to(staging)), "rows": rows})
        else:
            path.unlink()
    return shards


def _manifest(spec, listing: Listing, shards: dict, staging: Path) -> dict:
    """Row counts checked against the listing; the normalization statistics measured."""
    for split, expected in (("train", listing.train_rows), ("test", listing.test_rows)):
        got = sum(s["rows"] for s in shards[split])
        if got != expected:
            raise DataError(f"prepared {got} {split} rows of {expected} listed")
    channels = listing.channels
    auto = None
    if spec.normalize == "auto":  # one pass over the prepared uint8 rows, in float64 sums
        total, s1, s2 = 0, np.zeros(channels), np.zeros(channels)
        for shard in shards["train"]:
            _, images, _ = read_shard(staging / shard["file"], (channels, *listing.size))
            x = images.reshape(len(images), channels, -1).astype(np.float64) / 255.0
            total += x.shape[0] * x.shape[2]
            s1 += x.sum(axis=(0, 2))
            s2 += (x * x).sum(axis=(0, 2))
        mean = s1 / total
        auto = (mean.tolist(), np.maximum(np.sqrt(np.maximum(s2 / total - mean**2, 0)), 1e-6).tolist())
    stats = normalization_stats(spec, channels, auto)
    return {
        "format": FORMAT, "key": listing.key, "kind": spec.kind,
        "image_shape": [channels, *listing.size], "classes": listing.classes,
        "normalization": None if stats is None else {"mean": stats[0], "std": stats[1]},
        "train": shards["train"], "test": shards["test"],
        "train_rows": listing.train_rows, "test_rows": listing.test_rows,
        "source": {"source": spec.kind, "train": spec.train, "test": spec.test},
    }


# --------------------------------------------------------------------------------------- reading


def image_cells(flat: np.ndarray):
    """The prepared shards' image column: one fixed-size binary cell per row of `flat` (n, C*H*W)
    uint8."""
    import pyarrow as pa

    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(flat.shape[1]), len(flat),
                                                [None, pa.py_buffer(np.ascontiguousarray(flat))])


def read_shard(path: Path, image_shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (n,), images (n, C, H, W) uint8, labels (n,)) of one prepared shard, memory-mapped."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(str(path), memory_map=True).read()
    images = table.column("image").combine_chunks()  # fixed-size binary: one buffer of bytes
    width = images.type.byte_width
    pixels = np.frombuffer(images.buffers()[1], dtype=np.uint8, count=len(images) * width,
                           offset=images.offset * width)  # read-only, no copy
    return (table.column("id").to_numpy(), pixels.reshape(len(images), *image_shape),
            table.column("label").to_numpy())


def rank_ranges(sizes: list[int], rank: int, world: int, exact: bool) -> list[tuple[int, int, int]]:
    """(shard index, first row, end row) pieces of this rank's contiguous share of the rows.

    `sizes` are the shards' row counts in reading order. `exact`: every rank gets N // world rows
    (the < world rows left over are not read, so all ranks take the same steps); otherwise the
    ranges cover every row (for evaluation)."""
    total = sum(sizes)
    if exact:
        per = total // world
        lo, hi = rank * per, (rank + 1) * per
    else:
        lo, hi = rank * total // world, (rank + 1) * total // world
    pieces, start = [], 0
    for i, n in enumerate(sizes):
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            pieces.append((i, a - start, b - start))
        start += n
    return pieces


def steps_per_epoch(rows: int, world: int, batch_size: int) -> int:
    """Batches each rank takes per epoch of a streamed source (see `epoch_batches`)."""
    per = rows // world
    return per // batch_size + (1 if per % batch_size >= 2 else 0)


@dataclass(frozen=True)
class StreamedData:
    """A prepared copy on disk: what workers and the driver read, batch by batch."""

    folder: str
    manifest: dict

    streamed = True

    @classmethod
    def open(cls, folder: Path) -> "StreamedData":
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise DataError(f"{folder} is not a prepared copy of this version ({manifest.get('format')})")
        return cls(str(folder), manifest)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.manifest["classes"])

    @property
    def normalization(self) -> tuple[list, list] | None:
        n = self.manifest["normalization"]
        return None if n is None else (n["mean"], n["std"])

    @property
    def train_rows(self) -> int:
        return self.manifest["train_rows"]

    @property
    def test_rows(self) -> int:
        return self.manifest["test_rows"]

    @property
    def pad_value(self) -> list[float]:
        return pad_value(self.normalization, self.image_shape[0])

    def fingerprint(self) -> str:
        return self.manifest["key"]

    def describe(self) -> dict:
        return {"classes": list(self.classes), "image_shape": list(self.image_shape),
                "train_rows": self.train_rows, "test_rows": self.test_rows,
                "normalization": self.manifest["normalization"], "streamed": True,
                "prepared": self.folder, **self.manifest["source"]}

    def _read(self, split: str, index: int):
        shard = self.manifest[split][index]
        return read_shard(Path(self.folder) / shard["file"], self.image_shape)

    def _float(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, C, H, W) -> normalized float32."""
        return normalize(images.astype(np.float32) / 255.0, self.normalization)

    def epoch_batches(self, batch_size: int, epoch_key: int, seed: int, rank: int, world: int,
                      buffer_rows: int):
        """This rank's training batches (ids (B,), uint8 images (B, C, H, W), labels (B,)) of one
        epoch (`normalized` turns one into float32 inputs).

        Shards in an order drawn from (seed, epoch); the rank's contiguous range of exactly
        N // world rows of that order; rows shuffled within windows of `buffer_rows` rows (and
        at least one batch). The final partial batch is kept when it has 2 or more rows (one row
        would break BatchNorm's training statistics) and joins the batch before it otherwise.
        """
        shards = self.manifest["train"]
        rng = np.random.default_rng([seed, epoch_key, 7])
        order = rng.permutation(len(shards))
        pieces = rank_ranges([shards[i]["rows"] for i in order], rank, world, exact=True)
        window = max(buffer_rows, batch_size)
        carry: list[np.ndarray] = []  # rows read but not yet batched: (ids, images, labels)
        pending = []

        def batches(parts, final: bool):
            ids = np.concatenate([p[0] for p in parts])
            images = np.concatenate([p[1] for p in parts])
            labels = np.concatenate([p[2] for p in parts])
            perm = rng.permutation(len(ids))
            ids, images, labels = ids[perm], images[perm], labels[perm]
            full = len(ids) // batch_size * batch_size
            if final:
                tail = len(ids) - full
                if tail == 1 and full:  # one row alone joins the batch before it
                    full -= batch_size
            for s in range(0, full, batch_size):
                yield ids[s:s + batch_size], images[s:s + batch_size], labels[s:s + batch_size]
            rest = (ids[full:], images[full:], labels[full:])
            if final and len(rest[0]) >= 2:
                yield rest
                rest = None
            return rest

        rows = 0
        for shard_pos, (index, a, b) in enumerate(pieces):
            ids, images, labels = self._read("train", int(order[index]))
            pending.append((ids[a:b], images[a:b], labels[a:b]))
            rows += b - a
            last = shard_pos == len(pieces) - 1
            if rows >= window or last:
                rest = yield from batches(carry + pending, final=last)
                carry = [rest] if rest is not None and len(rest[0]) else []
                pending, rows = [], 0

    def normalized(self, batch):
        """(ids, uint8 images, labels) -> (ids, float32 normalized images, int64 labels)."""
        ids, images, labels = batch
        return ids, self._float(images), labels.astype(np.int64)

    def eval_batches(self, rank: int, world: int, batch_size: int = 1024):
        """(x, y) batches of this rank's share of the test set (all ranks together: every row)."""
        shards = self.manifest["test"]
        for index, a, b in rank_ranges([s["rows"] for s in shards], rank, world, exact=False):
            _, images, labels = self._read("test", index)
            for s in range(a, b, batch_size):
                e = min(b, s + batch_size)
                yield self._float(images[s:e]), labels[s:e].astype(np.int64)

    def test_batches(self, batch_size: int = 1024):
        """(x, y) batches over the whole test set, in the prepared order."""
        return self.eval_batches(0, 1, batch_size)

    def calibration(self, n: int) -> np.ndarray:
        """The first `n` training images of the prepared order, normalized."""
        out, got = [], 0
        for i in range(len(self.manifest["train"])):
            _, images, _ = self._read("train", i)
            out.append(images[: n - got])
            got += len(out[-1])
            if got >= n:
                break
        return self._float(np.concatenate(out))
