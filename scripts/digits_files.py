"""Write scikit-learn's 8x8 digits as files other tools make, for the examples and the tests.

    .venv/bin/python scripts/digits_files.py image_folder OUT   # OUT/{train,test}/<digit>/<n>.png
    .venv/bin/python scripts/digits_files.py parquet OUT        # OUT/{train,test}-0000N.parquet
    .venv/bin/python scripts/digits_files.py idx OUT            # OUT/*-ubyte.gz (MNIST's layout)

Images are written as their tools' documentation shows: PNGs by Pillow (`Image.save`), parquet by
pyarrow (`pq.write_table`) with PNG bytes or (8, 8) uint8 arrays, IDX as gzip'd big-endian files.
The split is the same stratified 75/25 split the `digits` source makes with seed 0.
"""

from __future__ import annotations

import argparse
import gzip
import io
import struct
from pathlib import Path

import numpy as np


def digits_split(seed: int = 0):
    """(train images, train labels, test images, test labels): uint8 (N, 8, 8) in 0..255."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, bunch.target, test_size=0.25, random_state=seed, stratify=bunch.target)
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_folder(out: Path, limit: int | None = None) -> Path:
    from PIL import Image

    x_train, y_train, x_test, y_test = digits_split()
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        for i, (image, label) in enumerate(zip(x[:limit], y[:limit])):
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.png")
    return out


def write_parquet(out: Path, arrays: bool = False, files: int = 2, labels_as: str = "int",
                  train_rows: int | None = None) -> Path:
    """Each split in `files` parquet files; `arrays`: pixels as nested lists, else PNG bytes;
    `labels_as`: "int" or "str" ("digit-3"); `train_rows`: only the first N training images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = digits_split()
    x_train, y_train = x_train[:train_rows], y_train[:train_rows]
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        for k, part in enumerate(np.array_split(np.arange(len(y)), files)):
            images = ([x[i].tolist() for i in part] if arrays else [png_bytes(x[i]) for i in part])
            labels = [int(y[i]) if labels_as == "int" else f"digit-{y[i]}" for i in part]
            table = pa.table({"image": images, "label": labels})
            pq.write_table(table, out / f"{split}-{k:05d}.parquet", row_group_size=256)
    return out


def write_idx(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = digits_split()
    for name, array in (("train-images-idx3-ubyte.gz", x_train), ("train-labels-idx1-ubyte.gz", y_train),
                        ("t10k-images-idx3-ubyte.gz", x_test), ("t10k-labels-idx1-ubyte.gz", y_test)):
        array = np.ascontiguousarray(array, dtype=np.uint8)
        header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
        (out / name).write_bytes(gzip.compress(header + array.tobytes()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["image_folder", "parquet", "parquet-arrays", "idx"])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.kind == "image_folder":
        write_image_folder(args.out)
    elif args.kind == "idx":
        write_idx(args.out)
    else:
        write_parquet(args.out, arrays=args.kind == "parquet-arrays")
    print(args.out)


if __name__ == "__main__":
    main()
