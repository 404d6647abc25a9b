"""A cache of teacher logits on disk, so the teacher runs once per (teacher, dataset), not per epoch.

Layout, readable by any safetensors reader (numpy, torch, Rust):

    <cache_dir>/<key>/manifest.json            key, mode, rows, classes, shard size, what made it
    <cache_dir>/<key>/shard-00000.safetensors  rows [0, shard_size): `ids` (n,) int64 sample ids,
                                               `logits` (n, C) float32, or `values` (n, k)
                                               float32, `indices` (n, k) int64, `lse` (n,)
                                               float32 for top-k

Rows are looked up by sample id, not by position: a streamed source's rows are cached in the
order its prepared shards hold them, and training batches come in any order and sharding.

The key hashes the teacher file's bytes, the preprocessed training data's fingerprint, the
teacher precision and (for top-k) k and the temperature, so a changed teacher or dataset never
serves stale logits.
A cache is written under `.partial-<key>` and renamed into place when complete. Readers map
shards into memory lazily (a safetensors file is a JSON header and raw arrays, so each tensor is
a read-only `numpy.memmap` at its offset): a batch reads only the rows it asks for, and at most
`max_shards_in_memory` shards stay mapped (least recently used go first; a batch visits the
mapped ones before it maps others).

Top-k approximation: for each sample the cache keeps the k largest logits t_i and
lse = logsumexp(t / T) over all classes, so the k largest teacher probabilities at temperature T,
p_i = exp(t_i / T - lse), are exact. The remaining mass 1 - sum(p_i) is spread evenly over the
other C - k classes. `expand_topk` returns pseudo-logits T * log(p), for which
log_softmax(z / T) = log(p): the KD loss sees exactly this distribution. The error is in how the
small tail mass is shared, not in its total; `tests/test_logit_cache.py` measures it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np

FORMAT = "stillhouse-logits-v2"  # v2: rows carry their sample ids


def cache_key(teacher_blob: bytes, data_fingerprint: str, *, mode: str, top_k: int,
              temperature: float, precision: str) -> str:
    """The cache's name: the teacher file's bytes, the preprocessed training data (its
    fingerprint), the teacher precision and, for top-k, k and the temperature."""
    h = hashlib.sha256(FORMAT.encode())
    h.update(hashlib.sha256(teacher_blob).digest())
    h.update(data_fingerprint.encode())
    settings = {"mode": "full" if mode == "cached" else "topk", "precision": precision}
    if mode == "topk":
        settings.update(top_k=top_k, temperature=temperature)
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:24]


def compress_topk(logits: np.ndarray, k: int, temperature: float) -> dict[str, np.ndarray]:
    """(B, C) logits -> the k largest (values, indices) and logsumexp(logits / T), (B,)."""
    indices = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # (B, k)
    values = np.take_along_axis(logits, indices, axis=1).astype(np.float32)
    scaled = logits.astype(np.float64) / temperature
    top = scaled.max(axis=1, keepdims=True)
    lse = (top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))).astype(np.float32)
    return {"values": values, "indices": indices.astype(np.int64), "lse": lse}


def expand_topk(values: np.ndarray, indices: np.ndarray, lse: np.ndarray, num_classes: int,
                temperature: float) -> np.ndarray:
    """Pseudo-logits (B, C) whose softmax at T is the top-k distribution (see module docstring)."""
    b, k = values.shape
    logp_top = values.astype(np.float64) / temperature - lse[:, None]  # exact, (B, k)
    rest = np.clip(1.0 - np.exp(logp_top).sum(axis=1), 1e-12, None)  # tail mass, (B,)
    logp = np.repeat((np.log(rest) - np.log(max(1, num_classes - k)))[:, None], num_classes, axis=1)
    np.put_along_axis(logp, indices, logp_top, axis=1)
    return (temperature * logp).astype(np.float32)


class CacheWriter:
    """Appends rows in order and writes a shard whenever `shard_size` rows are buffered."""

    def __init__(self, root: Path, key: str, *, shard_size: int, meta: dict):
        self.root, self.key, self.shard_size, self.meta = Path(root), key, shard_size, meta
        self.staging = self.root / f".partial-{key}"
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        self.buffer: dict[str, list[np.ndarray]] = {}
        self.buffered = 0
        self.rows = 0
        self.shards = 0

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            self.buffer.setdefault(name, []).append(value)
        self.buffered += len(next(iter(arrays.values())))
        while self.buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        from safetensors.numpy import save_file

        joined = {k: np.concatenate(v) for k, v in self.buffer.items()}
        save_file({k: np.ascontiguousarray(v[:n]) for k, v in joined.items()},
                  str(self.staging / f"shard-{self.shards:05d}.safetensors"))
        self.buffer = {k: [v[n:]] for k, v in joined.items()}
        self.buffered -= n
        self.rows += n
        self.shards += 1

    def commit(self) -> Path:
        if self.buffered:
            self._flush(self.buffered)
        manifest = {**self.meta, "key": self.key, "format": FORMAT, "rows": self.rows,
                    "shards": self.shards, "shard_size": self.shard_size}
        with open(self.staging / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        final = self.root / self.key
        if final.exists():  # another job filled the same cache meanwhile: keep theirs
            shutil.rmtree(self.staging)
        else:
            os.rename(self.staging, final)
        return final


# safetensors dtypes as numpy reads them (bf16 as its uint16 bits: numpy has no bfloat16)
SAFETENSORS_DTYPES = {"F32": np.float32, "I64": np.int64, "F64": np.float64, "I32": np.int32,
                      "I16": np.int16, "I8": np.int8, "BF16": np.uint16}


def map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only memmap (nothing is read until used).

    The format: an 8-byte little-endian header length, a JSON header giving each tensor's
    dtype, shape and byte range, then the raw little-endian data.
    """
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
        shape = tuple(info["shape"])
        if end - start != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(f"{path}: tensor {name} has {end - start} bytes for shape {shape}")
        tensors[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + size + start,
                                  shape=shape)
    return tensors


