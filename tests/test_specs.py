"""Job specs: examples parse, every error is reported with its YAML path, exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from specs import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

BASE = {
    "name": "t",
    "data": {"kind": "digits"},
    "teacher": {"kind": "train", "model": {"kind": "mlp", "hidden": [16]}},
    "student": {"model": {"kind": "mlp", "hidden": [8]}},
}


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"digits.yaml", "mnist-lenet300.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_spec_parses(path):
    spec = load_spec(path)
    assert spec.name
    # and survives the JSON round trip it takes to reach the workers
    assert type(spec).model_validate_json(spec.model_dump_json()) == spec


def _problems(raw):
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return {p.path: p for p in info.value.problems}


def test_all_errors_are_reported_at_once_with_paths():
    raw = {
        **BASE,
        "data": {"kind": "mnist", "dirr": "x"},
        "teacher": {"kind": "train", "model": {"kind": "mlp", "hidden": [16, -2]}},
        "student": {"model": {"kind": "mlp", "hidden": [8]}, "lr": -0.1},
        "pruning": {"target_sparsity": 1.0},
        "precision": "fp8",
    }
    problems = _problems(raw)
    assert set(problems) == {
        "data.dirr", "teacher.model.hidden[1]", "student.lr", "pruning.target_sparsity",
        "precision",
    }
    assert "unknown key" in problems["data.dirr"].message
    assert problems["student.lr"].value == -0.1
    assert problems["pruning.target_sparsity"].value == 1.0


def test_unknown_kind_names_the_allowed_ones():
    problems = _problems({**BASE, "data": {"kind": "cifar"}})
    assert "digits" in problems["data"].message and "mnist" in problems["data"].message


def test_cross_field_errors_name_fields():
    problems = _problems({**BASE, "pruning": {"rounds": 3, "schedule": {"kind": "oneshot"}}})
    assert "`rounds: 1`" in problems["pruning"].message
    problems = _problems({**BASE, "pruning": {
        "target_sparsity": 0.9, "rounds": 2, "schedule": {"kind": "geometric", "keep_fraction": 0.5}}})
    assert "`keep_fraction`" in problems["pruning"].message
    problems = _problems({**BASE, "pruning": {
        "target_sparsity": 0.9, "rounds": 2, "schedule": {"kind": "explicit", "sparsities": [0.5, 0.8]}}})
    assert "`target_sparsity`" in problems["pruning"].message
    problems = _problems({**BASE, "pruning": {"rounds": 3, "finetune_epochs": [2, 4]}})
    assert "`finetune_epochs` lists 2 rounds but `rounds` is 3" in problems["pruning"].message
    # one problem per bad value, at its own path, not one per accepted form (number or list)
    problems = _problems({**BASE, "pruning": {"rounds": 2, "finetune_epochs": [2, -1]}})
    assert set(problems) == {"pruning.finetune_epochs[1]"}
    problems = _problems({**BASE, "pruning": {"finetune_epochs": -1}})
    assert set(problems) == {"pruning.finetune_epochs"} and problems["pruning.finetune_epochs"].value == -1
    problems = _problems({**BASE, "student": {"model": {"kind": "lenet5"}}})
    assert "`padding: 2`" in problems[""].message


def test_gpu_and_zero_cross_field_errors_name_fields():
    problems = _problems({**BASE, "precision": "fp16"})
    assert "`precision` fp16" in problems[""].message
    assert "`resources.student_gpus: 1`" in problems[""].message
    problems = _problems({**BASE, "precision": "fp16", "resources": {"student_gpus": 1},
                          "deepspeed": {"zero_stage": 0}})
    assert "`deepspeed.zero_stage`" in problems[""].message
    problems = _problems({**BASE, "deepspeed": {"zero_stage": 0, "offload_optimizer": "cpu"}})
    assert "`offload_optimizer` cpu" in problems["deepspeed"].message
    problems = _problems({**BASE, "resources": {"student_gpus": 2, "teacher_gpus": 1.5}})
    assert set(problems) == {"resources.student_gpus", "resources.teacher_gpus"}
    problems = _problems({**BASE, "resources": {"student_gpus": 0.5, "student_workers": 2}})
    assert "`student_workers: 1`" in problems["resources"].message
    spec = parse_spec({**BASE, "precision": "fp16", "resources": {"student_gpus": 1},
                       "deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu"}})
    assert spec.teacher_precision == "bf16"  # the teacher answers in bf16 for fp16 students


@pytest.mark.parametrize("replicas,gpus,whole", [
    (4, 0.25, 1), (3, 0.4, 2), (5, 0.25, 2), (2, 1.0, 2), (3, 0.0, 0), (1, 0.3, 1),
])
def test_teacher_replicas_fill_whole_gpus(replicas, gpus, whole):
    spec = parse_spec({**BASE, "resources": {"teacher_replicas": replicas, "teacher_gpus": gpus}})
    assert spec.resources.teacher_total_gpus == whole


def test_specs_are_frozen():
    spec = parse_spec(BASE)
    with pytest.raises(Exception):
        spec.seed = 3  # type: ignore[misc]


def test_broken_yaml_gives_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {kind: digits\nteacher: 3\n")
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    assert "line" in str(info.value) and "not valid YAML" in str(info.value)


def test_cli_validate_exit_status(tmp_path, capsys):
    good = EXAMPLES[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "seed": "many", "pruning": {"rounds": 0}}))
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "seed:" in err and "pruning.rounds:" in err and "2 problem(s)" in err


def test_cli_run_with_bad_spec_exits_2_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "student": {"model": {"kind": "mlp", "hidden": []}}}))
    run_dir = tmp_path / "run"
    assert main(["run", str(bad), "--run-dir", str(run_dir)]) == 2
    assert "student.model.hidden" in capsys.readouterr().err
    assert not run_dir.exists()


def test_schema_is_json(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "pruning" in schema["properties"]


def test_loading_a_spec_imports_no_heavy_library():
    code = (
        "import sys; from specs import load_spec; "
        f"load_spec({str(EXAMPLES[0])!r}); "
        "heavy = [m for m in ('torch', 'ray', 'deepspeed', 'wandb') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("mode,shared,alpha,expected", [
    ("online", None, 0.9, 2 * 0.5 + 3 * 1.0),  # replicas serve the workers while they train
    ("cached", None, 0.9, 3 * 1.0),  # replicas fill the cache, then leave before the workers start
    ("topk", None, 0.9, 3 * 1.0),
    ("cached", "pool", 0.9, 2 * 0.5 + 3 * 1.0),  # a shared pool's replicas stay
    ("online", None, 0.0, 3 * 1.0),  # a student alone: replicas score the teacher, then leave
    ("online", "pool", 0.0, 2 * 0.5 + 3 * 1.0),
])
def test_cpus_held_at_once_depend_on_the_teacher_mode(mode, shared, alpha, expected):
    from cluster.local import ClusterResourceError, check_cpus

    spec = parse_spec({**BASE, "logits": {"mode": mode}, "resources": {
        "teacher_replicas": 2, "teacher_cpus": 0.5, "student_workers": 3, "student_cpus": 1.0,
        "shared_pool": shared}, "distillation": {"kind": "hinton", "alpha": alpha}})
    assert spec.student_uses_teacher == (alpha > 0)
    assert spec.total_cpus == expected
    check_cpus(spec, expected, "here")
    with pytest.raises(ClusterResourceError, match=f"asks for {expected:g} CPUs"):
        check_cpus(spec, expected - 0.5, "here")


def test_kmeans_takes_bits_per_layer_type():
    spec = parse_spec({**BASE, "quantization": {"method": "kmeans"}})
    assert (spec.quantization.bits.linear, spec.quantization.bits.conv) == (5, 8)  # Deep Compression
    assert spec.quantization.trains
    spec = parse_spec({**BASE, "quantization": {"method": "kmeans", "bits": {"linear": 3}}})
    assert (spec.quantization.bits.linear, spec.quantization.bits.conv) == (3, 8)
    problems = _problems({**BASE, "quantization": {"method": "kmeans", "bits": {
        "linear": 9, "conv": 0, "fc": 4}}})
    assert set(problems) == {"quantization.bits.linear", "quantization.bits.conv",
                             "quantization.bits.fc"}
    assert problems["quantization.bits.linear"].value == 9


def test_feature_distillation_uses_the_teacher_even_at_alpha_zero():
    spec = parse_spec({**BASE, "distillation": {"kind": "hinton", "alpha": 0.0, "features": [
        {"student": "net.0", "teacher": "net.0"}]}})
    assert spec.student_uses_teacher and spec.replicas_beside_workers


def test_the_teacher_may_train_on_its_own_augmentation():
    shifts = {"random_crop_padding": 2, "hflip": False}
    teacher = {**BASE["teacher"], "augment": {"random_crop_padding": 2}}
    # shifted images for the teacher, the images as stored for the student: cached logits work
    spec = parse_spec({**BASE, "teacher": teacher, "logits": {"mode": "cached"}})
    assert spec.augmentation("teacher").model_dump() == shifts
    assert not spec.augmentation("student").enabled
    # without its own, the teacher trains on `data.augment`, as the student does
    spec = parse_spec({**BASE, "data": {"kind": "digits", "augment": shifts}})
    assert spec.augmentation("teacher") == spec.augmentation("student") == spec.data.augment
    # the student's augmentation still needs online logits
    problems = _problems({**BASE, "teacher": teacher, "logits": {"mode": "cached"},
                          "data": {"kind": "digits", "augment": shifts}})
    assert any("logits.mode: cached" in p.message for p in problems.values()), problems
    problems = _problems({**BASE, "teacher": {**teacher, "augment": {"random_crop_padding": -1}}})
    assert set(problems) == {"teacher.augment.random_crop_padding"}


def test_pruning_rounds_may_fine_tune_on_their_own_augmentation():
    shifts = {"random_crop_padding": 2}
    # a dense student on shifted images, its pruning rounds and quantization fine-tuning on the
    # images as stored (`augment: {}`)
    spec = parse_spec({**BASE, "data": {"kind": "digits", "augment": shifts},
                       "pruning": {"augment": {}}, "quantization": {"method": "qat"}})
    assert spec.augmentation("student", "dense").random_crop_padding == 2
    assert not spec.augmentation("student", "prune").enabled
    assert not spec.augmentation("student", "quantize").enabled
    assert spec.augmentation("teacher", "teacher").random_crop_padding == 2
    # pruning off: its section is not read
    off = parse_spec({**BASE, "data": {"kind": "digits", "augment": shifts},
                      "pruning": {"enabled": False, "augment": {}}})
    assert off.augmentation("student", "quantize").random_crop_padding == 2
    # shifted rounds after a dense student on the images as stored need online logits too
    problems = _problems({**BASE, "logits": {"mode": "cached"}, "pruning": {"augment": shifts}})
    assert "`pruning.augment`" in problems[""].message
    assert parse_spec({**BASE, "logits": {"mode": "cached"}, "pruning": {"augment": {}}})
    problems = _problems({**BASE, "pruning": {"augment": {"random_crop_padding": -1}}})
    assert set(problems) == {"pruning.augment.random_crop_padding"}


def test_online_jobs_may_read_the_cache_in_their_unaugmented_phases():
    shifts = {"random_crop_padding": 2}
    mixed = {"mode": "online", "cache_unaugmented": True}
    # shifted dense student (replicas), rounds on the images as stored (cache)
    spec = parse_spec({**BASE, "data": {"kind": "digits", "augment": shifts},
                       "pruning": {"augment": {}}, "logits": mixed})
    assert spec.logit_cache_mode == "cached" and spec.replicas_beside_workers
    # without the flag, or with every phase shifted, or a student alone: no cache
    assert parse_spec({**BASE, "pruning": {"augment": {}}}).logit_cache_mode is None
    assert parse_spec({**BASE, "data": {"kind": "digits", "augment": shifts},
                       "logits": mixed}).logit_cache_mode is None
    assert parse_spec({**BASE, "logits": mixed, "distillation": {
        "kind": "hinton", "alpha": 0.0}}).logit_cache_mode is None
    assert parse_spec({**BASE, "logits": {"mode": "topk"}}).logit_cache_mode == "topk"
    # the flag belongs to online jobs, and not with features (the cache holds logits only)
    problems = _problems({**BASE, "logits": {"mode": "cached", "cache_unaugmented": True}})
    assert "`logits.cache_unaugmented`" in problems[""].message
    problems = _problems({**BASE, "logits": mixed, "distillation": {
        "kind": "hinton", "features": [{"student": "net.0", "teacher": "net.0"}]}})
    assert "cache_unaugmented" in problems[""].message
    problems = _problems({**BASE, "logits": {**mixed, "cache_unaugmented": "sometimes"}})
    assert set(problems) == {"logits.cache_unaugmented"}


def test_the_teacher_may_train_on_more_cpus_than_the_student():
    from cluster.local import ClusterResourceError, check_cpus

    # online, 2 CPUs: 1 replica + 1 worker while the student trains; the teacher, trained
    # before the replicas start, takes both on its one worker
    resources = {"teacher_replicas": 1, "teacher_cpus": 1, "student_workers": 1,
                 "student_cpus": 1, "teacher_training_cpus": 2}
    spec = parse_spec({**BASE, "resources": resources})
    assert (spec.resources.worker_cpus("teacher"), spec.resources.worker_cpus("student")) == (2, 1)
    assert spec.total_cpus == 2
    # more than the replicas and workers together: the teacher's stage sets the demand
    spec = parse_spec({**BASE, "resources": {**resources, "teacher_training_cpus": 3}})
    assert spec.total_cpus == 3
    with pytest.raises(ClusterResourceError, match="asks for 3 CPUs"):
        check_cpus(spec, 2, "here")
    # a teacher loaded from a file is not trained: the setting holds no CPUs
    loaded = {"kind": "checkpoint", "model": BASE["teacher"]["model"], "path": "t.safetensors"}
    spec = parse_spec({**BASE, "teacher": loaded, "resources": {**resources,
                                                                "teacher_training_cpus": 3}})
    assert spec.total_cpus == 2
    assert set(_problems({**BASE, "resources": {**resources, "teacher_training_cpus": 0}})) == {
        "resources.teacher_training_cpus"}
