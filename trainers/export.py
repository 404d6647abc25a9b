"""The compressed model file: compact tensors in safetensors, a manifest, and a loader.

One `.safetensors` file holds everything needed to run the model:

* tensors named `<parameter>:<part>`, written by `trainers.codec.encode`: values (fp32, int8
  codes, 1-/2-bit codes packed into bytes, or weight sharing's b-bit cluster indices), per-channel
  scales or, for weight sharing, the layer's codebook of shared values, and for sparse tensors the
  positions of the kept weights (a bitmap or Deep Compression's 8-bit relative indices);
* with entropy coding (the default), every int8 / uint8 part that deflate makes smaller is stored
  as `<parameter>:<part>.z`, its bytes deflate-compressed (LZ77 + Huffman coding, raw zlib
  stream, as in Deep Compression's last stage); the layout records its dtype and shape, and
  decompression is bounded by that size;
* for static int8 models, `__act__:<observer>` activation ranges;
* string metadata (safetensors' header): `format`, `architecture` (what
  `trainers.models.build_from_architecture` rebuilds), `layout` (per-tensor codec info),
  `runtime` (`fp32`, `int8_dynamic`, `int8_static`; weight sharing runs as `fp32`, its weights
  looked up in the codebooks) and `manifest` (method, sparsity, bits, accuracy, size, spec hash).

Loading reads tensors and JSON only: nothing is unpickled and no code from the file runs.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import zlib
from pathlib import Path

import torch
from torch import nn

from specs.errors import InputError
from trainers import codec
from trainers.models import build_from_architecture

FORMAT = "stillhouse.compressed/1"
RUNTIMES = ("fp32", "int8_dynamic", "int8_static")


class ExportFormatError(InputError, ValueError):
    """The file is not a stillhouse compressed model, or it is damaged."""


ENTROPY_MIN_BYTES = 256  # smaller parts are not worth a deflate stream


def _deflate(t: torch.Tensor) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: no header, no checksum
    return z.compress(t.contiguous().numpy().tobytes()) + z.flush()


def _inflate(blob: torch.Tensor, dtype: str, shape: list[int]) -> torch.Tensor:
    torch_dtype = {"torch.int8": torch.int8, "torch.uint8": torch.uint8}[dtype]
    expected = math.prod(shape)  # one byte per element for both dtypes
    z = zlib.decompressobj(-15)
    raw = z.decompress(blob.numpy().tobytes(), expected)  # never more than the layout says
    if len(raw) != expected or z.unconsumed_tail or not z.eof:
        raise ValueError(f"deflated part does not inflate to {expected} bytes")
    return torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(shape)


def write_compressed(
    path: Path, *, arch: dict, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
    kinds: dict[str, str], runtime: str, manifest: dict,
    act_ranges: dict[str, torch.Tensor] | None = None, entropy_coding: bool = True,
) -> dict:
    """Write the model; returns the layout (per-tensor codec info, with byte counts).

    `state` holds fp32 weights; `kinds` maps parameter names to codec kinds (others are fp32);
    `masks` marks the kept weights of sparse tensors (True = kept).
    """
    from safetensors.torch import save_file

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of {RUNTIMES}")
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for name, w in state.items():
        parts, info = codec.encode(w.float(), kinds.get(name, "fp32"), masks.get(name))
        info["deflated"] = {}
        for part, t in parts.items():
            if entropy_coding and t.dtype in (torch.int8, torch.uint8) and t.numel() >= ENTROPY_MIN_BYTES:
                packed = _deflate(t)
                if len(packed) < t.numel():
                    tensors[f"{name}:{part}.z"] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
                    info["deflated"][part] = {"dtype": str(t.dtype), "shape": list(t.shape)}
                    continue
            tensors[f"{name}:{part}"] = t.contiguous()
        info["stored_bytes"] = sum(
            v.numel() * v.element_size() for k, v in tensors.items() if k.startswith(f"{name}:"))
        layout[name] = info
    for name, r in (act_ranges or {}).items():
        tensors[f"__act__:{name}"] = r.float().contiguous()
    metadata = {
        "format": FORMAT,
        "architecture": json.dumps(arch),
        "layout": json.dumps(layout),
        "runtime": runtime,
        "manifest": json.dumps(manifest),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=metadata)
    canonical_header_(tmp)
    tmp.replace(path)  # a reader never sees half a file
    return layout


def canonical_header_(path: Path) -> None:
    """Rewrite a safetensors file's JSON header in place with its `__metadata__` keys sorted.

    safetensors keeps the metadata in a Rust HashMap, whose order is random per process: the
    same tensors and metadata written by two processes differ in their header bytes. Sorted,
    the same content gives the same file. The header is re-serialized compactly, as safetensors
    writes it, so its length and every tensor's offset stay as they are (checked)."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            raise ValueError(f"{path}: the canonical header is longer than the written one")
        f.seek(8)
        f.write(text.ljust(size, b" "))  # safetensors pads its header with spaces