class ShardedCache:
    """A finished cache folder (manifest.json, shard-NNNNN.safetensors) read shard by shard: at
    most `max_shards_in_memory` shards stay mapped, the least recently used go first. The logit
    cache and the token cache (trainers/token_cache.py) read through it."""

    def __init__(self, folder: str | Path, max_shards_in_memory: int):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        self.max_shards = max_shards_in_memory
        self._shards: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.shard_loads = 0

    @classmethod
    def open(cls, root: str | Path, key: str, max_shards_in_memory: int):
        """The cache `root/key`, or None when it is not finished."""
        folder = Path(root) / key
        if not (folder / "manifest.json").is_file():
            return None
        return cls(folder, max_shards_in_memory)

    @property
    def rows(self) -> int:
        return self.manifest["rows"]

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        if i in self._shards:
            self._shards.move_to_end(i)
            return self._shards[i]
        shard = map_safetensors(self.folder / f"shard-{i:05d}.safetensors")
        self.shard_loads += 1
        self._shards[i] = shard
        while len(self._shards) > self.max_shards:
            self._shards.popitem(last=False)
        return shard


class LogitCache(ShardedCache):
    """Reads teacher logits for sample indices from a complete cache."""

    def __init__(self, folder: Path, max_shards_in_memory: int):
        super().__init__(folder, max_shards_in_memory)
        # sample id -> row of the cache: rows are written in the order the data was read (a
        # streamed source's prepared order), and looked up by the ids a batch carries
        self.row_of_id = np.empty(self.rows, dtype=np.int64)
        size = self.manifest["shard_size"]
        for i in range(self.manifest["shards"]):
            ids = np.asarray(map_safetensors(self.folder / f"shard-{i:05d}.safetensors")["ids"])
            if len(ids) and (ids.min() < 0 or ids.max() >= self.rows):
                raise ValueError(f"{self.folder}: shard {i} holds ids outside 0..{self.rows - 1}")
            self.row_of_id[ids] = i * size + np.arange(len(ids))

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """(B,) sample ids -> (B, C) float32 teacher logits (pseudo-logits for top-k)."""
        indices = self.row_of_id[np.asarray(ids)]
        size = self.manifest["shard_size"]
        shard_of = indices // size
        out = None
        # mapped shards first: a shuffled batch touches every shard, and with more shards than
        # the bound, visiting them in a fixed order would evict each one just before its turn
        needed = np.unique(shard_of).tolist()
        for shard_id in sorted(needed, key=lambda i: i not in self._shards):
            rows = np.nonzero(shard_of == shard_id)[0]
            local = indices[rows] - shard_id * size
            shard = self._shard(int(shard_id))
            if "logits" in shard:
                part = shard["logits"][local]
            else:
                part = expand_topk(shard["values"][local], shard["indices"][local],
                                   shard["lse"][local], self.manifest["classes"],
                                   self.manifest["temperature"])
            if out is None:
                out = np.empty((len(indices), part.shape[1]), dtype=np.float32)
            out[rows] = part
        return out


