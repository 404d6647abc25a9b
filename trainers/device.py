"""The one device decision: CPU or CUDA, for the student workers and for the teacher replicas.

The spec asks for GPUs (`resources.student_gpus` per worker, `resources.teacher_gpus` per
replica); Ray hands each worker or replica its GPU (it sets `CUDA_VISIBLE_DEVICES`, and Ray
Train makes the worker's GPU the current CUDA device before the training function runs). The
functions here turn that into a `torch.device` once; the engine and the teacher server keep it
and everything else asks them. No other module picks a device or calls `.cuda()`.

The same decision fixes the collective backend (NCCL on CUDA, gloo on CPU) and DeepSpeed's
accelerator. DeepSpeed picks its accelerator once per process, on first use: CUDA when a GPU is
visible, else its CPU accelerator (with this CUDA build of torch and no GPU it logs "Setting
accelerator to CPU"); `DS_ACCELERATOR` forces a choice, and `DS_ACCELERATOR=cuda` without a GPU
fails only later, inside `deepspeed.initialize`. So the variable is set here from the decision,
whatever the environment said, and checked once DeepSpeed is loaded.
"""

from __future__ import annotations

import os

import torch

from specs.job import JobSpec


class DeviceError(RuntimeError):
    """A GPU was asked for, but this process sees none."""


def cuda_device_count() -> int:
    """GPUs this process can use (0 on a machine without CUDA, or with the CPU build of torch)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _pick(gpus: float, role: str, field: str) -> torch.device:
    if gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"`resources.{field}` is {gpus:g} but this {role} sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch "
            f"{torch.__version__} built for CUDA {torch.version.cuda})"
        )
    # Ray Train has made the worker's own GPU current; a replica sees only its GPU (index 0)
    return torch.device("cuda", torch.cuda.current_device())


def student_device(spec: JobSpec) -> torch.device:
    """Where a Ray Train worker (teacher training, student distillation) trains."""
    return _pick(spec.resources.student_gpus, "worker", "student_gpus")


def teacher_device(spec: JobSpec) -> torch.device:
    """Where a teacher replica (pool actor or logit-cache actor) runs its forward."""
    return _pick(spec.resources.teacher_gpus, "teacher replica", "teacher_gpus")


def collective_backend(uses_gpus: bool) -> str:
    """torch.distributed backend for the worker group: NCCL between GPUs, gloo between CPUs."""
    return "nccl" if uses_gpus else "gloo"


def deepspeed_accelerator_name(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def prepare_deepspeed(device: torch.device) -> None:
    """Make DeepSpeed use the accelerator of `device`; call before `import deepspeed`.

    Before DeepSpeed is loaded, `DS_ACCELERATOR` decides. If it was loaded earlier in this
    process with another accelerator (a test process, a library that imported it first), the
    accelerator object is replaced through DeepSpeed's `set_accelerator`, before any engine
    exists.
    """
    name = deepspeed_accelerator_name(device)
    os.environ["DS_ACCELERATOR"] = name
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() != name:  # chosen before this process's decision
        if name == "cuda":
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
        else:
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
        set_accelerator(Accelerator())
    chosen = get_accelerator().device_name()
    if chosen != name:  # never train on a device other than the one decided
        raise DeviceError(f"DeepSpeed chose its {chosen!r} accelerator for a {device} engine")
