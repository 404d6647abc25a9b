"""Hugging Face transformers models, offline: build, initialise a student from a teacher, export.

Nothing here reaches the network: every loader sets the Hub's offline mode first and reads local
directories only (`local_files_only=True`), weights only from safetensors (a pickle is never
loaded), and never runs code shipped with a model (`trust_remote_code=False`).

    from specs.lm import HFModel
    teacher = build_hf_model(HFModel(kind="hf", path="runs/teacher"))
    student = build_hf_model(HFModel(kind="hf", config={"model_type": "gpt2", "n_layer": 2, ...},
                                     init={"from_teacher": True, "layers": [0, 2]}), teacher)
    save_hf_dir(student, "out/student", tokenizer="tok/")      # config.json, model.safetensors
    quantize_int8_(student)                                     # int8 weights, per channel
    save_int8_dir(student, "out/student-int8", tokenizer="tok/")  # compressed-tensors, as vLLM loads
    again = load_hf_dir("out/student-int8")

int8 export uses compressed-tensors (the library vLLM and llm-compressor use for this format):
`apply_quantization_config` attaches a weight-only scheme (int8, symmetric, one scale per output
channel) to every `nn.Linear` but the LM head, the scales come from each row's min/max through the
library's own `calculate_qparams` (what llm-compressor's min-max observer computes for weights),
and `ModelCompressor` packs the weights (`pack-quantized`: int8 values packed into int32) and
writes the `quantization_config` into config.json. transformers loads such a directory through
its compressed-tensors quantizer, which decompresses with the same library.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specs.errors import InputError
from specs.lm import HFModel


class HFModelError(InputError):
    """A model directory, config or initialisation that cannot be used (exit status 2)."""


def hf_offline() -> None:
    """Put the Hugging Face Hub into offline mode for this process: any attempt to reach the
    Hub raises instead of downloading. The Hub reads the variables when it is imported, so the
    already-imported constant is set too. transformers' progress bars (loading and writing
    weights) go off as well: a job prints its own progress, one line per step that matters."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM",
                "sequence_classification": "AutoModelForSequenceClassification"}


def _auto_class(task: str):
    import transformers

    return getattr(transformers, AUTO_CLASSES[task])


# --------------------------------------------------------------------------------- building


def check_model_dir(path: str | Path) -> Path:
    """A directory with config.json and safetensors weights, or HFModelError saying what is
    wrong (a pickle-only directory is refused: loading it would unpickle)."""
    folder = Path(path)
    if not folder.is_dir():
        raise HFModelError(f"model directory {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise HFModelError(f"{folder} has no config.json (not a save_pretrained directory)")
    has_safetensors = (folder / "model.safetensors").is_file() or (
        folder / "model.safetensors.index.json").is_file()
    if not has_safetensors:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickles:
            raise HFModelError(
                f"{folder} holds weights only as pickle files ({', '.join(pickles)}); stillhouse "
                "loads safetensors only: convert them (e.g. load and save_pretrained them once "
                "where you trust them)")
        raise HFModelError(f"{folder} has no model.safetensors")
    return folder


def build_config(config: str | dict[str, Any]):
    """A transformers config from a directory (config.json) or from inline fields with
    `model_type`, given to `AutoConfig.for_model`. An inline field the config class does not
    define is refused: transformers would keep it as an attribute no model reads (a typo)."""
    hf_offline()
    from transformers import AutoConfig

    if isinstance(config, str):
        folder = Path(config)
        if not (folder / "config.json").is_file():
            raise HFModelError(f"config directory {folder} has no config.json")
        try:
            return AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                              trust_remote_code=False)
        except (ValueError, OSError) as err:
            raise HFModelError(f"cannot read the config in {folder}: {err}") from None
    fields = dict(config)
    model_type = fields.pop("model_type")
    try:
        built = AutoConfig.for_model(model_type, **fields)
    except ValueError as err:
        if "Unrecognized model identifier" in str(err):
            raise HFModelError(f"config `model_type` {model_type!r} is not a transformers "
                               "model type (e.g. gpt2, llama)") from None
        raise HFModelError(f"config for {model_type!r}: {err}") from None
    unknown = sorted(k for k in fields if k not in _config_fields(type(built))
                     and k in built.__dict__)
    if unknown:
        raise HFModelError(f"config fields {unknown} are not fields of {type(built).__name__} "
                           "(misspelled?)")
    return built


