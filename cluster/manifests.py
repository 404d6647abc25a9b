"""Cluster configurations for a stillhouse job, sized from its spec's `resources`.

    stillhouse manifests examples/digits.yaml --image ghcr.io/acme/stillhouse:0.1 --out cluster/configs

writes four files a user adapts and applies:

* `ray-cluster.yaml`   Ray cluster launcher (`ray up`): a head plus `teacher` and `student` node
                       types whose CPUs and labels fit the spec;
* `raycluster.yaml`    a KubeRay RayCluster with the same groups (token auth from a Secret);
* `rayjob.yaml`        a KubeRay RayJob running the job on such a cluster (spec in a ConfigMap);
* `cronjob.yaml`       a Kubernetes CronJob that submits the job on the spec's cron schedule.

Teacher replicas and student workers get their own node groups, labelled with the spec's
`resources.teacher_labels` / `student_labels` (default `stillhouse-role: teacher|student`), each
with enough CPUs for its role. When the spec asks for GPUs, a role's nodes carry them: one GPU per
student worker's node, and for the teacher one GPU per node shared by as many replicas as their
`teacher_gpus` fraction lets (`resources: {GPU: n}` in the launcher config, `nvidia.com/gpu`
requests and limits and Ray's `num-gpus` in KubeRay). Every command runs the same driver as
`stillhouse run`.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from specs import JobSpec

DEFAULT_LABELS = {"teacher": {"stillhouse-role": "teacher"}, "student": {"stillhouse-role": "student"}}
SPEC_MOUNT = "/etc/stillhouse"
RUN_ROOT = "/data/stillhouse/runs"


def role_groups(spec: JobSpec) -> dict[str, dict]:
    """CPUs and GPUs per node and node count for each role, from the spec."""
    r = spec.resources
    groups = {}
    for role, count, cpus, gpus, labels in (
        ("teacher", r.teacher_replicas, r.teacher_cpus, r.teacher_gpus, r.teacher_labels),
        ("student", r.student_workers, spec.most_worker_cpus, r.student_gpus, r.student_labels),
    ):
        per_node, nodes = 1, count  # one replica/worker per node
        if gpus:  # one GPU per node, shared by the replicas whose fractions fit on it
            per_node = min(count, int(1.0 / gpus + 1e-9))
            nodes = -(-count // per_node)
        groups[role] = {"replicas": nodes, "cpus": max(1, math.ceil(per_node * cpus)),
                        "gpus": 1 if gpus else 0, "demand": count * cpus,
                        "labels": dict(labels) or DEFAULT_LABELS[role]}
    return groups


def labelled_spec(spec: JobSpec) -> JobSpec:
    """The spec with role labels filled in, so the job lands on the groups made for it."""
    groups = role_groups(spec)
    body = spec.model_dump(mode="json")
    body["resources"]["teacher_labels"] = groups["teacher"]["labels"]
    body["resources"]["student_labels"] = groups["student"]["labels"]
    return JobSpec.model_validate(body)


def _labels_flag(labels: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


def _entrypoint(spec: JobSpec, spec_path: str) -> str:
    return (f"python -m orchestrator.cli run {spec_path} --address auto "
            f"--run-dir {RUN_ROOT}/{spec.name}")


def launcher_config(spec: JobSpec, image: str) -> dict:
    groups = role_groups(spec)
    node_types = {"head": {"resources": {"CPU": 0}, "node_config": {}, "min_workers": 0,
                           "max_workers": 0}}
    for role, g in groups.items():
        resources = {"CPU": g["cpus"], **({"GPU": g["gpus"]} if g["gpus"] else {})}
        node_types[role] = {
            "resources": resources, "labels": g["labels"], "node_config": {},
            "min_workers": g["replicas"], "max_workers": g["replicas"],
        }
    return {
        "cluster_name": f"stillhouse-{spec.name}",
        "max_workers": sum(g["replicas"] for g in groups.values()),
        "docker": {"image": image, "container_name": "stillhouse"},
        "provider": {"type": "local", "head_ip": "HEAD_IP", "worker_ips": []},
        "available_node_types": node_types,
        "head_node_type": "head",
        "head_start_ray_commands": [
            "ray stop",
            "RAY_AUTH_MODE=token ray start --head --port=6379 --dashboard-host=0.0.0.0 "
            "--num-cpus=0 --autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            "RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379",
        ],
    }


def _container(name: str, image: str, cpus: int, extra: dict | None = None,
               gpus: int = 0) -> dict:
    limits = {"cpu": str(cpus), "memory": f"{2 * max(cpus, 1)}Gi"}
    if gpus:  # an extended resource: Kubernetes wants its request equal to its limit
        limits["nvidia.com/gpu"] = str(gpus)
    return {
        "name": name, "image": image,
        "env": [{"name": "RAY_AUTH_MODE", "value": "token"},
                {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {
                    "name": "stillhouse-ray-token", "key": "auth_token"}}},
                {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {
                    "name": "stillhouse-wandb", "key": "api_key", "optional": True}}}],
        "resources": {"requests": dict(limits), "limits": limits},
        **(extra or {}),
    }


def raycluster_spec(spec: JobSpec, image: str) -> dict:
    groups = role_groups(spec)
    return {
        "rayVersion": "2.60.0",
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {"spec": {"containers": [_container("ray-head", image, 1, {
                "ports": [{"containerPort": 6379, "name": "gcs"},
                          {"containerPort": 8265, "name": "dashboard"}]})]}},
        },
        "workerGroupSpecs": [
            {
                "groupName": role, "replicas": g["replicas"], "minReplicas": g["replicas"],
                "maxReplicas": g["replicas"],
                "rayStartParams": {"num-cpus": str(g["cpus"]), "labels": _labels_flag(g["labels"]),
                                   **({"num-gpus": str(g["gpus"])} if g["gpus"] else {})},
                "template": {"spec": {"containers": [
                    _container(f"ray-{role}", image, g["cpus"], gpus=g["gpus"])]}},
            }
            for role, g in groups.items()
        ],
    }


def raycluster(spec: JobSpec, image: str) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": f"stillhouse-{spec.name}"}, "spec": raycluster_spec(spec, image)}


def rayjob(spec: JobSpec, image: str) -> list[dict]:
    config_map = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"stillhouse-{spec.name}-spec"},
        "data": {"spec.yaml": yaml.safe_dump(labelled_spec(spec).model_dump(mode="json"),
                                             sort_keys=False)},
    }
    cluster_spec = raycluster_spec(spec, image)
    for pod in [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]:
        pod_spec = pod["template"]["spec"]
        pod_spec["volumes"] = [{"name": "spec", "configMap": {"name": f"stillhouse-{spec.name}-spec"}}]
        pod_spec["containers"][0]["volumeMounts"] = [{"name": "spec", "mountPath": SPEC_MOUNT}]
    job = {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": f"stillhouse-{spec.name}"},
        "spec": {
            "entrypoint": _entrypoint(spec, f"{SPEC_MOUNT}/spec.yaml"),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "rayClusterSpec": cluster_spec,
        },
    }
    return [config_map, job]


def submit_and_follow(spec: JobSpec) -> str:
    address = f"http://stillhouse-{spec.name}-head-svc:8265"
    return (f"job=$(stillhouse submit {SPEC_MOUNT}/spec.yaml --address {address} "
            f"--run-dir {RUN_ROOT}/{spec.name}/$(date -u +%Y%m%dT%H%M%SZ)) && "
            f"stillhouse logs \"$job\" --follow --address {address}")


def cronjob(spec: JobSpec, image: str) -> dict:
    cron = spec.recurring.cron or "0 2 * * *"
    if len(cron.split()) == 6:  # Kubernetes cron has no seconds field
        cron = " ".join(cron.split()[1:])
    return {
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": f"stillhouse-{spec.name}-nightly"},
        "spec": {
            "schedule": cron,
            # The pod submits the job and follows it to its end, so `Forbid` means one run at a
            # time and a slot that comes while one runs is skipped, like `recurring.overlap:
            # skip`. Kubernetes cannot queue a slot; use `stillhouse scheduler` for `queue`.
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": spec.recurring.misfire_grace_s,
            "jobTemplate": {"spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never",
                "volumes": [{"name": "spec", "configMap": {"name": f"stillhouse-{spec.name}-spec"}}],
                "containers": [_container("submit", image, 1, {
                    "command": ["sh", "-c", submit_and_follow(spec)],
                    "volumeMounts": [{"name": "spec", "mountPath": SPEC_MOUNT}]})],
            }}}},
        },
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded spec) as readable `|` blocks."""


_Dumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None)
)


def write_all(spec: JobSpec, image: str, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# Generated by `stillhouse manifests` from the spec `{spec.name}`; "
              "sized from its `resources`.\n")
    files = {
        "ray-cluster.yaml": [launcher_config(spec, image)],
        "raycluster.yaml": [raycluster(spec, image)],
        "rayjob.yaml": rayjob(spec, image),
        "cronjob.yaml": [cronjob(spec, image)],
    }
    written = []
    for name, docs in files.items():
        path = out / name
        path.write_text(header + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False))
        written.append(path)
    return written
