"""The teacher's top-k per token, on disk: a cache of language-model logits that fits.

A full vocabulary per token does not fit on disk (32000 float32 logits are 128 kB per token), so
for each token the cache keeps the k most probable ids and their log-probabilities at the
distillation temperature T, and the log of the probability outside them (`rest`), which the
`tail` policy of trainers/lm_losses.py needs and which cannot be recovered from rounded top-k
values. `compress_token_topk` makes these from logits; teacher replicas answering online send
the same three arrays, so that (batch, seq, k) crosses the wire, not (batch, seq, vocab).

    spec = TokenCacheSpec(k=32, logprobs="int8")
    key = token_cache_key(teacher_digest=..., data_digest=blocks.digest(), ..., spec=spec)
    folder, stats = fill_token_cache(root, key, num_samples=N, seq_len=L, vocab_size=V,
                                     spec=spec, teacher_topk=lambda start, stop: ...)
    ids, logprobs, rest = TokenCache.open(root, key, 16).topk(sample_ids)  # (B, L, k) ...

Layout, readable by any safetensors reader:

    <root>/<key>/manifest.json            key, layout, rows, shards, bytes per token
    <root>/<key>/shard-00000.safetensors  sequences [0, shard_size):
        ids       (n, L, k) int16 (vocabulary <= 32768) or int32
        logprobs  (n, L, k) bfloat16                       -- `logprobs: bf16`
        codes     (n, L, k) int8, top (n, L) bfloat16,     -- `logprobs: int8`
        scale     (n, L) float32
        rest      (n, L) bfloat16 (-inf when k = vocabulary)

int8 codes: per token, log p_i = top - (code_i + 128) * scale, where top is the token's largest
log-probability (rounded to bf16) and scale = (top - smallest of the k) / 255: 256 levels spread
over that token's own range, the most probable id exact up to bf16 rounding. The error of a
log-probability is at most scale / 2 (plus top's rounding); tests/test_token_cache.py measures
the effect on the loss.

The key hashes the teacher's bytes, the data (token blocks), the tokenizer, `seq_len` and the
stored settings (k, id and log-prob storage, temperature, teacher precision); the missing-mass
policy is applied when reading, so it is not part of the key. A fill writes under
`.partial-<key>`, one shard at a time, each written to a temporary name, flushed and renamed:
a finished shard is complete or absent. A fill that was killed resumes from the shards already
there, and the folder is renamed to `<key>` when the last one is in. One process fills a key
at a time (a lock the kernel drops when its holder dies); another one waits, then reuses.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from specs.lm import TokenCacheSpec
from trainers.checkpoint import fsync_dir
from trainers.logit_cache import ShardedCache

FORMAT = "stillhouse-token-topk-v1"
INT16_VOCAB = 1 << 15  # ids 0..32767 fit a signed int16


# ----------------------------------------------------------------------- top-k and codecs


@torch.no_grad()
def compress_token_topk(logits: torch.Tensor,  # (B, L, V), any float dtype
                        k: int, temperature: float,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k most probable ids per token (B, L, k) int64, their log-probabilities at T
    (B, L, k) float32 (descending), and the log of the mass outside them (B, L) float32, from
    log_softmax in float32. The rest is a logsumexp over the other V - k log-probabilities
    (exact even when the top-k hold nearly everything). With k = V the whole distribution is
    kept: ids 0..V-1 in order (sorting V values per token would buy nothing), rest -inf."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # (B, L, V)
    if k == logp.shape[-1]:
        ids = torch.arange(k, device=logp.device).expand(logp.shape)
        return ids, logp, torch.full_like(logp[..., 0], float("-inf"))
    values, ids = logp.topk(k, dim=-1)  # (B, L, k), sorted
    rest = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)  # (B, L)
    return ids, values, rest


def ids_dtype(setting: str, vocab_size: int) -> np.dtype:
    """int16 when asked or (`auto`) when every id fits, else int32."""
    fits = vocab_size <= INT16_VOCAB
    if setting == "int16" and not fits:
        raise ValueError(f"`ids: int16` holds ids below {INT16_VOCAB}, the vocabulary has "
                         f"{vocab_size}: use `ids: int32` or `auto`")
    if setting == "int16" or (setting == "auto" and fits):
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16)


def encode_logprobs(logprobs: torch.Tensor,  # (n, L, k) float32, in any order
                    storage: str) -> dict[str, torch.Tensor]:
    """The stored form of top-k log-probabilities (see the module docstring)."""
    if storage == "bf16":
        return {"logprobs": _bf16(logprobs)}
    if storage != "int8":
        raise ValueError(f"unknown log-prob storage {storage!r}")
    # (n, L), rounded first: codes are relative to it (the first value when sorted; the
    # whole distribution, k = V, comes in id order)
    top = _bf16(logprobs.max(dim=-1).values).float()
    low = logprobs.min(dim=-1).values  # (n, L)
    scale = ((top - low) / 255.0).clamp_min(0.0)  # (n, L)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # one level when all equal
    codes = torch.round((top[..., None] - logprobs) / safe[..., None]).clamp(0, 255)
    return {"codes": (codes - 128).to(torch.int8), "top": _bf16(top), "scale": scale}


def decode_logprobs(arrays: dict[str, np.ndarray], storage: str) -> np.ndarray:
    """(n, L, k) float32 log-probabilities from their stored form (numpy, as mapped)."""
    if storage == "bf16":
        return bf16_to_float32(arrays["logprobs"])
    top = bf16_to_float32(arrays["top"])  # (n, L)
    codes = arrays["codes"].astype(np.float32) + 128.0  # (n, L, k) in 0..255
    return top[..., None] - codes * np.asarray(arrays["scale"], np.float32)[..., None]


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (as uint16, numpy has no bf16) -> float32: they are its upper 16 bits."""
    return (np.asarray(raw).astype(np.uint32) << 16).view(np.float32)