def _config_fields(config_class) -> set[str]:
    import inspect

    names = set(inspect.signature(config_class.__init__).parameters)
    names |= set(getattr(config_class, "attribute_map", {}))
    return names | {"num_labels"}


def build_hf_model(spec: HFModel, teacher: nn.Module | None = None) -> nn.Module:
    """The model a spec section describes, in eval mode, float32. A fresh model (`config`) whose
    `init.from_teacher` is set needs the teacher's model, from which it copies weights."""
    hf_offline()
    auto = _auto_class(spec.task)
    if spec.path is not None:
        folder = check_model_dir(spec.path)
        try:
            model = auto.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                         trust_remote_code=False, dtype=torch.float32)
        except (ValueError, OSError) as err:
            raise HFModelError(f"cannot load the model in {folder}: {err}") from None
        return model.eval()
    model = auto.from_config(build_config(spec.config), trust_remote_code=False)
    if spec.init.from_teacher:
        if teacher is None:
            raise ValueError("init.from_teacher needs the teacher model")
        init_from_teacher_(model, teacher, spec.init.layers)
    return model.float().eval()


# ------------------------------------------------------------------- student from teacher


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer blocks: the one `nn.ModuleList` with `num_hidden_layers`
    entries (`transformer.h` in GPT-2, `model.layers` in Llama), by name."""
    n = model.config.num_hidden_layers
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise HFModelError(
            f"{type(model).__name__}: cannot tell its decoder blocks apart (module lists of "
            f"{n} entries: {[name for name, _ in found]})")
    return found[0]


@torch.no_grad()
def init_from_teacher_(student: nn.Module, teacher: nn.Module, layers: list[int]) -> dict:
    """Copy the teacher's weights into the student: every tensor outside the decoder blocks
    (embeddings, position embeddings, final norm, LM head) by name, and student block i from
    teacher block `layers[i]`. Tensors the teacher does not have (a classification head on a
    causal-LM teacher) keep their fresh values. Returns {"copied": [...], "kept": [...]}.

    Works for any architecture whose blocks sit in one module list and whose other tensors
    are named alike in teacher and student (GPT-2, Llama, Mistral, Qwen2, ...)."""
    if type(student.config) is not type(teacher.config):
        raise HFModelError(f"student is {student.config.model_type}, teacher is "
                           f"{teacher.config.model_type}: blocks copy only between one family")
    s_prefix, s_blocks = decoder_blocks(student)
    t_prefix, t_blocks = decoder_blocks(teacher)
    if len(layers) != len(s_blocks):
        raise HFModelError(f"`init.layers` lists {len(layers)} teacher blocks but the student "
                           f"has {len(s_blocks)} blocks")
    bad = [i for i in layers if not 0 <= i < len(t_blocks)]
    if bad:
        raise HFModelError(f"`init.layers` {bad} out of range: the teacher has "
                           f"{len(t_blocks)} blocks (0..{len(t_blocks) - 1})")
    s_hidden = getattr(student.config, "hidden_size", None)
    t_hidden = getattr(teacher.config, "hidden_size", None)
    if s_hidden != t_hidden:
        raise HFModelError(f"hidden size mismatch: student {s_hidden}, teacher {t_hidden}: "
                           "copied weights need the teacher's width")

    t_state = teacher.state_dict()
    copied, kept = [], []

    def copy(dst_name: str, dst: torch.Tensor, src_name: str) -> None:
        if src_name not in t_state:
            kept.append(dst_name)
            return
        src = t_state[src_name]
        if src.shape != dst.shape:
            raise HFModelError(f"shape mismatch: student {dst_name} {tuple(dst.shape)}, "
                               f"teacher {src_name} {tuple(src.shape)}")
        dst.copy_(src)
        copied.append(dst_name)

    block_prefix = s_prefix + "."
    for name, tensor in student.state_dict().items():
        if name.startswith(block_prefix):
            index, rest = name[len(block_prefix):].split(".", 1)
            copy(name, tensor, f"{t_prefix}.{layers[int(index)]}.{rest}")
        else:
            copy(name, tensor, name)
    return {"copied": copied, "kept": kept}


# ---------------------------------------------------------------------------------- export


def model_dir_digest(path: str | Path) -> str:
    """sha256 over a model directory's config.json and safetensors files (name and bytes), in
    name order: the teacher's identity for cache keys."""
    h = hashlib.sha256()
    folder = Path(path)
    for file in sorted([folder / "config.json", *folder.glob("*.safetensors")]):
        h.update(file.name.encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _save_tokenizer(tokenizer, out: Path) -> None:
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, Path)):  # a directory (trainers.text_data.load_tokenizer)
        hf_offline()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True,
                                                  trust_remote_code=False)
    tokenizer.save_pretrained(str(out))


