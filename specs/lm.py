"""Spec sections for language models: Hugging Face models, text data, token-level distillation
losses and the per-token top-k logit cache.

They follow `specs/job.py` (Strict: unknown keys are errors, frozen, every default here, variants
discriminated by `kind`), which wires them into the job spec: `HFModel` in the model union of
teacher and student, `TextData` in the data union, the token losses in the distillation union,
`TokenCacheSpec` as `logits.tokens`. `validate_topk_loss` is the cross-section check the job
spec runs in its own validator.

This module imports pydantic only, so `stillhouse validate` stays instant.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_serializer, model_validator

from specs.base import Strict

# ------------------------------------------------------------------------------------ models


class HFInit(Strict):
    """How a fresh student's weights start: at random (the default), or copied from the teacher.

    `from_teacher: true` copies the teacher's embeddings, the decoder blocks listed in `layers`
    (student block i <- teacher block `layers[i]`), the final norm and the LM head, as DistilBERT
    and Minitron initialise their students. The student's config must match the teacher's in
    everything but the number of blocks (and whatever the copied weights do not depend on).
    """

    from_teacher: bool = Field(False, description="copy weights from the teacher")
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1,
        description="teacher decoder blocks copied into the student's blocks, in order, "
        "one per student block (0-based)",
    )

    @model_validator(mode="after")
    def _layers_with_teacher(self) -> "HFInit":
        if self.layers is not None and not self.from_teacher:
            raise ValueError("`layers` picks teacher blocks to copy: set `from_teacher: true`")
        if self.from_teacher and self.layers is None:
            raise ValueError("`from_teacher: true` needs `layers`: the teacher blocks to copy")
        if self.layers is not None and any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(f"`layers` must increase strictly (given {self.layers})")
        return self


class HFModel(Strict):
    """A Hugging Face transformers model, built offline (local files only, safetensors only,
    never remote code).

    `path`: a directory written by `save_pretrained` (config.json and model.safetensors), loaded
    with its weights. `config`: a fresh model with random weights (or weights copied from the
    teacher, see `init`), from a config directory or from inline fields, e.g.
    `{model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}`, given to
    `AutoConfig.for_model(model_type, **fields)`.
    """

    kind: Literal["hf"]
    path: str | None = Field(
        None, min_length=1, description="directory with config.json and model.safetensors"
    )
    config: str | dict[str, Any] | None = Field(
        None, description="config directory, or inline config fields including `model_type`"
    )
    task: Literal["causal_lm", "sequence_classification"] = Field(
        "causal_lm", description="the head: next-token prediction, or one label per sequence "
        "(the number of labels is the config's `num_labels`)",
    )
    init: HFInit = Field(default_factory=HFInit, description="where a fresh model's weights start")

    @field_validator("config")
    @classmethod
    def _inline_config_names_its_type(cls, value):
        if isinstance(value, str) and not value:
            raise ValueError("an empty string names no config directory")
        if isinstance(value, dict):
            model_type = value.get("model_type")
            if not isinstance(model_type, str) or not model_type:
                raise ValueError(
                    "an inline config needs `model_type` (e.g. `gpt2`, `llama`): it picks the "
                    "config class"
                )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "HFModel":
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of `path` (weights) or `config` (a fresh model)")
        if self.path is not None and self.init.from_teacher:
            raise ValueError(
                "`init.from_teacher` initialises a fresh model: use `config`, not `path`"
            )
        return self


# -------------------------------------------------------------------------------------- data


class TextData(Strict):
    """Text files, tokenized and cut into fixed-length blocks.

    Each glob is expanded and sorted (local paths). A `jsonl` line or a `parquet` row is one
    document, its text in `text_column`; a `txt` file is one document. With `pack: true` the
    documents' tokens are concatenated (an end-of-sequence token after each, when the tokenizer
    has one) and cut into blocks of `seq_len` tokens, attention running across document
    boundaries as in GPT pre-training; with `pack: false` each document is one block, truncated
    to `seq_len` and padded. A block's sample id is its position in that order, stable as long as
    the files, the tokenizer and `seq_len` are.
    """

    kind: Literal["text"]
    train: str = Field(min_length=1, description="glob of the training files")
    test: str = Field(min_length=1, description="glob of the held-out files")
    format: Literal["jsonl", "parquet", "txt"] = "jsonl"
    text_column: str = Field(
        "text", min_length=1, description="jsonl / parquet: the field holding the text"
    )
    tokenizer: str = Field(
        min_length=1, description="tokenizer directory (as written by `save_pretrained`)"
    )
    seq_len: int = Field(256, ge=2, le=1 << 20, description="tokens per block")
    pack: bool = Field(True, description="concatenate documents into full blocks (else one "
                       "padded block per document)")

    @model_validator(mode="after")
    def _column_needs_columns(self) -> "TextData":
        if self.format == "txt" and "text_column" in self.model_fields_set:
            raise ValueError(
                "`text_column` names a field of `jsonl` / `parquet` records; a `txt` file is one "
                "document: drop `text_column` or change `format`"
            )
        return self

    @model_serializer(mode="wrap")
    def _without_unused_column(self, handler):
        """A `txt` source's dump leaves `text_column` out, so that it validates again (the
        trip to the workers and into the run dir) instead of reading as a column given."""
        fields = handler(self)
        if self.format == "txt" and isinstance(fields, dict):
            fields.pop("text_column", None)
        return fields


# -------------------------------------------------------------------------------- losses


class _TokenLossBase(Strict):
    temperature: float = Field(
        1.0, gt=0.0, description="softmax temperature of both distributions; the divergence is "
        "multiplied by T^2",
    )
    alpha: float = Field(
        0.5, ge=0.0, le=1.0,
        description="weight of the distillation term; next-token cross-entropy gets 1 - alpha",
    )


class ForwardKL(_TokenLossBase):
    """KL(p_teacher || p_student) per token: mass-covering."""

    kind: Literal["forward_kl"]


class ReverseKL(_TokenLossBase):
    """KL(p_student || p_teacher) per token: mode-seeking."""

    kind: Literal["reverse_kl"]


class GeneralizedJSD(_TokenLossBase):
    """Generalized Jensen-Shannon divergence (Agarwal et al. 2024, "GKD"), per token:
    beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta * p_t + (1 - beta) * p_s.

    `beta: 0.5` is the symmetric JSD; the endpoints are defined as in GKD: `beta: 0` is forward
    KL and `beta: 1` reverse KL (the limits of the divergence divided by beta and 1 - beta).
    """

    kind: Literal["jsd"]
    beta: float = Field(0.5, ge=0.0, le=1.0, description="0 forward KL ... 1 reverse KL")


TokenLossSpec = Annotated[
    Union[ForwardKL, ReverseKL, GeneralizedJSD], Field(discriminator="kind")
]


# ------------------------------------------------------------------------------ top-k cache


class TokenCacheSpec(Strict):
    """The teacher's top-k per token, on disk (and on the wire), instead of the full vocabulary.

    For each token the cache keeps the k most probable token ids and their log-probabilities at
    the distillation temperature, and the log of the probability left outside them.
    `missing_mass` says what the loss makes of that rest (see trainers/lm_losses.py):
    `renormalize` scales the teacher's top-k up to sum to 1 (the teacher is taken to give every
    other token probability 0); `tail` keeps the rest as one extra bucket, compared with the
    student's total probability outside the teacher's top-k.
    """

    k: int = Field(32, ge=1, le=4096, description="token ids kept per position")
    ids: Literal["auto", "int32", "int16"] = Field(
        "auto", description="dtype of the stored ids; `auto`: int16 when the vocabulary has at "
        "most 32768 tokens, else int32",
    )
    logprobs: Literal["bf16", "int8"] = Field(
        "bf16", description="storage of the top-k log-probabilities: bfloat16, or 8-bit codes "
        "with one float32 scale per token",
    )
    missing_mass: Literal["renormalize", "tail"] = Field(
        "tail", description="what the loss does with the probability outside the top-k",
    )
    shard_size: int = Field(256, ge=1, description="sequences per cache shard")
    max_shards_in_memory: int = Field(16, ge=1, description="shards a reader keeps mapped")
    cache_dir: str | None = Field(None, description="default: <run_dir>/../logit-cache")


def validate_topk_loss(loss: ForwardKL | ReverseKL | GeneralizedJSD,
                       cache: TokenCacheSpec) -> None:
    """Raise ValueError when a token loss cannot use top-k teacher probabilities as configured.

    Under `renormalize` the teacher gives probability 0 to every token outside its top-k, and
    the student gives them some: reverse KL (and JSD at `beta: 1`, which is reverse KL) is then
    infinite. Field names are relative to the job spec's `distillation` and top-k sections.
    """
    reverse = isinstance(loss, ReverseKL) or (isinstance(loss, GeneralizedJSD) and loss.beta == 1)
    if reverse and cache.missing_mass == "renormalize":
        raise ValueError(
            "reverse KL against a top-k teacher with `missing_mass: renormalize` is infinite "
            "(the teacher gives 0 to tokens the student does not): use `missing_mass: tail`, "
            "or `kind: forward_kl` / `jsd` with `beta` below 1"
        )
