"""The language-model sections inside the job spec: a text job parses with its defaults on the
spec and survives the trip to the workers; every cross-field error names its fields and comes
through the loader with a YAML path (exit status 2)."""

import copy

import pytest

from specs import SpecError, parse_spec
from specs.job import CheckpointTeacher, JobSpec
from specs.lm import ForwardKL, GeneralizedJSD, HFModel, TextData, TokenCacheSpec

LLAMA = {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
LM = {
    "name": "lm",
    "data": {"kind": "text", "train": "c/train/*.jsonl", "test": "c/test/*.jsonl",
             "tokenizer": "c/tok", "seq_len": 64},
    "teacher": {"kind": "train", "model": {"kind": "hf", "config": LLAMA}},
    "student": {"model": {"kind": "hf", "config": {**LLAMA, "num_hidden_layers": 2},
                          "init": {"from_teacher": True, "layers": [0, 3]}}},
    "distillation": {"kind": "forward_kl", "temperature": 2.0, "alpha": 0.8},
    "logits": {"mode": "topk", "tokens": {"k": 16, "logprobs": "int8"}},
    "quantization": {"method": "int8_weights"},
}


def _lm(**changes) -> dict:
    raw = copy.deepcopy(LM)
    for dotted, value in changes.items():
        node = raw
        *path, last = dotted.split("__")
        for key in path:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return raw


def _problems(raw) -> dict:
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return {p.path: p.message for p in info.value.problems}


def test_a_language_model_job_parses_with_its_defaults():
    spec = parse_spec(LM)
    assert spec.language_model
    assert isinstance(spec.data, TextData) and spec.data.pack and spec.data.format == "jsonl"
    assert isinstance(spec.student.model, HFModel) and spec.student.model.init.layers == [0, 3]
    assert spec.distillation == ForwardKL(kind="forward_kl", temperature=2.0, alpha=0.8)
    assert spec.logits.tokens == TokenCacheSpec(k=16, logprobs="int8")
    assert spec.logits.tokens.missing_mass == "tail" and spec.logits.tokens.shard_size == 256
    assert spec.pruning.embeddings is False and spec.pruning.lm_head is False
    # the trip to the workers and into the run dir: JSON, every field set
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec
    assert parse_spec(spec.model_dump(mode="json")) == spec


def test_a_txt_source_survives_the_json_trip():
    spec = parse_spec(_lm(data__format="txt", data__train="c/train/*.py"))
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_an_hf_checkpoint_teacher_is_its_directory():
    spec = parse_spec(_lm(teacher={"kind": "checkpoint", "model": {"kind": "hf",
                                                                    "path": "runs/t"}}))
    assert isinstance(spec.teacher, CheckpointTeacher) and spec.teacher.path is None
    assert spec.teacher.model.path == "runs/t"
    problems = _problems(_lm(teacher={"kind": "checkpoint", "path": "t.safetensors",
                                      "model": {"kind": "hf", "path": "runs/t"}}))
    assert "drop `path`" in problems["teacher"]
    problems = _problems(_lm(teacher={"kind": "checkpoint",
                                      "model": {"kind": "hf", "config": LLAMA}}))
    assert "set `model.path`" in problems["teacher"]
    # a registry model still needs its file
    problems = _problems({"name": "x", "data": {"kind": "digits"},
                          "teacher": {"kind": "checkpoint", "model": {"kind": "mlp",
                                                                      "hidden": [8]}},
                          "student": {"model": {"kind": "mlp", "hidden": [4]}}})
    assert "`path` is required" in problems["teacher"]


@pytest.mark.parametrize("changes,words", [
    ({"data": {"kind": "digits"}}, ["`teacher.model` kind hf", "`data.kind: text`"]),
    ({"student__model": {"kind": "mlp", "hidden": [8]}}, ["`student.model` is kind mlp",
                                                          "`kind: hf`"]),
    ({"teacher": {"kind": "exported", "path": "t.pt2", "format": "torch_export"}},
     ["hf teacher", "not an exported program"]),
    ({"distillation": {"kind": "hinton"}}, ["token-level loss", "forward_kl"]),
    ({"logits": {"mode": "cached"}}, ["does not fit on disk", "`topk`"]),
    ({"logits": {"mode": "topk", "top_k": 8}}, ["['top_k']", "`logits.tokens`"]),
    ({"logits": {"mode": "online", "shard_size": 100}}, ["['shard_size']"]),
    ({"quantization": {"method": "dynamic"}}, ["`int8_weights`"]),
    # structured pruning cuts the same counts out of every block, gathered weights only
    ({"pruning": {"granularity": "channel", "layers": ["model.layers.0.*"]}},
     ["leave `pruning.layers` at `all`"]),
    ({"pruning": {"granularity": "channel", "lm_head": True}}, ["`lm_head` off"]),
    ({"pruning": {"granularity": "channel", "scope": "global"}}, ["`scope: layer`"]),
    ({"pruning": {"granularity": "channel"}, "deepspeed": {"zero_stage": 3}},
     ["`deepspeed.zero_stage: 3`"]),
    ({"pruning": {"heads": 0.5}}, ["`heads`", "`granularity: channel`"]),
    ({"pruning": {"include_bias": True}}, ["by their weights only"]),
    ({"pruning": {"augment": {}}}, ["`pruning.augment`", "text as it is"]),
    ({"student__model__task": "sequence_classification"}, ["`student.model.task`",
                                                           "`task: causal_lm`"]),
    ({"teacher__model__init": {"from_teacher": True, "layers": [0]}},
     ["only the student is initialised"]),
    ({"distillation": {"kind": "reverse_kl"},
      "logits": {"mode": "topk", "tokens": {"missing_mass": "renormalize"}}},
     ["infinite", "`missing_mass: tail`"]),
])
def test_cross_field_errors_name_the_fields(changes, words):
    raw = _lm()
    for key, value in changes.items():
        raw = _lm(**{key: value}) if "__" in key else {**raw, key: value}
    if "data" in changes:  # an image source with the LM models
        raw["data"] = changes["data"]
    message = " ".join(_problems(raw).values())
    assert all(w in message for w in words), message


def test_image_jobs_refuse_the_language_model_settings():
    base = {"name": "img", "data": {"kind": "digits"},
            "teacher": {"kind": "train", "model": {"kind": "mlp", "hidden": [16]}},
            "student": {"model": {"kind": "mlp", "hidden": [8]}}}
    for extra, words in [
        ({"distillation": {"kind": "jsd", "beta": 0.5}}, "token-level loss"),
        ({"logits": {"mode": "online", "tokens": {"k": 8}}}, "`logits.top_k`"),
        ({"quantization": {"method": "int8_weights"}}, "for language models"),
        ({"pruning": {"lm_head": True}}, "`pruning.lm_head`"),
        ({"pruning": {"granularity": "channel", "heads": 0.5}}, "an image classifier has none"),
        ({"student": {"model": {"kind": "hf", "config": LLAMA}}}, "`data.kind: text`"),
    ]:
        message = " ".join(_problems({**base, **extra}).values())
        assert words in message, (extra, message)


def test_every_token_loss_and_a_whole_vocabulary_k_parse():
    spec = parse_spec(_lm(distillation={"kind": "jsd", "beta": 0.3}))
    assert isinstance(spec.distillation, GeneralizedJSD) and spec.distillation.beta == 0.3
    # k above any vocabulary is allowed: the job keeps the whole distribution then
    assert parse_spec(_lm(logits={"mode": "online", "tokens": {"k": 4096}})).logits.tokens.k == 4096


def test_the_default_loss_follows_the_data():
    assert parse_spec(_lm(distillation=None)).distillation == ForwardKL(kind="forward_kl")
    image = parse_spec({"name": "img", "data": {"kind": "digits"},
                        "teacher": {"kind": "train", "model": {"kind": "mlp", "hidden": [16]}},
                        "student": {"model": {"kind": "mlp", "hidden": [8]}}})
    assert image.distillation.kind == "hinton"
