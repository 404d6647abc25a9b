"""The language-model spec sections parse, keep their defaults, and report bad values with
their YAML paths through the same machinery as the job spec (specs/load.py)."""

import pytest
import yaml
from pydantic import Field, ValidationError

from specs.job import Strict
from specs.lm import (
    ForwardKL,
    GeneralizedJSD,
    HFModel,
    ReverseKL,
    TextData,
    TokenCacheSpec,
    TokenLossSpec,
    validate_topk_loss,
)
from specs.load import problems_from_validation


class Sections(Strict):
    """The sections as a job spec would hold them (the job spec itself wires them in)."""

    teacher: HFModel
    student: HFModel
    data: TextData
    distillation: TokenLossSpec = Field(default_factory=lambda: ForwardKL(kind="forward_kl"))
    topk: TokenCacheSpec = Field(default_factory=TokenCacheSpec)


GOOD = """
teacher: {kind: hf, path: /models/teacher}
student:
  kind: hf
  config: {model_type: llama, hidden_size: 64, num_hidden_layers: 3}
  task: causal_lm
  init: {from_teacher: true, layers: [0, 2, 4]}
data: {kind: text, train: "corpus/train/*.jsonl", test: "corpus/test/*.jsonl", format: jsonl,
       text_column: text, tokenizer: /models/tok, seq_len: 256, pack: true}
distillation: {kind: jsd, beta: 0.5, temperature: 2.0, alpha: 0.8}
topk: {k: 64, ids: int16, logprobs: int8, missing_mass: tail}
"""


def _problems(raw):
    with pytest.raises(ValidationError) as info:
        Sections.model_validate(raw)
    return {p.path: p for p in problems_from_validation(info.value, raw)}


def test_the_documented_example_parses_with_its_values():
    spec = Sections.model_validate(yaml.safe_load(GOOD))
    assert spec.student.init.layers == [0, 2, 4] and spec.student.config["model_type"] == "llama"
    assert spec.teacher.task == "causal_lm" and spec.teacher.init.from_teacher is False
    assert isinstance(spec.distillation, GeneralizedJSD) and spec.distillation.beta == 0.5
    assert spec.data.seq_len == 256 and spec.data.pack
    assert (spec.topk.k, spec.topk.ids, spec.topk.logprobs) == (64, "int16", "int8")
    assert Sections.model_validate_json(spec.model_dump_json()) == spec  # the trip to workers


def test_defaults_live_on_the_spec():
    spec = Sections.model_validate({
        "teacher": {"kind": "hf", "config": "/cfg"}, "student": {"kind": "hf", "path": "/s"},
        "data": {"kind": "text", "train": "a/*", "test": "b/*", "tokenizer": "/t"}})
    assert spec.data.format == "jsonl" and spec.data.text_column == "text"
    assert spec.data.seq_len == 256 and spec.data.pack is True
    assert spec.distillation == ForwardKL(kind="forward_kl", temperature=1.0, alpha=0.5)
    assert spec.topk == TokenCacheSpec(k=32, ids="auto", logprobs="bf16", missing_mass="tail")
    assert spec.teacher.task == "causal_lm"


def test_every_bad_value_is_reported_at_once_with_its_yaml_path():
    raw = yaml.safe_load(GOOD)
    raw["teacher"]["pth"] = "/x"  # unknown key
    raw["student"]["task"] = "seq2seq"
    raw["student"]["init"]["layers"] = [0, -1]
    raw["data"]["format"] = "csv"
    raw["data"]["seq_len"] = 1
    raw["distillation"]["beta"] = 1.5
    raw["topk"]["logprobs"] = "fp8"
    raw["topk"]["k"] = 0
    problems = _problems(raw)
    assert set(problems) == {
        "teacher.pth", "student.task", "student.init.layers[1]", "data.format", "data.seq_len",
        "distillation.beta", "topk.logprobs", "topk.k"}
    assert "unknown key" in problems["teacher.pth"].message
    assert problems["data.seq_len"].value == 1 and problems["distillation.beta"].value == 1.5


def test_unknown_kinds_name_the_allowed_ones():
    raw = yaml.safe_load(GOOD)
    raw["distillation"] = {"kind": "mse"}
    problems = _problems(raw)
    message = problems["distillation"].message
    assert all(k in message for k in ("forward_kl", "reverse_kl", "jsd"))


@pytest.mark.parametrize("section,change,words", [
    ("teacher", {"config": {"model_type": "gpt2"}}, ["exactly one of `path`"]),
    ("teacher", {"path": None}, ["exactly one of `path`"]),
    ("student", {"config": {"hidden_size": 8}}, ["`model_type`"]),
    ("student", {"init": {"from_teacher": False, "layers": [1]}}, ["`from_teacher: true`"]),
    ("student", {"init": {"from_teacher": True}}, ["needs `layers`"]),
    ("student", {"init": {"from_teacher": True, "layers": [2, 2]}}, ["increase strictly"]),
    ("data", {"format": "txt"}, ["`text_column`", "`txt`"]),
])
def test_cross_field_errors_name_the_fields(section, change, words):
    raw = yaml.safe_load(GOOD)
    raw[section] = {**raw[section], **change}
    problems = _problems(raw)
    path = section + (".config" if section == "student" and "config" in change else "")
    if section == "student" and "init" in change:
        path = "student.init"
    assert path in problems, problems
    assert all(w in problems[path].message for w in words), problems[path].message


def test_a_txt_source_without_text_column_is_fine():
    data = TextData(kind="text", train="a/*.txt", test="b/*.txt", format="txt", tokenizer="/t")
    assert data.text_column == "text"


def test_init_from_teacher_needs_a_fresh_model():
    with pytest.raises(ValidationError, match="use `config`, not `path`"):
        HFModel(kind="hf", path="/m", init={"from_teacher": True, "layers": [0]})


def test_reverse_kl_against_a_renormalized_top_k_is_refused():
    renorm = TokenCacheSpec(missing_mass="renormalize")
    for loss in (ReverseKL(kind="reverse_kl"), GeneralizedJSD(kind="jsd", beta=1.0)):
        with pytest.raises(ValueError, match="`missing_mass: tail`"):
            validate_topk_loss(loss, renorm)
        validate_topk_loss(loss, TokenCacheSpec(missing_mass="tail"))
    validate_topk_loss(GeneralizedJSD(kind="jsd", beta=0.9), renorm)
    validate_topk_loss(ForwardKL(kind="forward_kl"), renorm)


def test_sections_are_frozen():
    spec = Sections.model_validate(yaml.safe_load(GOOD))
    with pytest.raises(ValidationError):
        spec.data.seq_len = 3  # type: ignore[misc]