def bytes_per_token(k: int, ids: np.dtype, storage: str) -> int:
    """Stored bytes per token position (data only; a shard adds a JSON header)."""
    per_logprob = {"bf16": 2 * k, "int8": k + 2 + 4}[storage]  # int8: codes, top, scale
    return k * np.dtype(ids).itemsize + per_logprob + 2  # + rest (bf16)


# ------------------------------------------------------------------------------------ key


def token_cache_key(*, teacher_digest: str, data_digest: str, tokenizer_fingerprint: str,
                    seq_len: int, spec: TokenCacheSpec, vocab_size: int, temperature: float,
                    precision: str) -> str:
    """What the stored values depend on, hashed: the teacher's bytes, the token blocks, the
    tokenizer, seq_len, and k / id dtype / log-prob storage / T / teacher precision."""
    body = {
        "format": FORMAT, "teacher": teacher_digest, "data": data_digest,
        "tokenizer": tokenizer_fingerprint, "seq_len": seq_len, "k": spec.k,
        "ids": ids_dtype(spec.ids, vocab_size).name, "logprobs": spec.logprobs,
        "temperature": temperature, "precision": precision,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------------- fill


@dataclass(frozen=True)
class FillStats:
    shards: int
    computed: int  # shards computed by this call
    reused: int  # shards found finished (a resumed fill) or the whole cache already there
    positions: int  # token positions stored (sequences x seq_len)
    bytes_per_token: int  # data bytes per position
    file_bytes: int  # all shard files, headers included


# teacher_topk(start, stop) -> (ids (n, L, k), logprobs (n, L, k) float32, rest (n, L)) for
# sequences [start, stop): the output of compress_token_topk on the teacher's logits
TopKFn = Callable[[int, int], tuple]


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write to `<name>.tmp`, flush it to disk, rename: `path` is complete or absent."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(path.parent)


def _shard_shapes(layout: dict, rows: int) -> dict[str, tuple[str, tuple]]:
    L, k = layout["seq_len"], layout["k"]
    shapes = {"ids": (layout["ids"], (rows, L, k)), "rest": ("bfloat16", (rows, L))}
    if layout["logprobs"] == "bf16":
        shapes["logprobs"] = ("bfloat16", (rows, L, k))
    else:
        shapes.update(codes=("int8", (rows, L, k)), top=("bfloat16", (rows, L)),
                      scale=("float32", (rows, L)))
    return shapes


SAFETENSORS_DTYPES = {"BF16": "bfloat16", "I8": "int8", "I16": "int16", "I32": "int32",
                      "F32": "float32"}


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size))


def _shard_is_complete(path: Path, layout: dict, rows: int) -> bool:
    """A shard file whose header lists the expected tensors, shapes and dtypes, and whose size
    covers them (renames are atomic, so this guards against other damage only)."""
    try:
        header = _header(path)
        expected = _shard_shapes(layout, rows)
        found = {name: (SAFETENSORS_DTYPES.get(info["dtype"]), tuple(info["shape"]))
                 for name, info in header.items() if name != "__metadata__"}
        end = max(info["data_offsets"][1] for n, info in header.items() if n != "__metadata__")
        return found == expected and path.stat().st_size >= end
    except (OSError, ValueError, KeyError):
        return False


