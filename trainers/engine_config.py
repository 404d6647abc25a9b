"""The one place that translates a job spec into engine configs: DeepSpeed and Ray Train.

No other module knows DeepSpeed config keys or builds Ray Train config objects.
"""

from __future__ import annotations

from pathlib import Path

from specs.job import JobSpec


# DeepSpeed's default bucket for reducing and gathering gradients under ZeRO, in elements
DEEPSPEED_BUCKET_ELEMENTS = 500_000_000


def deepspeed_config(
    spec: JobSpec, *, micro_batch: int, world_size: int, lr: float, weight_decay: float,
    grad_clip: float, params: int | None = None,
) -> dict:
    """DeepSpeed config for one model (teacher or student) trained by `world_size` workers;
    `params`, the number of trained parameters, sizes ZeRO's gradient buckets."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        # torch_adam: DeepSpeed's own CPU Adam JIT-compiles a C++ op on first use.
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "weight_decay": weight_decay, "torch_adam": True},
        },
        "bf16": {"enabled": spec.precision == "bf16"},
        # loss_scale 0: dynamic loss scaling; a step whose scaled gradients overflow is skipped
        # and the scale halved (after `hysteresis` overflows), then raised again every
        # `loss_scale_window` good steps
        "fp16": {"enabled": spec.precision == "fp16", "loss_scale": 0},
        # bf16 weights: floating buffers (BatchNorm's running statistics) in bf16 too, or a
        # BatchNorm gets bf16 inputs and fp32 statistics and refuses them
        **({"data_types": {"buffer_dtype": "bf16"}} if spec.precision == "bf16" else {}),
        "torch_autocast": {"enabled": spec.precision == "bf16_autocast", "dtype": "bfloat16"},
        "zero_optimization": zero_config(spec, params),
        "gradient_clipping": grad_clip,
        "steps_per_print": 1 << 30,  # progress is ours to print
        "wall_clock_breakdown": False,
    }


def zero_config(spec: JobSpec, params: int | None = None) -> dict:
    """DeepSpeed's `zero_optimization` section.

    The gradient buckets are no larger than the model: DeepSpeed 0.19's ZeRO 1 and 2 allocate a
    new bucket of `reduce_bucket_size` elements before every step's backward pass, 500M float32
    (2 GB) by default, and with torch's deterministic algorithms on, torch fills every new
    tensor (2 GB per step). Measured here on two gloo workers, a 1.1M-parameter LeNet's bf16
    autocast step of 128 images: 853 ms with the default bucket, 71 ms with one of the model's
    size (64 ms with neither the big bucket nor the fill)."""
    ds = spec.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage > 0 and params:
        bucket = int(min(DEEPSPEED_BUCKET_ELEMENTS, max(params, 1)))
        zero["reduce_bucket_size"] = bucket
        zero["allgather_bucket_size"] = bucket
    if ds.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = ds.param_persistence_threshold
    if ds.offload_optimizer != "none":
        # pinned host memory makes the GPU<->host copies of the offloaded state asynchronous;
        # on CPU workers there is no such copy
        zero["offload_optimizer"] = {"device": ds.offload_optimizer,
                                     "pin_memory": bool(spec.resources.student_gpus)}
    return zero


def ray_train_configs(spec: JobSpec, run_dir: Path, stage: str):
    """(ScalingConfig, RunConfig, TorchConfig) for one stage's worker group: on GPUs each
    worker gets one and the group talks NCCL, otherwise gloo."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from trainers.device import collective_backend

    gpus = spec.resources.student_gpus
    resources = {"CPU": spec.resources.worker_cpus(stage), **({"GPU": gpus} if gpus else {})}
    scaling = ScalingConfig(
        num_workers=spec.resources.student_workers,
        use_gpu=gpus > 0,
        resources_per_worker=resources,
        label_selector=dict(spec.resources.student_labels) or None,
    )
    run = RunConfig(
        name=stage,
        storage_path=str((run_dir / "ray_train").resolve()),
        failure_config=FailureConfig(max_failures=spec.resources.worker_max_failures),
    )
    return scaling, run, TorchConfig(backend=collective_backend(gpus > 0))


def replica_options(spec: JobSpec) -> dict:
    """Ray actor options for one teacher replica."""
    options = {
        "num_cpus": spec.resources.teacher_cpus,
        "max_restarts": spec.resources.teacher_max_restarts,
        # no retries on the same replica: the client sends a failed request to another one
        "max_task_retries": 0,
    }
    if spec.resources.teacher_gpus:  # Ray shows the replica only its GPU (CUDA_VISIBLE_DEVICES)
        options["num_gpus"] = spec.resources.teacher_gpus
    if spec.resources.teacher_labels:
        options["label_selector"] = dict(spec.resources.teacher_labels)
    return options