def save_hf_dir(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write a directory `from_pretrained` loads: config.json, model.safetensors and, when
    given (a tokenizer or its directory), the tokenizer's files. Written under a staging name
    and renamed into place, so a reader never sees half a model."""
    out = Path(out_dir)
    staging = out.with_name(f".partial-{out.name}")
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(str(staging))
    _save_tokenizer(tokenizer, staging)
    if not (staging / "model.safetensors").is_file():
        raise RuntimeError(f"save_pretrained wrote no model.safetensors in {staging}")
    if out.exists():
        shutil.rmtree(out)
    os.rename(staging, out)
    return out


def load_hf_dir(path: str | Path, task: str = "causal_lm") -> nn.Module:
    """Load a directory written by `save_hf_dir` or `save_int8_dir` (offline, safetensors only,
    no remote code), in eval mode. An int8 directory is decompressed by compressed-tensors."""
    return build_hf_model(HFModel(kind="hf", path=str(path), task=task))


INT8_IGNORE = ("lm_head", "score")  # output heads stay in float, as llm-compressor's recipes do


def quantize_int8_(model: nn.Module, ignore: tuple[str, ...] = INT8_IGNORE):
    """Quantize every `nn.Linear` weight (but `ignore`d modules) to int8, symmetric, one scale
    per output channel, in place, with compressed-tensors. The model then computes with the
    quantized weights (compressed-tensors' forward runs quantize-dequantize on them), as the
    exported directory will. Returns the compressed-tensors `QuantizationConfig`.

    GPT-2 keeps its projections in transformers' `Conv1D` (weights stored transposed), which
    compressed-tensors does not quantize; such a model is refused."""
    from compressed_tensors.offload import update_offload_parameter
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers.pytorch_utils import Conv1D

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and n.split(".")[-1] not in ignore]
    conv1d = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    if conv1d or not linears:
        raise HFModelError(
            f"{type(model).__name__}: int8 export in the compressed-tensors format needs the "
            f"projections as nn.Linear; this model has {len(conv1d)} transformers Conv1D layers "
            "(GPT-2 style), which compressed-tensors does not quantize")
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel",
                                 dynamic=False),
    )
    config = QuantizationConfig(config_groups={"group_0": scheme},
                                ignore=[f"re:.*{name}$" for name in ignore],
                                quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, config, show_progress=False)
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        w = module.weight.detach()  # (out, in)
        scale, zero_point = calculate_qparams(w.amin(dim=1, keepdim=True),
                                              w.amax(dim=1, keepdim=True),
                                              module.quantization_scheme.weights)  # (out, 1)
        update_offload_parameter(module, "weight_scale", scale.to(module.weight_scale.dtype))
        if hasattr(module, "weight_zero_point"):
            update_offload_parameter(module, "weight_zero_point",
                                     zero_point.to(module.weight_zero_point.dtype))
        module.quantization_status = QuantizationStatus.FROZEN  # scales final: no calibration
    config.quantization_status = QuantizationStatus.FROZEN
    return config


def save_int8_dir(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write a model quantized by `quantize_int8_` in the compressed-tensors format (what vLLM
    loads): int8 weights packed into int32 (`weight_packed`), `weight_scale` per output channel,
    `weight_shape`, and `quantization_config` in config.json. The model is compressed in place
    to save it and decompressed again afterwards (compressed-tensors' own round trip), so it
    keeps computing with the same quantized weights."""
    from compressed_tensors.compressors import ModelCompressor

    out = Path(out_dir)
    staging = out.with_name(f".partial-{out.name}")
    if staging.exists():
        shutil.rmtree(staging)
    compressor = ModelCompressor.from_pretrained_model(model)
    if compressor.quantization_config is None:
        raise ValueError("the model is not quantized: call quantize_int8_ first")
    compressor.compress_model(model)
    try:
        model.save_pretrained(str(staging))
        compressor.update_config(str(staging))
    finally:
        compressor.decompress_model(model)
    _save_tokenizer(tokenizer, staging)
    if out.exists():
        shutil.rmtree(out)
    os.rename(staging, out)
    return out
