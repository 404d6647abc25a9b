"""A language-model job checked before Ray starts: tokenizers that differ (exit status 2 from
`stillhouse run`, naming the first difference, before a run dir or a cluster exists), blocks
longer than a model's positions, a vocabulary smaller than the tokenizer's, a teacher directory
without its tokenizer, a student that cannot copy the chosen blocks, layer patterns that match
nothing, int8 export of a GPT-2 student, attention heads cut out of a GPT-2 student; and the
plan of a good spec."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_lm import EOS, PAD, causal_lm, corpus, llama_config, train_tokenizer, write_jsonl

from orchestrator.preflight import PlanError, preflight
from specs import parse_spec
from specs.errors import InputError
from trainers.hf_models import HFModelError, save_hf_dir
from trainers.text_data import TextDataError, TokenizerMismatch

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 300


def _config(**kw) -> dict:
    return {**llama_config(VOCAB, hidden=32, intermediate=64, **kw).to_diff_dict(),
            "model_type": "llama"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-preflight")
    docs = corpus(40, seed=5)
    write_jsonl(root / "train", docs[:32])
    write_jsonl(root / "test", docs[32:])
    tok = train_tokenizer(root / "tok", docs[:32], vocab_size=VOCAB)
    teacher = causal_lm(llama_config(VOCAB, layers=3, hidden=32, intermediate=64))
    save_hf_dir(teacher, root / "teacher", tokenizer=tok)
    # the same teacher, saved with a tokenizer trained with one more special token: the ids
    # from VOCAB - 1 on differ
    other = train_tokenizer(root / "other-tok", docs[:32], vocab_size=VOCAB,
                            extra_special=("<sep>",))
    save_hf_dir(teacher, root / "teacher-other-tok", tokenizer=other)
    save_hf_dir(teacher, root / "teacher-no-tok")
    return root


def _spec(root: Path, **changes) -> dict:
    raw = {
        "name": "lm-pre",
        "data": {"kind": "text", "train": str(root / "train/*.jsonl"),
                 "test": str(root / "test/*.jsonl"), "tokenizer": str(root / "tok"),
                 "seq_len": 32},
        "teacher": {"kind": "checkpoint", "model": {"kind": "hf", "path": str(root / "teacher")}},
        "student": {"model": {"kind": "hf", "config": _config(layers=2),
                              "init": {"from_teacher": True, "layers": [0, 2]}},
                    "batch_size": 4},
        "pruning": {"target_sparsity": 0.5, "rounds": 1, "schedule": {"kind": "oneshot"}},
        "resources": {"teacher_replicas": 1, "teacher_cpus": 0.5, "student_workers": 2,
                      "student_cpus": 0.5},
    }
    raw.update(changes)
    return raw


def test_differing_tokenizers_exit_2_before_ray_starts(files, tmp_path):
    spec = _spec(files, teacher={"kind": "checkpoint", "model": {
        "kind": "hf", "path": str(files / "teacher-other-tok")}})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(path),
                             "--run-dir", str(run_dir)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "`teacher.model.path`" in result.stderr and "teacher-other-tok" in result.stderr
    # the first difference, named: the extra special token took an id the other one gives a merge
    assert "tokenizers differ at token id" in result.stderr
    assert "'<sep>'" in result.stderr
    # nothing started and nothing was written: the run dir is created after the checks, and
    # the cluster after the run dir
    assert not run_dir.exists()
    assert "[stillhouse] job" not in result.stdout and "Ray" not in result.stdout


def test_the_tokenizer_check_names_the_first_difference(files):
    with pytest.raises(TokenizerMismatch) as info:
        preflight(parse_spec(_spec(files, teacher={"kind": "checkpoint", "model": {
            "kind": "hf", "path": str(files / "teacher-other-tok")}})), None, frozenset())
    message = str(info.value)
    index = int(message.split("token id ")[1].split(":")[0])
    assert index >= 2  # EOS and PAD are ids 0 and 1 in both
    assert EOS not in message and PAD not in message


@pytest.mark.parametrize("change,error,words", [
    ({"teacher": "teacher-no-tok"}, TextDataError, ["holds no tokenizer",
                                                    "tokenizer.save_pretrained"]),
    ({"seq_len": 200}, HFModelError, ["`data.seq_len` 200", "128 positions"]),
    ({"student_config": _config(layers=2, **{}) | {"vocab_size": 100}}, HFModelError,
     ["logits cover 300 tokens and the student's 100"]),
    ({"init_layers": [0, 5]}, HFModelError, ["`init.layers` [5] out of range"]),
    ({"pruning_layers": ["*.attn.*"]}, PlanError, ["`pruning.layers`", "matches no projection"]),
    ({"student_config": {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 32, "n_layer": 2,
                         "n_head": 4, "n_positions": 64}, "int8": True},
     HFModelError, ["int8_weights", "Conv1D"]),
    ({"batch": 64}, PlanError, ["`student.batch_size` 64", "sequences"]),
    # structured pruning: GPT-2's config derives the head size from n_embd / n_head
    ({"student_config": {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 32, "n_layer": 2,
                         "n_head": 4, "n_positions": 64}, "structured_heads": 0.5},
     PlanError, ["`pruning.heads` 0.5", "n_embd / n_head"]),
])
def test_a_job_that_cannot_work_is_an_input_error_naming_its_field(files, change, error, words):
    raw = _spec(files)
    if "teacher" in change:
        raw["teacher"]["model"]["path"] = str(files / change["teacher"])
    if "seq_len" in change:
        raw["data"]["seq_len"] = change["seq_len"]
    if "student_config" in change:
        raw["student"]["model"] = {"kind": "hf", "config": change["student_config"]}
    if "init_layers" in change:
        raw["student"]["model"]["init"]["layers"] = change["init_layers"]
    if "pruning_layers" in change:
        raw["pruning"]["layers"] = change["pruning_layers"]
    if change.get("int8"):
        raw["quantization"] = {"method": "int8_weights"}
    if "batch" in change:
        raw["student"]["batch_size"] = change["batch"]
    if "structured_heads" in change:
        raw["pruning"].update(granularity="channel", heads=change["structured_heads"])
    with pytest.raises(error) as info:
        preflight(parse_spec(raw), None, frozenset())
    assert isinstance(info.value, InputError)  # exit status 2
    assert all(w in str(info.value) for w in words), str(info.value)


def test_the_plan_of_a_good_spec(files):
    plan = preflight(parse_spec(_spec(files)), None, frozenset())
    assert plan.rows_are == "sequences" and plan.num_classes == VOCAB
    assert plan.data.seq_len == 32 and plan.train_rows == plan.data.train_rows
    lines = plan.describe()
    assert lines[0].startswith(f"data: {plan.train_rows:,} training sequences of 32 tokens")
    assert [p.name for p in plan.phases] == ["student-00-dense", "student-01-round1"]
