"""The pieces of a language-model job that the driver and the workers share: which teacher
directory a job uses, the models it builds from its spec, the checks before Ray starts, the
trained teacher written as a Hugging Face directory, and the top-k token cache filled by the
teacher replicas.

    plan = plan_language_model(spec, data_dir)         # before Ray: InputError (exit 2) if bad
    model = job_model(spec, "student", run_dir)          # what a worker trains
    folder, stats = fill_token_cache_from_pool(spec, client, data, root, key)

A job's data is text (`TextData`), its models Hugging Face causal LMs (`HFModel`), built offline
(local files only, safetensors only, never remote code: trainers/hf_models.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from specs.job import CheckpointTeacher, JobSpec
from specs.lm import HFInit, HFModel
from trainers.hf_models import HFModelError, build_hf_model, check_model_dir, save_hf_dir
from trainers.text_data import TextDataError, TextDataset, TokenizerMismatch

TEACHER_DIR = "teacher-hf"  # in a run dir: a trained teacher as a Hugging Face directory
TEXT_DATA = "text-data"  # in a run dir: the job's token blocks, as the workers read them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def teacher_dir(spec: JobSpec, run_dir: Path) -> Path:
    """The teacher's Hugging Face directory: the one a `checkpoint` teacher names, or the one a
    trained teacher is written to in the run dir (`write_trained_teacher`)."""
    if isinstance(spec.teacher, CheckpointTeacher):
        return Path(spec.teacher.model.path).resolve()
    return (Path(run_dir) / TEACHER_DIR).resolve()


def fresh(model_spec: HFModel) -> HFModel:
    """The same model with random weights where `init` would copy the teacher's: the
    architecture alone, for weights that come from a checkpoint."""
    return model_spec.model_copy(update={"init": HFInit()})


def job_model(spec: JobSpec, stage: str, run_dir: Path, resumed: bool = False,
              ) -> tuple[nn.Module, dict | None]:
    """The model a worker group trains, in training mode, and how it was initialised: the
    teacher as its spec says (a fresh config, or a directory to fine-tune), or the student,
    whose blocks are copied from the teacher's when the spec says so (not when `resumed`: the
    checkpoint's weights replace them). The record names the teacher directory, the blocks and
    how many tensors were copied; None when nothing was."""
    from trainers.hf_models import init_from_teacher_

    if stage == "teacher":
        return build_hf_model(spec.teacher.model).train(), None
    student = spec.student.model
    model = build_hf_model(fresh(student))
    if not student.init.from_teacher or resumed:
        return model.train(), None
    folder = teacher_dir(spec, run_dir)
    copied = init_from_teacher_(model, build_hf_model(HFModel(kind="hf", path=str(folder))),
                                student.init.layers)
    record = {"teacher_dir": str(folder), "layers": list(student.init.layers),
              "copied": len(copied["copied"]), "kept": copied["kept"]}
    return model.float().train(), record


def load_weights_(model: nn.Module, state: dict) -> nn.Module:
    """Load a checkpoint's fp32 weights (named parameters, as the engine saves them) into a
    model of the spec's architecture. Tied weights (an LM head that is the embedding matrix)
    are saved once, under the first name; the other names must be those ties, and nothing else
    may be missing or left over."""
    expected = model.state_dict()
    # buffers outside the state dict (rotary frequencies) are saved by the engine, not loaded
    extra = [k for k in state if k not in expected and k not in dict(model.named_buffers())]
    if extra:
        raise HFModelError(f"checkpoint holds weights the model lacks: {extra[:5]}")
    missing, _ = model.load_state_dict({k: v for k, v in state.items() if k in expected},
                                       strict=False)
    untied = sorted(name for name in missing if not _is_tied(model, name))
    if untied:
        raise HFModelError(f"checkpoint lacks weights {untied[:5]}")
    return model.eval()


def _is_tied(model: nn.Module, name: str) -> bool:
    """Whether state-dict entry `name` is a parameter that another name also holds."""
    target = dict(model.named_parameters(remove_duplicate=False)).get(name)
    return target is not None and any(
        p is target for n, p in model.named_parameters() if n != name)


def logits_width(model: nn.Module) -> int:
    """The vocabulary of a causal LM's logits (rows of its output embeddings)."""
    return int(model.get_output_embeddings().weight.shape[0])


