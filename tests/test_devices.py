"""GPU plumbing that can be checked without a GPU: the engine configs a GPU spec gives, the GPU
resource checks (a GPU spec on a machine without CUDA exits 2 before Ray starts), GPU node groups
in the manifests, and DeepSpeed's accelerator following the one device decision."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from cluster.local import ClusterResourceError, check_gpus, check_placement, gpu_demand
from cluster.manifests import launcher_config, raycluster, rayjob
from specs import parse_spec
from test_job_ray import digits_spec
from trainers.engine_config import deepspeed_config, ray_train_configs, replica_options

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "this machine has no CUDA device (torch.cuda.is_available() is False)"


def _spec(resources: dict | None = None, **overrides):
    raw = digits_spec(1, group="g", name="gpu", **overrides)
    raw["resources"].update(resources or {})
    return parse_spec(raw)


def _config(spec):
    return deepspeed_config(spec, micro_batch=32, world_size=2, lr=1e-3, weight_decay=0.0,
                            grad_clip=1.0)


def test_deepspeed_config_for_zero3_offload_and_fp16():
    spec = _spec({"student_gpus": 1}, precision="fp16",
                 deepspeed={"zero_stage": 3, "offload_optimizer": "cpu",
                            "param_persistence_threshold": 0})
    config = _config(spec)
    assert config["zero_optimization"] == {
        "stage": 3, "stage3_param_persistence_threshold": 0,
        "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert config["fp16"] == {"enabled": True, "loss_scale": 0}  # dynamic loss scaling
    assert not config["bf16"]["enabled"] and not config["torch_autocast"]["enabled"]
    cpu = _config(_spec(deepspeed={"zero_stage": 2, "offload_optimizer": "cpu"}))
    assert cpu["zero_optimization"] == {
        "stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert _config(_spec())["zero_optimization"] == {"stage": 1}  # as before on CPU
    assert not _config(_spec())["fp16"]["enabled"]


def test_ray_configs_ask_for_gpus_and_nccl_only_when_the_spec_does(tmp_path):
    scaling, _, torch_config = ray_train_configs(_spec(), tmp_path, "student")
    assert not scaling.use_gpu and scaling.resources_per_worker == {"CPU": 0.5}
    assert torch_config.backend == "gloo"
    assert "num_gpus" not in replica_options(_spec())
    spec = _spec({"student_gpus": 1, "teacher_gpus": 0.25, "student_cpus": 2.0})
    scaling, _, torch_config = ray_train_configs(spec, tmp_path, "student")
    assert scaling.use_gpu and scaling.resources_per_worker == {"CPU": 2.0, "GPU": 1}
    assert torch_config.backend == "nccl"
    assert replica_options(spec)["num_gpus"] == 0.25


@pytest.mark.parametrize("resources,mode,demand", [
    ({"student_gpus": 1, "student_workers": 2}, "online", 2),
    ({"student_gpus": 1, "teacher_gpus": 0.25, "teacher_replicas": 4}, "online", 3),
    ({"student_gpus": 1, "teacher_gpus": 0.5, "teacher_replicas": 3}, "online", 4),
    ({"student_gpus": 1, "teacher_gpus": 0.5, "teacher_replicas": 3}, "cached", 2),
    ({"teacher_gpus": 1.0}, "online", 2),
    ({}, "online", 0),
    # one worker sharing its GPU with two replicas: a one-GPU machine
    ({"student_gpus": 0.5, "student_workers": 1, "teacher_gpus": 0.25}, "online", 1),
    ({"student_gpus": 0.6, "student_workers": 1, "teacher_gpus": 0.25}, "online", 2),
])
def test_gpu_demand_and_its_error_name_the_numbers(resources, mode, demand):
    spec = _spec(resources, logits={"mode": mode})
    assert gpu_demand(spec) == demand
    check_gpus(spec, demand, "here")
    if demand:
        with pytest.raises(ClusterResourceError, match=f"asks for {demand} GPUs") as info:
            check_gpus(spec, demand - 1, "this machine")
        assert f"this machine has {demand - 1}" in str(info.value)
        assert "`resources.student_gpus`" in str(info.value)


def test_placement_counts_gpus_on_labelled_nodes():
    spec = _spec({"student_gpus": 1, "teacher_gpus": 0.5,
                  "teacher_labels": {"role": "t"}, "student_labels": {"role": "s"}})

    def node(role, gpus):
        return {"Alive": True, "Labels": {"role": role}, "Resources": {"CPU": 4, "GPU": gpus}}

    check_placement(spec, [node("t", 1), node("s", 1), node("s", 1)])
    with pytest.raises(ClusterResourceError, match="student workers need 2 GPUs"):
        check_placement(spec, [node("t", 1), node("s", 1), node("t", 1)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_gpu_spec_exits_2_before_ray_starts_on_a_machine_without_cuda(tmp_path):
    raw = digits_spec(1, group="g", name="gpu-here")
    raw["resources"].update(student_gpus=1, teacher_gpus=0.5)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    code = textwrap.dedent(f"""
        import sys
        from orchestrator.cli import main
        status = main(["run", {str(tmp_path / "spec.yaml")!r}, "--run-dir", {str(run_dir)!r}])
        print("ray imported:", "ray" in sys.modules)
        sys.exit(status)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "asks for 3 GPUs" in result.stderr and "this machine has 0" in result.stderr
    assert "ray imported: False" in result.stdout
    assert not run_dir.exists()