def read_compressed(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(metadata with JSON fields parsed, decoded fp32 state dict, activation ranges, layout)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ExportFormatError(f"no such file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportFormatError(f"{path} is not a safetensors file: {err}") from err
    if raw.get("format") != FORMAT:
        raise ExportFormatError(
            f"{path} is not a stillhouse compressed model (format {raw.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    try:
        meta = {
            "architecture": json.loads(raw["architecture"]),
            "layout": json.loads(raw["layout"]),
            "manifest": json.loads(raw["manifest"]),
            "runtime": raw["runtime"],
        }
    except (KeyError, json.JSONDecodeError) as err:
        raise ExportFormatError(f"{path}: damaged header ({err})") from err
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    ranges = {}
    for key, t in tensors.items():
        name, _, part = key.rpartition(":")
        if name == "__act__":
            ranges[part] = t
        else:
            grouped.setdefault(name, {})[part] = t
    state = {}
    for name, info in meta["layout"].items():
        try:
            parts = dict(grouped.get(name, {}))
            for part, how in (info.get("deflated") or {}).items():
                parts[part] = _inflate(parts.pop(part + ".z"), how["dtype"], how["shape"])
            state[name] = codec.decode(parts, info)
        except Exception as err:  # a truncated or edited tensor: say which
            raise ExportFormatError(f"{path}: cannot decode {name}: {err}") from err
    return meta, state, ranges, meta["layout"]


def load_compressed(path: Path, trusted: frozenset[str] = frozenset()) -> tuple[nn.Module, dict]:
    """A runnable model (eval mode) and the file's metadata. A `python` model's factory runs
    only when its package is in `trusted`."""
    from trainers.quantize import dynamic_int8, static_int8

    meta, state, ranges, _ = read_compressed(path)
    model = build_from_architecture(meta["architecture"], trusted)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ExportFormatError(f"{path}: tensors do not fit the architecture: {err}") from err
    model.eval()
    runtime = meta["runtime"]
    if runtime == "int8_dynamic":
        model = dynamic_int8(model)
    elif runtime == "int8_static":
        model = static_int8(model, ranges, tuple(meta["architecture"]["image_shape"]))
    elif runtime != "fp32":
        raise ExportFormatError(f"{path}: unknown runtime {runtime!r}")
    return model, meta


def dense_file(path: Path, state: dict[str, torch.Tensor]) -> int:
    """Write a plain fp32 safetensors state dict (the baseline a compressed file is compared
    with); returns its size in bytes."""
    from safetensors.torch import save_file

    save_file({k: v.float().contiguous() for k, v in state.items()}, str(path))
    return path.stat().st_size


@torch.no_grad()
def accuracy(model: nn.Module, x, y, batch: int = 1024) -> tuple[float, torch.Tensor]:
    """(test accuracy, predicted classes) of an eval-mode model on numpy arrays."""
    batches = ((x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch))
    pred, labels = predictions(model, batches)
    return float((pred == labels).float().mean()), pred


@torch.no_grad()
def predictions(model: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, labels) of an eval-mode model over (x, y) numpy batches."""
    preds, labels = [], []
    for x, y in batches:
        preds.append(model(torch.from_numpy(x).float()).float().argmax(-1))
        labels.append(torch.from_numpy(y))
    return torch.cat(preds), torch.cat(labels)


def export_program(model: nn.Module, image_shape: tuple[int, ...], path: Path) -> None:
    """Save `model` as a `torch.export` program whose batch size is dynamic (what
    `torch.export.load(path).module()` runs, with torch alone: no stillhouse, no pickle)."""
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    example = torch.zeros(2, *image_shape)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    tmp = path.with_name(".partial-" + path.name)  # torch.export wants the .pt2 suffix
    torch.export.save(program, str(tmp))
    tmp.replace(path)


def load_program(path: Path) -> nn.Module:
    return torch.export.load(str(path)).module()


@torch.no_grad()
def latency_ms(
    model: nn.Module, image_shape: tuple[int, ...], batch: int, *, threads: int = 1,
    min_seconds: float = 0.3, max_runs: int = 200,
) -> float:
    """Median wall time of one forward pass at `batch`, in milliseconds, on `threads` threads."""
    x = torch.randn(batch, *image_shape)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(3):  # warm-up: first calls pick kernels and allocate
            model(x)
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < max_runs and (len(times) < 5 or time.perf_counter() - started < min_seconds):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
        return 1000.0 * statistics.median(times)
    finally:
        torch.set_num_threads(before)
