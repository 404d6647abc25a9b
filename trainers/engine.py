"""A DeepSpeed engine around one model, with global pruning masks kept in force.

Under bf16 (and under ZeRO even in fp32 or bf16_autocast) DeepSpeed keeps two copies of every
weight: the module parameter that the forward pass uses, and an fp32 "master" copy, possibly
partitioned across ranks, that the optimizer updates and copies back after each step. Zeroing only
the module parameter is undone by the next step, so the masks are applied to both copies:

* gradients of pruned weights are zeroed by a tensor hook before DeepSpeed reduces them;
* after every optimizer step each rank zeroes its own fragment of the fp32 master copy and the
  module parameter. Under ZeRO 1-2 (and DeepSpeed's fused bf16 optimizer) the fragment is found
  through `param._hp_mapping`, the mapping DeepSpeed's own `safe_get_full_fp32_param` uses; under
  ZeRO 0 with bf16, DeepSpeed's unfused optimizer keeps whole fp32 copies in `fp32_groups`.

Both are local operations: no collective per step.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from specs.job import JobSpec
from trainers.engine_config import deepspeed_config
from trainers.features import FeatureTap, feature_loss
from trainers.kd_loss import kd_loss
from trainers.pruning import GlobalMagnitudePruner, prunable_parameters


class NonFiniteLossError(RuntimeError):
    """More NaN/inf losses than `deepspeed.max_nonfinite_steps` allows."""


def _unfused_master_copies(optimizer) -> dict[int, torch.Tensor]:
    """id(module param) -> its fp32 master copy in DeepSpeed's unfused optimizer (ZeRO 0, bf16)."""
    lp_groups = getattr(optimizer, "fp16_groups", None)
    hp_groups = getattr(optimizer, "fp32_groups", None)
    if not lp_groups or not hp_groups:
        return {}
    return {
        id(lp): hp
        for lp_group, hp_group in zip(lp_groups, hp_groups)
        for lp, hp in zip(lp_group, hp_group)
        if hp is not lp and hp.shape == lp.shape and not hasattr(lp, "_hp_mapping")
    }