def write_trained_teacher(spec: JobSpec, run_dir: Path, data: TextDataset,
                          checkpoint_dir: Path) -> Path:
    """The trained teacher's checkpoint as a Hugging Face directory (config, safetensors,
    tokenizer) in the run dir, written once: the replicas load it, the token cache is keyed by
    its digest, and it is a model `from_pretrained` loads."""
    from safetensors.torch import load_file

    out = teacher_dir(spec, run_dir)
    if (out / "model.safetensors").is_file():
        return out
    model = load_weights_(build_hf_model(fresh(spec.teacher.model)),
                          load_file(str(checkpoint_dir / "model.safetensors")))
    return save_hf_dir(model, out, tokenizer=data.tokenizer_dir)


# ------------------------------------------------------------------------ checks before Ray


@dataclass
class LMPlan:
    """What the checks found, handed on to the job."""

    data: TextDataset
    teacher: nn.Module  # loaded (`checkpoint`) or built fresh from its config (`train`)
    student: nn.Module
    vocab_size: int  # width of both models' logits
    warnings: list[str] = field(default_factory=list)


def _tokenizer_in(folder: Path):
    from trainers.text_data import load_tokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    return load_tokenizer(folder)


def _positions(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def plan_language_model(spec: JobSpec, data_dir: str | None) -> LMPlan:
    """Everything about a language-model job that can go wrong before Ray starts, each an
    InputError naming the YAML path: the text files and the tokenizer, the teacher's tokenizer
    against the data's (the first difference named), the models built offline, their vocabulary
    and positions against the tokenizer and `data.seq_len`, the student's initialisation from
    the teacher, and int8 export."""
    import torch

    from trainers.text_data import check_tokenizers_agree, load_text_dataset

    data, tokenizer = load_text_dataset(spec.data, data_dir)
    # every model directory that holds a tokenizer must agree with the data's; a checkpoint
    # teacher must hold one (its logits are over its own tokenizer's ids)
    for section, model_spec in spec.model_specs():
        if model_spec.path is None:
            continue
        folder = check_model_dir(model_spec.path)
        theirs = _tokenizer_in(folder)
        if theirs is None:
            if section == "teacher.model":
                raise TextDataError(
                    f"`teacher.model.path` {folder} holds no tokenizer, so it cannot be checked "
                    f"against `data.tokenizer` {data.tokenizer_dir}: save the teacher's tokenizer "
                    "there (`tokenizer.save_pretrained(dir)`)")
            continue
        try:
            check_tokenizers_agree(theirs, tokenizer, names=(section.split(".")[0], "data"))
        except TokenizerMismatch as err:
            raise TokenizerMismatch(
                f"`{section}.path` {folder} and `data.tokenizer` {data.tokenizer_dir}: {err}"
            ) from None

    torch.manual_seed(spec.seed)
    teacher = build_hf_model(spec.teacher.model)
    student = build_hf_model(spec.student.model, teacher)  # copies the chosen blocks, if asked
    widths = {"teacher.model": logits_width(teacher), "student.model": logits_width(student)}
    if widths["teacher.model"] != widths["student.model"]:
        raise HFModelError(f"the teacher's logits cover {widths['teacher.model']} tokens and the "
                           f"student's {widths['student.model']}: token distillation needs one "
                           "vocabulary (`vocab_size`)")
    for section, model in (("teacher.model", teacher), ("student.model", student)):
        if widths[section] < data.vocab_size:
            raise HFModelError(f"`{section}` has {widths[section]} token embeddings but "
                               f"`data.tokenizer` makes ids up to {data.vocab_size - 1}: set "
                               f"`vocab_size` to at least {data.vocab_size}")
        positions = _positions(model)
        if positions is not None and positions < data.seq_len:
            raise HFModelError(f"`data.seq_len` {data.seq_len} is longer than `{section}`'s "
                               f"{positions} positions (`max_position_embeddings`)")
        try:
            with torch.no_grad():
                ids = torch.zeros(1, data.seq_len, dtype=torch.long)
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
        except Exception as err:  # transformers raises many types for a model that cannot run
            raise HFModelError(f"`{section}` does not run on a block of {data.seq_len} tokens: "
                               f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from None
    if spec.quantization.method == "int8_weights":
        from transformers.pytorch_utils import Conv1D

        if any(isinstance(m, Conv1D) for m in student.modules()):
            raise HFModelError(
                "`quantization.method` int8_weights: the student keeps its projections in "
                "transformers' Conv1D (GPT-2 style), which compressed-tensors does not quantize; "
                "use a Llama-style model (nn.Linear projections) or `method: none`")
    warnings = []
    if data.train.tokens < 4 * data.seq_len * spec.resources.student_workers:
        warnings.append(f"only {data.train.tokens:,} training tokens for blocks of "
                        f"{data.seq_len}")
    return LMPlan(data, teacher, student, widths["student.model"], warnings)


# ------------------------------------------------------------------------------ token cache


def cache_settings(spec: JobSpec, vocab_size: int):
    """The spec's `logits.tokens` with `k` at most the vocabulary (k = vocabulary keeps the
    whole distribution), as the replicas answer and the cache stores it."""
    tokens = spec.logits.tokens
    return tokens.model_copy(update={"k": min(tokens.k, vocab_size)})


def token_cache_key_for(spec: JobSpec, teacher_digest: str, data: TextDataset,
                        vocab_size: int) -> str:
    """The token cache's name: the teacher directory's digest, the training blocks, the
    tokenizer, seq_len and the stored settings (trainers/token_cache.py)."""
    from trainers.token_cache import token_cache_key

    return token_cache_key(
        teacher_digest=teacher_digest, data_digest=data.fingerprint(),
        tokenizer_fingerprint=data.tokenizer_fingerprint, seq_len=data.seq_len,
        spec=cache_settings(spec, vocab_size), vocab_size=vocab_size,
        temperature=spec.distillation.temperature, precision=spec.teacher_precision)


def fill_token_cache_from_pool(spec: JobSpec, client, data: TextDataset, root: Path, key: str,
                               vocab_size: int, teacher_digest: str):
    """Fill (or finish after a kill, or find) the token cache `<root>/<key>` with the teacher
    replicas' top-k: shard by shard (trainers/token_cache.py: a finished shard is never
    recomputed), each shard's sequences sent to the replicas as several requests in flight
    (row indices into the blocks, which go into the object store once). Returns (folder,
    FillStats)."""
    import ray

    from trainers.lm_teacher import pack_blocks, unpack_topk
    from trainers.token_cache import fill_token_cache

    source = ray.put(pack_blocks(data.train.input_ids, data.train.attention_mask))
    resources = spec.resources
    settings = cache_settings(spec, vocab_size)

    def teacher_topk(start: int, stop: int):
        # at least two requests per replica, so that every replica works on every shard
        rows = max(1, min(resources.teacher_request_rows,
                          math.ceil((stop - start) / (2 * resources.teacher_replicas))))
        batches = [np.arange(i, min(stop, i + rows)) for i in range(start, stop, rows)]
        answer = np.concatenate(list(client.stream_rows(source, iter(batches), 1)))
        return unpack_topk(answer)

    meta = {"teacher_digest": teacher_digest, "data_digest": data.fingerprint(),
            "tokenizer_fingerprint": data.tokenizer_fingerprint,
            "temperature": spec.distillation.temperature, "precision": spec.teacher_precision}
    return fill_token_cache(root, key, num_samples=data.train_rows, seq_len=data.seq_len,
                            vocab_size=vocab_size, spec=settings, teacher_topk=teacher_topk,
                            meta=meta)


def teacher_scores_from_pool(replicas: list, data: TextDataset, batch_size: int) -> np.ndarray:
    """Summed (nll, correct, count) of the teacher over the test blocks (`token_scores`),
    the batches spread over the replicas and all in flight at once."""
    import ray

    from trainers.lm_teacher import pack_blocks

    refs = [replicas[i % len(replicas)].score.remote(pack_blocks(ids, mask))
            for i, (ids, mask) in enumerate(data.test_batches(batch_size))]
    return np.sum(ray.get(refs), axis=0)


def directory_record(folder: Path) -> dict:
    """What identifies a teacher directory between runs: its digest (config and weights)."""
    from trainers.hf_models import model_dir_digest

    return {"path": str(folder), "digest": model_dir_digest(folder)}
