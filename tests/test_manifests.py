"""Cluster configurations: parse, run the right entrypoint, and are sized from the spec."""

from pathlib import Path

import pytest
import yaml

from cluster.manifests import cronjob, launcher_config, raycluster, rayjob, write_all
from specs import load_spec, parse_spec
from test_job_ray import digits_spec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster" / "configs"


def test_committed_configs_are_what_the_generator_writes(tmp_path):
    """cluster/configs/ is generated from examples/digits.yaml; it must not drift."""
    write_all(load_spec(ROOT / "examples" / "digits.yaml"), "stillhouse:0.1.0", tmp_path)
    for path in tmp_path.iterdir():
        assert (CONFIGS / path.name).read_text() == path.read_text(), (
            f"{path.name} is stale: run `stillhouse manifests examples/digits.yaml "
            "--image stillhouse:0.1.0 --out cluster/configs`")


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "raycluster.yaml", "rayjob.yaml", "cronjob.yaml"])
def test_committed_configs_parse(name):
    docs = list(yaml.safe_load_all((CONFIGS / name).read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def _spec(**resources):
    raw = digits_spec(1, group="g", name="big", recurring={"cron": "30 1 * * *"})
    raw["resources"].update(resources)
    return parse_spec(raw)


def test_rayjob_runs_the_driver_on_groups_sized_from_the_spec():
    spec = _spec(teacher_replicas=3, teacher_cpus=2.0, student_workers=4, student_cpus=1.5)
    config_map, job = rayjob(spec, "img:1")
    assert job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"]
    assert entry.startswith("python -m orchestrator.cli run /etc/stillhouse/spec.yaml --address auto")
    shipped = parse_spec(yaml.safe_load(config_map["data"]["spec.yaml"]))
    assert shipped.resources.teacher_labels == {"stillhouse-role": "teacher"}
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups["teacher"]["replicas"] == 3 and groups["student"]["replicas"] == 4
    teacher = groups["teacher"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    student = groups["student"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert teacher["cpu"] == "2" and student["cpu"] == "2"  # 1.5 CPUs round up to whole nodes
    assert groups["teacher"]["rayStartParams"]["labels"] == "stillhouse-role=teacher"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in head["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # the token is never inlined
    standalone = {g["groupName"]: g["replicas"]
                  for g in raycluster(spec, "img:1")["spec"]["workerGroupSpecs"]}
    assert standalone == {"teacher": 3, "student": 4}


def test_launcher_and_cronjob():
    spec = _spec(teacher_replicas=1, teacher_cpus=4.0)
    launcher = launcher_config(spec, "img:1")
    assert launcher["available_node_types"]["teacher"]["resources"] == {"CPU": 4}
    assert launcher["available_node_types"]["teacher"]["labels"] == {"stillhouse-role": "teacher"}
    assert launcher["available_node_types"]["student"]["min_workers"] == 2
    cron = cronjob(spec, "img:1")
    assert cron["spec"]["schedule"] == "30 1 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "stillhouse submit /etc/stillhouse/spec.yaml" in command and "--follow" in command