def fill_token_cache(root: str | Path, key: str, *, num_samples: int, seq_len: int,
                     vocab_size: int, spec: TokenCacheSpec, teacher_topk: TopKFn,
                     meta: dict | None = None) -> tuple[Path, FillStats]:
    """Fill (or finish, or find) the cache `<root>/<key>` for sequences 0..num_samples-1,
    asking `teacher_topk` only for the shards not already written."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    # one filler per key; a second one waits here, then finds the cache finished
    with open(root / f".lock-{key}", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "manifest.json").is_file():
            cache = TokenCache(final, max_shards_in_memory=1)
            m = cache.manifest
            return final, FillStats(m["shards"], 0, m["shards"], m["positions"],
                                    m["bytes_per_token"], m["file_bytes"])
        return _fill(root, key, num_samples, seq_len, vocab_size, spec, teacher_topk, meta or {})


def _fill(root: Path, key: str, num_samples: int, seq_len: int, vocab_size: int,
          spec: TokenCacheSpec, teacher_topk: TopKFn, meta: dict) -> tuple[Path, FillStats]:
    from safetensors.torch import save_file

    dtype = ids_dtype(spec.ids, vocab_size)
    layout = {"format": FORMAT, "key": key, "rows": num_samples, "seq_len": seq_len,
              "k": spec.k, "ids": dtype.name, "logprobs": spec.logprobs,
              "vocab_size": vocab_size, "shard_size": spec.shard_size}
    staging = root / f".partial-{key}"
    plan = staging / "layout.json"
    if staging.exists() and (not plan.is_file() or json.loads(plan.read_text()) != layout):
        shutil.rmtree(staging)  # another layout (e.g. another shard size): its shards differ
    staging.mkdir(exist_ok=True)
    if not plan.is_file():
        _write_atomic(plan, lambda p: p.write_text(json.dumps(layout, indent=1)))
    for stray in staging.glob("*.tmp"):  # a write the kill interrupted
        stray.unlink()

    shard_size = spec.shard_size
    n_shards = -(-num_samples // shard_size)
    computed = 0
    torch_ids = {np.dtype(np.int16): torch.int16, np.dtype(np.int32): torch.int32}[dtype]
    for shard in range(n_shards):
        start, stop = shard * shard_size, min(num_samples, (shard + 1) * shard_size)
        path = staging / f"shard-{shard:05d}.safetensors"
        if path.is_file() and _shard_is_complete(path, layout, stop - start):
            continue
        ids, logprobs, rest = (torch.as_tensor(a) for a in teacher_topk(start, stop))
        if ids.shape != (stop - start, seq_len, spec.k):
            raise ValueError(f"teacher top-k for sequences [{start}, {stop}) has shape "
                             f"{tuple(ids.shape)}, not {(stop - start, seq_len, spec.k)}")
        if int(ids.max()) >= vocab_size or int(ids.min()) < 0:
            raise ValueError(f"teacher top-k ids outside the vocabulary of {vocab_size}")
        tensors = {"ids": ids.to(torch_ids).contiguous(), "rest": _bf16(rest.float()),
                   **encode_logprobs(logprobs.float(), spec.logprobs)}
        _write_atomic(path, lambda p: save_file({n: t.contiguous() for n, t in tensors.items()},
                                                str(p)))
        computed += 1

    positions = num_samples * seq_len
    file_bytes = sum(p.stat().st_size for p in staging.glob("shard-*.safetensors"))
    manifest = {**meta, **layout, "shards": n_shards,
                "positions": positions, "bytes_per_token": bytes_per_token(spec.k, dtype,
                                                                           spec.logprobs),
                "file_bytes": file_bytes}
    _write_atomic(staging / "manifest.json",
                  lambda p: p.write_text(json.dumps(manifest, indent=1)))
    final = root / key
    os.rename(staging, final)
    fsync_dir(root)
    return final, FillStats(n_shards, computed, n_shards - computed, positions,
                            manifest["bytes_per_token"], file_bytes)


# ---------------------------------------------------------------------------------- read


class TokenCache(ShardedCache):
    """Reads the teacher's top-k for sequences by sample id from a finished cache; at most
    `max_shards_in_memory` shards stay mapped (least recently used go first)."""

    def topk(self, sample_ids: np.ndarray,  # (B,) int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids (B, L, k) int64, log-probabilities (B, L, k) float32 and rest (B, L) float32
        for the given sequences, in the given order."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        if sample_ids.size and (sample_ids.min() < 0 or sample_ids.max() >= self.rows):
            raise IndexError(f"sample ids outside 0..{self.rows - 1}")
        m = self.manifest
        B, L, k = len(sample_ids), m["seq_len"], m["k"]
        ids = np.empty((B, L, k), np.int64)
        logprobs = np.empty((B, L, k), np.float32)
        rest = np.empty((B, L), np.float32)
        shard_of = sample_ids // m["shard_size"]
        needed = np.unique(shard_of).tolist()
        # mapped shards first, so that a batch spread over many shards does not evict a shard
        # just before its own turn
        for shard_id in sorted(needed, key=lambda i: i not in self._shards):
            rows = np.nonzero(shard_of == shard_id)[0]
            local = sample_ids[rows] - shard_id * m["shard_size"]
            shard = self._shard(int(shard_id))
            ids[rows] = shard["ids"][local]
            logprobs[rows] = decode_logprobs({n: a[local] for n, a in shard.items()
                                              if n not in ("ids", "rest")}, m["logprobs"])
            rest[rows] = bf16_to_float32(shard["rest"][local])
        return ids, logprobs, rest