class _TeacherBatches:
    """Ray Data callable class: one teacher per actor, batches of samples -> cache rows (their
    ids and the teacher's logits). Batches are in-memory inputs (`data`, float32, normalized)
    or a streamed source's prepared rows (`image`, uint8, normalized here as workers do)."""

    def __init__(self, spec_json: str, teacher_path: str, image_shape: tuple, num_classes: int,
                 normalization, trusted: tuple[str, ...]):
        import torch

        from specs import JobSpec
        from trainers.device import teacher_device
        from trainers.teacher_server import TeacherServer, load_teacher

        self.spec = JobSpec.model_validate_json(spec_json)
        self.image_shape = tuple(image_shape)
        self.normalization = normalization
        torch.set_num_threads(max(1, int(self.spec.resources.teacher_cpus)))
        with open(teacher_path, "rb") as f:  # read here: no constructor argument in the store
            blob = f.read()
        model = load_teacher(self.spec.teacher, blob, self.image_shape, num_classes,
                             frozenset(trusted))
        self.server = TeacherServer(model, self.spec.teacher_precision,
                                    device=teacher_device(self.spec))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from trainers.data import normalize

        if "image" in batch:
            pixels = np.stack(batch["image"]) if batch["image"].dtype == object else batch["image"]
            x = normalize(pixels.reshape(len(pixels), *self.image_shape).astype(np.float32)
                          / 255.0, self.normalization)
        else:
            x = batch["data"]
        logits = self.server.logits(x)
        if self.spec.logit_cache_mode == "topk":
            out = compress_topk(logits, self.spec.logits.top_k, self.spec.distillation.temperature)
        else:
            out = {"logits": logits}
        return {"ids": np.asarray(batch["id"], dtype=np.int64), **out}


def fill_cache(spec, teacher_path: str | Path, data, root: Path, key: str,
               trusted: frozenset[str] = frozenset()) -> Path:
    """Run the teacher over the whole training set as a Ray Data job with an actor pool of
    `resources.teacher_replicas` teachers (each loading the teacher file at `teacher_path`), and
    write the cache, each row with its sample id.

    `data` is an in-memory `Dataset` (its arrays go into the object store in blocks) or a
    streamed source's prepared copy (Ray Data reads its shards)."""
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows in the order they are read
    context.enable_progress_bars = False
    if data.streamed:
        # one block per prepared shard, read by a task of zero CPUs: the teachers' actor pool
        # may hold every CPU (read_parquet's own listing and read tasks ask for one, and would
        # wait for a CPU the pool never frees)
        from trainers.image_sources import read_shard

        shape = tuple(data.image_shape)
        source = ray.data.from_items([{"file": str(Path(data.folder) / s["file"])}
                                      for s in data.manifest["train"]])

        def shard_rows(batch: dict) -> dict:
            ids, images, _ = read_shard(Path(str(batch["file"][0])), shape)
            return {"id": ids, "image": images}

        source = source.map_batches(shard_rows, batch_size=1, batch_format="numpy", num_cpus=0)
    else:
        # several blocks, so every actor of the pool gets work
        n = len(data.x_train)
        parts = np.array_split(np.arange(n), max(1, 4 * spec.resources.teacher_replicas))
        source = ray.data.from_items([{"start": int(p[0]), "stop": int(p[-1]) + 1}
                                      for p in parts if len(p)])
        x_ref = ray.put(data.x_train)  # once; each block reads its rows from shared memory

        def rows(batch: dict) -> dict:
            x = ray.get(x_ref)
            start, stop = int(batch["start"][0]), int(batch["stop"][0])
            return {"id": np.arange(start, stop), "data": x[start:stop]}

        source = source.map_batches(rows, batch_size=1, batch_format="numpy", num_cpus=0)
    rows_out = source.map_batches(
        _TeacherBatches,
        fn_constructor_args=(spec.model_dump_json(), str(Path(teacher_path).resolve()),
                             tuple(data.image_shape),
                             data.num_classes, data.normalization, tuple(sorted(trusted))),
        batch_size=1024,
        batch_format="numpy",
        concurrency=spec.resources.teacher_replicas,
        num_cpus=spec.resources.teacher_cpus,
        **({"num_gpus": spec.resources.teacher_gpus} if spec.resources.teacher_gpus else {}),
    )
    writer = CacheWriter(root, key, shard_size=spec.logits.shard_size, meta={
        "mode": spec.logit_cache_mode, "classes": data.num_classes, "top_k": spec.logits.top_k,
        "temperature": spec.distillation.temperature, "precision": spec.teacher_precision,
    })
    for batch in rows_out.iter_batches(batch_size=None, batch_format="numpy"):
        writer.add(batch)
    folder = writer.commit()
    if writer.rows != data.train_rows:
        raise RuntimeError(f"logit cache {key}: wrote {writer.rows} rows for {data.train_rows} "
                           "samples")
    return folder