class DistillEngine:
    """Trains one model with DeepSpeed; `teacher_logits=None` gives plain cross-entropy."""

    def __init__(
        self, model: nn.Module, spec: JobSpec, *, lr: float, micro_batch: int,
        weight_decay: float, grad_clip: float, world_size: int,
        teacher_feature_shapes: list[tuple] | None = None,
        input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
    ):
        """With feature KD the model carries its projections under `kd_proj` already, and
        `teacher_feature_shapes` are the shapes of the teacher features that arrive per step.
        Channel pruning needs the shape of one input sample and the number of classes: the
        model's channel groups are traced once, here, from a batch of zeros of that shape."""
        import deepspeed  # heavy; imported only inside workers

        _no_shared_memory_comm_op()
        self.spec = spec
        self.channel_groups = None
        pruning = spec.pruning
        if pruning.enabled and pruning.granularity == "channel" and input_shape is not None:
            from trainers.structured import channel_groups

            # before DeepSpeed casts or moves the model: traced in fp32 on its own device
            param = next(model.parameters())
            self.channel_groups = channel_groups(
                model, torch.zeros(2, *input_shape, dtype=param.dtype, device=param.device),
                num_classes, include=list(pruning.selection.include),
                exclude=list(pruning.selection.exclude),
            )
        config = deepspeed_config(
            spec, micro_batch=micro_batch, world_size=world_size, lr=lr,
            weight_decay=weight_decay, grad_clip=grad_clip,
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config
        )
        self.engine.checkpoint_engine = _weights_only_checkpoint_engine(self.engine)
        self.world_size = world_size
        if world_size == 1 and spec.deepspeed.zero_stage == 0:
            # Averaging over one rank is the identity, but DeepSpeed still flattens every
            # gradient into buckets, all-reduces and copies them back: 0.4-0.9 ms of a ~4 ms step
            # here (bench/step_profile.py). ZeRO 1-2 need that pass to fill their partitions.
            self.engine.enable_backward_allreduce = False
        self.module: nn.Module = self.engine.module
        # the module's own dtype; under bf16_autocast it stays fp32 and DeepSpeed's forward casts
        self.dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float32
        if self.channel_groups is not None:  # every tensor a pruned channel touches, BatchNorm too
            from trainers.structured import pruned_parameters

            params = dict(self.module.named_parameters())
            self.prunable = {n: params[n] for n in pruned_parameters(self.channel_groups)}
        else:
            self.prunable = prunable_parameters(self.module, spec.pruning)
        self.masks: dict[str, torch.Tensor] = {}
        self._mask_cache: dict[tuple, torch.Tensor] = {}
        self.nonfinite_steps = 0
        # run after every optimizer step, once the masks are enforced (e.g. weight sharing's snap
        # to the cluster means); each rank runs the same hooks, so a hook may be collective
        self.after_step: list[Callable[[], None]] = []
        self._hooks_installed = False
        self._unfused_masters = _unfused_master_copies(self.optimizer)
        pairs = spec.distillation.features if teacher_feature_shapes else []
        self.teacher_feature_shapes = list(teacher_feature_shapes or [])
        self.feature_weights = [p.weight for p in pairs]
        self.tap = FeatureTap(self.module, [p.student for p in pairs]) if pairs else None

    def master_fragment(self, param: torch.Tensor):
        """(fp32 master fragment, start, numel) held by this rank, or None if `param` is its own
        master (fp32 without ZeRO) or, with partitioned masters, this rank holds none of it."""
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:
            address = mapping.lp_fragment_address
            return mapping.get_hp_fragment(), address.start, address.numel
        master = self._unfused_masters.get(id(param))
        if master is not None:
            return master.data, 0, master.numel()
        return None

    @property
    def masters_partitioned(self) -> bool:
        """Whether DeepSpeed splits the fp32 master copies across ranks (ZeRO 1-2 and its bf16
        optimizer link each parameter to its rank's fragment, or to none): a sum over a whole
        weight's master then needs an all-reduce."""
        return any(hasattr(p, "_hp_mapping") for p in self.module.parameters())

    # ------------------------------------------------------------------------------- training

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None,
        temperature: float, alpha: float, teacher_features: list[torch.Tensor] | None = None,
    ) -> dict[str, float] | None:
        """One optimizer step; returns the loss parts, or None when the step was skipped.

        bf16 has no loss scaler and so no overflow check: a non-finite loss on any rank skips the
        step on every rank (the flag is all-reduced, so all ranks agree and no collective is left
        unmatched), and too many such steps fail the job rather than train on garbage.
        """
        out = self.engine(x.to(self.dtype))  # (B, C)
        if teacher_logits is None:
            loss = nn.functional.cross_entropy(out.float(), y)
            parts = {"ce": loss.detach()}
        else:
            loss, parts = kd_loss(out, teacher_logits, y, temperature, alpha)
        if self.tap is not None:
            student_features = self.tap.take()
            if teacher_features is not None:
                feat, parts["feature"] = feature_loss(
                    student_features, teacher_features, self.module.kd_proj, self.feature_weights
                )
                loss = loss + feat
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0])
        if self.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            self.nonfinite_steps += 1
            if self.nonfinite_steps > self.spec.deepspeed.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_steps} steps with a NaN/inf loss, more than "
                    f"`deepspeed.max_nonfinite_steps` = {self.spec.deepspeed.max_nonfinite_steps}"
                )
            return None
        self.engine.backward(loss)
        self.engine.step()
        self.enforce_masks()
        for hook in self.after_step:
            hook()
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        try:
            return self.module(x.to(self.dtype)).float()
        finally:
            self.module.train()
            if self.tap is not None:
                self.tap.take()  # drop the features the evaluation captured

    # -------------------------------------------------------------------------------- pruning

    def full_fp32_weights(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Full fp32 copies of the named parameters (all if None). Collective under ZeRO."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.module.named_parameters():
            if names is not None and name not in names:
                continue
            full = safe_get_full_fp32_param(p)
            if full is None and id(p) in self._unfused_masters:
                full = self._unfused_masters[id(p)]
            out[name] = (full if full is not None else p.detach()).float().clone().reshape(p.shape)
        return out

    @torch.no_grad()
    def average_buffers(self) -> None:
        """Average the floating buffers over the workers (BatchNorm's running statistics).

        Each worker updates them from its own share of the data and nothing in DeepSpeed's step
        syncs them, so without this every rank would evaluate, and rank 0 would save, statistics
        of half the data. Collective: every rank calls it, at the end of a phase."""
        if self.world_size == 1:
            return
        for b in self.module.buffers():
            if b.is_floating_point():
                total = b.detach().float().clone()
                dist.all_reduce(total)
                b.copy_(total / self.world_size)

    def buffers_fp32(self) -> dict[str, torch.Tensor]:
        """The module's buffers (BatchNorm's running statistics, ...), floating ones as fp32:
        with the fp32 weights they make the full state dict a checkpoint stores."""
        return {name: (b.float() if b.is_floating_point() else b).detach().clone().cpu()
                for name, b in self.module.named_buffers()}

    def prune_to(self, sparsity: float) -> float | None:
        """Recompute global masks at `sparsity` from the fp32 master weights; returns the threshold.

        Every rank computes the same masks from the same weights; rank 0's are broadcast anyway so
        that the masks are identical by construction, not by floating-point luck.
        """
        weights = self.full_fp32_weights(list(self.prunable))
        pruning = self.spec.pruning
        if pruning.granularity == "channel":
            from trainers.structured import channel_masks

            if self.channel_groups is None:
                raise RuntimeError("channel pruning needs the engine's `input_shape`")
            masks, _ = channel_masks(
                weights, self.channel_groups, sparsity, norm=pruning.norm,
                scope=pruning.scope, previous=self.masks or None,
            )
            threshold = None  # channels, not weights: no single magnitude
        else:
            masks, threshold = GlobalMagnitudePruner.compute_masks(
                weights, sparsity, self.masks or None
            )
        if dist.is_initialized():
            for name in masks:
                flat = masks[name].to(torch.uint8)
                dist.broadcast(flat, src=0)
                masks[name] = flat.bool()
        self.set_masks(masks)
        return threshold

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = {name: m.bool() for name, m in masks.items()}
        self._mask_cache = {}  # the masks as 0/1 tensors, per dtype and fragment
        if not self._hooks_installed:
            for name, p in self.prunable.items():
                # reads self.masks at call time, so later rounds' masks apply without new hooks
                p.register_hook(lambda grad, name=name: self._mask_grad(name, grad))
            self._hooks_installed = True
        self.enforce_masks()

    def _mask_as(self, name: str, dtype: torch.dtype, start: int = 0, numel: int | None = None,
                 shape: torch.Size | None = None) -> torch.Tensor:
        """Mask `name` (or the flat slice of it that a master fragment covers) as 0/1 values of
        `dtype`: converted once per round, not on every step."""
        key = (name, dtype, start, numel)
        cached = self._mask_cache.get(key)
        if cached is None:
            mask = self.masks[name]
            if numel is not None:
                mask = mask.flatten()[start : start + numel].view(shape)
            cached = self._mask_cache[key] = mask.to(dtype)
        return cached

    def _mask_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad * self._mask_as(name, grad.dtype) if name in self.masks else grad

    @torch.no_grad()
    def enforce_masks(self) -> None:
        for name in self.masks:
            p = self.prunable[name]
            p.mul_(self._mask_as(name, p.dtype))
            frag = self.master_fragment(p)
            if frag is not None:
                hp, start, numel = frag
                hp.mul_(self._mask_as(name, hp.dtype, start, numel, hp.shape))

    @torch.no_grad()
    def masked_nonzero(self) -> tuple[int, int]:
        """Nonzero pruned entries in (module params, this rank's fp32 master fragments)."""
        lp = hp_count = 0
        for name, mask in self.masks.items():
            p = self.prunable[name]
            lp += int(torch.count_nonzero(p.detach()[~mask]))
            frag = self.master_fragment(p)
            if frag is not None:
                hp, start, numel = frag
                pruned = ~mask.flatten()[start : start + numel]
                hp_count += int(torch.count_nonzero(hp.reshape(-1)[pruned]))
        return lp, hp_count

    # ---------------------------------------------------------------------------- checkpoints

    def save_deepspeed(self, folder: str, tag: str) -> None:
        """DeepSpeed's own checkpoint (weights, partitioned optimizer state). Every rank calls it."""
        self.engine.save_checkpoint(folder, tag=tag, save_latest=True)

    def load_deepspeed(self, folder: str, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(
            folder, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:  # DeepSpeed returns None instead of raising when nothing was loaded
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {folder}")
        self.enforce_masks()


def _weights_only_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True`.

    DeepSpeed 0.19 reads its `.pt` files with `torch.load(weights_only=False)`, which runs any
    code a tampered file carries. Its files hold tensors, plain containers and three DeepSpeed
    types; only those are allowed here, so a resume never unpickles anything else.
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, ZeroStageEnum, fragment_address]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:  # another engine would load its own way
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(current).__name__}")
    replacement = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
    replacement.__dict__.update(current.__dict__)  # same settings (serialization format, name)
    return replacement


def _no_shared_memory_comm_op() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce op.

    DeepSpeed's torch comm backend JIT-compiles that op (about 30 s of C++ here) on its first
    initialisation, and compiles it again whenever a process's build flags differ from the cached
    build's, for `inference_all_reduce` alone, which stillhouse never calls: gloo does every
    collective. `deepspeed.ops.__compatible_ops__` is the dict DeepSpeed consults before
    building, kept in its module so that edits persist.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def set_distributed_env(rank: int, local_rank: int, world_size: int, local_world_size: int) -> None:
    """Env vars DeepSpeed reads before it trusts an existing process group.

    Ray Train has already initialised torch.distributed (gloo); without all five of these DeepSpeed
    falls back to MPI discovery. MASTER_ADDR/PORT are not used to connect again.
    """
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(local_rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