def test_manifests_write_gpu_worker_groups():
    spec = _spec({"student_gpus": 1, "student_workers": 2, "student_cpus": 4.0,
                  "teacher_gpus": 0.25, "teacher_replicas": 6, "teacher_cpus": 0.5})
    nodes = launcher_config(spec, "img:1")["available_node_types"]
    assert nodes["student"]["resources"] == {"CPU": 4, "GPU": 1}
    assert nodes["student"]["min_workers"] == 2
    # four replicas of a quarter GPU share a node's GPU: 6 replicas on 2 nodes, 2 CPUs each
    assert nodes["teacher"]["resources"] == {"CPU": 2, "GPU": 1}
    assert nodes["teacher"]["min_workers"] == 2
    for cluster_spec in (raycluster(spec, "img:1")["spec"],
                         rayjob(spec, "img:1")[1]["spec"]["rayClusterSpec"]):
        groups = {g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}
        for role, replicas in (("student", 2), ("teacher", 2)):
            resources = groups[role]["template"]["spec"]["containers"][0]["resources"]
            assert resources["requests"]["nvidia.com/gpu"] == "1"
            assert resources["limits"]["nvidia.com/gpu"] == "1"
            assert groups[role]["rayStartParams"]["num-gpus"] == "1"
            assert groups[role]["replicas"] == replicas
        head = cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in head["limits"]
    cpu_only = raycluster(_spec(), "img:1")["spec"]["workerGroupSpecs"]
    for group in cpu_only:
        assert "num-gpus" not in group["rayStartParams"]
        assert "nvidia.com/gpu" not in group["template"]["spec"]["containers"][0]["resources"]["limits"]


ACCELERATOR_CHILD = textwrap.dedent("""
    import os, socket, sys
    import torch, torch.distributed as dist
    from specs import parse_spec
    from trainers.engine import DistillEngine, set_distributed_env
    from trainers.models import MLP

    if sys.argv[1] == "loaded":  # DeepSpeed already loaded, with the accelerator the env forced
        from deepspeed.accelerator import get_accelerator
        print("before:", get_accelerator().device_name())
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    set_distributed_env(0, 0, 1, 1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    spec = parse_spec({"name": "acc", "data": {"kind": "digits"},
                       "teacher": {"kind": "train", "model": {"kind": "mlp", "hidden": [8]}},
                       "student": {"model": {"kind": "mlp", "hidden": [8]}}})
    engine = DistillEngine(MLP(64, [8], 10), spec, lr=0.01, micro_batch=4, weight_decay=0.0,
                           grad_clip=1.0, world_size=1)
    parts = engine.train_step(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)),
                              torch.randn(4, 10), 2.0, 0.5)
    from deepspeed.accelerator import get_accelerator
    print("device:", engine.device, "accelerator:", get_accelerator().device_name(),
          "trained:", parts is not None)
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("when", ["fresh", "loaded"])
def test_a_cpu_engine_uses_deepspeeds_cpu_accelerator_whatever_ds_accelerator_says(when):
    """With this CUDA build of torch and no GPU DeepSpeed picks its CPU accelerator by itself;
    `DS_ACCELERATOR=cuda` would make it pick CUDA and fail inside `deepspeed.initialize`. The
    engine follows the device decision instead, also when DeepSpeed was loaded before it."""
    env = {**os.environ, "DS_ACCELERATOR": "cuda"}
    result = subprocess.run([sys.executable, "-c", ACCELERATOR_CHILD, when], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    if when == "loaded":
        assert "before: cuda" in result.stdout
    assert "device: cpu accelerator: cpu trained: True" in result.stdout
