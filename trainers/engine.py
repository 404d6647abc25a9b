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

Under ZeRO 3 the module parameters are partitioned too: between steps each rank holds a flat
slice of every parameter (`param.ds_tensor`, 1/world of it; parameters under
`deepspeed.param_persistence_threshold` elements also stay whole in `param.data`), and its slice
of the fp32 master copy, reached through DeepSpeed's `safe_get_local_fp32_param` /
`safe_set_local_fp32_param`. Each rank masks its own slices with the matching slice of the masks.
The pruning threshold is then found from those slices alone (`sharded_magnitude_masks`: counts
are all-reduced, weights never leave their rank) and the mask slices are all-gathered, one byte
per weight, so that every rank holds the full masks for the gradient hooks.

All of these are local operations: no collective per step.

The device is decided once, here (trainers/device.py): inputs, teacher logits, masks and the loss
live on `engine.device`, and the tensors of every collective too (NCCL takes CUDA tensors only).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from specs.job import TOKEN_LOSSES, JobSpec
from trainers.compression import prune_masks
from trainers.device import deepspeed_accelerator_name, prepare_deepspeed, student_device
from trainers.engine_config import deepspeed_config
from trainers.features import FeatureTap, feature_loss
from trainers.kd_loss import kd_loss
from trainers.pruning import prunable_parameters, sharded_magnitude_masks

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # module dtype; others keep fp32
# torch 2.13 renamed all_gather_into_tensor (a deprecation warning on every call); older torch
# (the GPU machines' images) has only the old name
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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
        device: torch.device | None = None,
    ):
        """With feature KD the model carries its projections under `kd_proj` already, and
        `teacher_feature_shapes` are the shapes of the teacher features that arrive per step.
        Channel pruning needs the shape of one input sample and the number of classes: the
        model's channel groups are traced once, here, from a batch of zeros of that shape.
        `device` defaults to the spec's decision (`trainers.device.student_device`)."""
        self.device = device if device is not None else student_device(spec)
        prepare_deepspeed(self.device)
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
        self.zero3 = spec.deepspeed.zero_stage == 3
        config = deepspeed_config(
            spec, micro_batch=micro_batch, world_size=world_size, lr=lr,
            weight_decay=weight_decay, grad_clip=grad_clip,
            params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        )
        # DeepSpeed places the model on its accelerator's device number `device_rank` (LOCAL_RANK
        # otherwise, which need not be this worker's GPU index)
        args = SimpleNamespace(device_rank=self.device.index) if self.device.type == "cuda" else None
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            args=args, model=model, model_parameters=model.parameters(), config=config
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
        self.dtype = DTYPES.get(spec.precision, torch.float32)
        if self.channel_groups is not None:  # every tensor a pruned channel touches, BatchNorm too
            from trainers.structured import pruned_parameters

            params = dict(self.module.named_parameters())
            self.prunable = {n: params[n] for n in pruned_parameters(self.channel_groups)}
        elif spec.language_model and pruning.granularity == "channel":
            from trainers.lm_pruning import structured_parameters  # neurons and heads, whole

            self.prunable = structured_parameters(self.module)
        elif spec.language_model:  # the blocks' projections (trainers/lm_pruning.py)
            from trainers.lm_pruning import prunable_projections

            self.prunable = prunable_projections(self.module, spec.pruning)
        else:
            self.prunable = prunable_parameters(self.module, spec.pruning)
        # a language model's token-level loss (trainers/lm_losses.py); None: image classes
        self.token_loss = spec.distillation if isinstance(spec.distillation, TOKEN_LOSSES) else None
        self.masks: dict[str, torch.Tensor] = {}  # name -> full bool mask on self.device
        self._mask_cache: dict[tuple, torch.Tensor] = {}
        self.nonfinite_steps = 0
        self.overflow_steps = 0  # fp16 steps DeepSpeed's loss scaler skipped
        # run after every optimizer step, once the masks are enforced (e.g. weight sharing's snap
        # to the cluster means); each rank runs the same hooks, so a hook may be collective
        self.after_step: list[Callable[[], None]] = []
        self._hooks_installed = False
        self._unfused_masters = _unfused_master_copies(self.optimizer)
        pairs = spec.distillation.features if teacher_feature_shapes else []
        self.teacher_feature_shapes = list(teacher_feature_shapes or [])
        self.feature_weights = [p.weight for p in pairs]
        self.tap = FeatureTap(self.module, [p.student for p in pairs]) if pairs else None

    def _partition(self, param: torch.Tensor) -> tuple[int, int, int]:
        """ZeRO 3: (start, length, padded length) of this rank's flat slice of `param`; DeepSpeed
        gives rank r elements [r * p, (r + 1) * p) of the flattened parameter, p = ceil(numel /
        world), the last rank's slice padded with zeros past the end."""
        padded = param.ds_tensor.ds_numel
        start = dist.get_rank(group=param.ds_process_group) * padded
        return start, max(0, min(padded, param.ds_numel - start)), padded

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
        if self.token_loss is not None:  # a language model: (B, L) tokens, (B, L, V) logits
            loss, parts = self._token_loss(x, y, teacher_logits)
        else:
            loss, parts = self._class_loss(x, y, teacher_logits, temperature, alpha)
        if self.tap is not None:
            student_features = self.tap.take()
            if teacher_features is not None:
                teacher_features = [t.to(self.device, non_blocking=True) for t in teacher_features]
                feat, parts["feature"] = feature_loss(
                    student_features, teacher_features, self.module.kd_proj, self.feature_weights
                )
                loss = loss + feat
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)  # (1,) on the device
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
        if not self.engine.was_step_applied():  # fp16: the loss scaler found inf/NaN gradients
            # and skipped the update on every rank (its overflow flag is all-reduced); the scale
            # is lowered and training goes on, as DeepSpeed intends
            self.overflow_steps += 1
        self.enforce_masks()
        for hook in self.after_step:
            hook()
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}

    def _class_loss(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None,
                    temperature: float, alpha: float) -> tuple[torch.Tensor, dict]:
        """Image classes: (B, ...) inputs, (B,) labels, (B, C) teacher logits or None."""
        x = x.to(self.device, self.dtype, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        out = self.engine(x)  # (B, C)
        if teacher_logits is None:
            loss = nn.functional.cross_entropy(out.float(), y)
            return loss, {"ce": loss.detach()}
        teacher_logits = teacher_logits.to(self.device, non_blocking=True)
        return kd_loss(out, teacher_logits, y, temperature, alpha)

    def _token_loss(self, x: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor,
                    teacher: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, dict]:
        """A causal LM's loss over the non-padding tokens: `x` is (input ids (B, L), attention
        mask (B, L)), `labels` (B, L) next-token ids with -100 where there is no target
        (`next_token_labels`), `teacher` the teacher's top-k per token (ids (B, L, k),
        log-probabilities at T (B, L, k), rest (B, L)), or None while the teacher itself trains
        (next-token cross-entropy). The divergence and temperature are the spec's token loss."""
        from trainers.lm_losses import IGNORE_INDEX, lm_topk_kd_loss

        ids, mask = (t.to(self.device, non_blocking=True) for t in x)
        labels = labels.to(self.device, non_blocking=True)
        logits = self.engine(input_ids=ids, attention_mask=mask).logits  # (B, L, V)
        if teacher is None:
            # a sum over the targets, divided by their count (at least 1: a block of padding
            # alone gives 0, not 0 / 0)
            loss = nn.functional.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                reduction="sum") / (labels != IGNORE_INDEX).sum().clamp_min(1)
            return loss, {"ce": loss.detach()}
        t_ids, t_logprobs, t_rest = (t.to(self.device, non_blocking=True) for t in teacher)
        return lm_topk_kd_loss(logits, t_ids, t_logprobs, labels, self.token_loss,
                               self.spec.logits.tokens.missing_mass, t_rest)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) inputs on any device -> (B, C) float32 logits on the CPU."""
        self.module.eval()
        try:
            return self.module(x.to(self.device, self.dtype)).float().cpu()
        finally:
            self.module.train()
            if self.tap is not None:
                self.tap.take()  # drop the features the evaluation captured

    # -------------------------------------------------------------------------------- pruning

    def full_fp32_weights(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Full fp32 copies of the named parameters (all if None), on the CPU. Collective under
        ZeRO (every rank calls it): under ZeRO 3 it gathers whole parameters, which only the
        per-phase checkpoint and channel pruning ask for."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.module.named_parameters():
            if names is not None and name not in names:
                continue
            full = safe_get_full_fp32_param(p)
            if full is None and id(p) in self._unfused_masters:
                full = self._unfused_masters[id(p)]
            shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape  # ZeRO 3: p is a stub
            out[name] = (full if full is not None else p.detach()).float().cpu().clone().reshape(shape)
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

    @torch.no_grad()
    def load_fp32_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Set every parameter's module copy and fp32 master copy (or this rank's slices of
        them) from full fp32 weights, e.g. a checkpoint's model.safetensors, and the buffers it
        holds. Collective under ZeRO 3."""
        from deepspeed.utils import safe_set_full_fp32_param

        for name, p in self.module.named_parameters():
            value = weights[name].to(self.device, torch.float32)
            if self.zero3:
                safe_set_full_fp32_param(p, value)  # takes this rank's slice of the master copy
                start, length, _ = self._partition(p)
                p.ds_tensor[:length].copy_(value.flatten()[start : start + length])
                if p.data.numel() == p.ds_numel:  # a persistent (whole) parameter
                    p.data.copy_(value.view(p.ds_shape))
                continue
            p.copy_(value.view(p.shape))
            frag = self.master_fragment(p)
            if frag is not None:
                hp, start, numel = frag
                hp.copy_(value.flatten()[start : start + numel].view(hp.shape))
        for name, b in self.module.named_buffers():  # BatchNorm statistics, when stored
            if name in weights:
                b.copy_(weights[name].to(b.device, b.dtype))
        self.enforce_masks()

    def prune_to(self, sparsity: float) -> float | None:
        """Recompute global masks at `sparsity` from the fp32 master weights; returns the threshold.

        Every rank computes the same masks from the same weights; rank 0's are broadcast anyway so
        that the masks are identical by construction, not by floating-point luck. Under ZeRO 3
        each rank scores only its own slices (`_prune_shards`).
        """
        pruning = self.spec.pruning
        if self.zero3 and pruning.granularity == "weight":
            return self._prune_shards(sparsity)
        weights = self.full_fp32_weights(list(self.prunable))
        if pruning.granularity == "channel" and self.spec.language_model:
            # MLP neurons and attention groups of every block (trainers/lm_pruning.py), scored
            # on the fp32 master weights; units pruned before score 0 and stay pruned
            from trainers.lm_pruning import plan_structured, round_head_sparsity, structured_masks

            plan = plan_structured(self.module, mlp_sparsity=sparsity,
                                   head_sparsity=round_head_sparsity(pruning, sparsity),
                                   norm=pruning.norm, weights=weights)
            masks, threshold = structured_masks(self.module, plan), None
        elif pruning.granularity == "channel" and self.channel_groups is None:
            raise RuntimeError("channel pruning needs the engine's `input_shape`")
        else:
            # the same function `trainers.compression.prune_` applies to a plain module
            masks, threshold = prune_masks(weights, pruning, sparsity, self.masks or None,
                                           self.channel_groups)
        if dist.is_initialized():
            for name in masks:
                flat = masks[name].to(self.device, torch.uint8)
                dist.broadcast(flat, src=0)
                masks[name] = flat.bool()
        self.set_masks(masks)
        return threshold

    def _prune_shards(self, sparsity: float) -> float:
        """ZeRO 3: global magnitude masks from each rank's slices of the fp32 master weights.

        The threshold comes from all-reduced counts (`sharded_magnitude_masks`); no weight leaves
        its rank. Each rank then holds the masks of its own slices, and the full masks are
        all-gathered as bytes, one per weight (the gradient hooks and whole persistent
        parameters need them).
        """
        from deepspeed.utils import safe_get_local_fp32_param

        shards, offsets, previous, offset = [], [], [], 0
        for name, p in self.prunable.items():
            start, length, _ = self._partition(p)
            shards.append(safe_get_local_fp32_param(p)[:length])  # (length,) fp32
            offsets.append(offset + start)
            if self.masks:
                previous.append(self.masks[name].flatten()[start : start + length])
            offset += p.ds_numel
        local, threshold = sharded_magnitude_masks(
            shards, offsets, sparsity, previous or None, device=self.device)
        masks = {}
        for (name, p), piece in zip(self.prunable.items(), local):
            _, length, padded = self._partition(p)
            mine = torch.zeros(padded, dtype=torch.uint8, device=self.device)
            mine[:length] = piece
            world = dist.get_world_size(group=p.ds_process_group)
            full = torch.empty(padded * world, dtype=torch.uint8, device=self.device)
            _all_gather_single(full, mine, group=p.ds_process_group)
            masks[name] = full[: p.ds_numel].view(p.ds_shape).bool()
        self.set_masks(masks)
        return threshold

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = {name: m.to(self.device).bool() for name, m in masks.items()}
        self._mask_cache = {}  # the masks as 0/1 tensors, per dtype and fragment
        if not self._hooks_installed:
            for name, p in self.prunable.items():
                # reads self.masks at call time, so later rounds' masks apply without new hooks
                p.register_hook(lambda grad, name=name: self._mask_grad(name, grad))
            self._hooks_installed = True
        self.enforce_masks()

    def _mask_as(self, name: str, dtype: torch.dtype, start: int = 0, numel: int | None = None,
                 shape: torch.Size | None = None, device: torch.device | None = None,
                 ) -> torch.Tensor:
        """Mask `name` (or the flat slice of it that a master fragment covers) as 0/1 values of
        `dtype` on `device` (the engine's, or the host's for a master copy that ZeRO-Offload
        keeps there): converted once per round, not on every step."""
        device = device or self.device
        key = (name, dtype, start, numel, str(device))
        cached = self._mask_cache.get(key)
        if cached is None:
            mask = self.masks[name]
            if numel is not None:
                mask = mask.flatten()[start : start + numel].view(shape)
            cached = self._mask_cache[key] = mask.to(device, dtype)
        return cached

    def _mask_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad * self._mask_as(name, grad.dtype) if name in self.masks else grad

    def _partition_mask(self, name: str, dtype: torch.dtype, p: torch.Tensor) -> torch.Tensor:
        """ZeRO 3: this rank's (padded length,) slice of mask `name`, zero over the padding."""
        key = (name, dtype, "partition")
        cached = self._mask_cache.get(key)
        if cached is None:
            start, length, padded = self._partition(p)
            cached = torch.zeros(padded, dtype=dtype, device=self.device)
            cached[:length] = self.masks[name].flatten()[start : start + length].to(dtype)
            self._mask_cache[key] = cached
        return cached

    @torch.no_grad()
    def enforce_masks(self) -> None:
        if self.zero3:
            self._enforce_partition_masks()
            return
        for name in self.masks:
            p = self.prunable[name]
            p.mul_(self._mask_as(name, p.dtype))
            frag = self.master_fragment(p)
            if frag is not None:
                hp, start, numel = frag
                hp.mul_(self._mask_as(name, hp.dtype, start, numel, hp.shape, hp.device))

    def _enforce_partition_masks(self) -> None:
        """ZeRO 3: mask this rank's slices: the module's (`ds_tensor`, and `data` where the
        parameter persists whole) and the fp32 master copy's. DeepSpeed's local getter returns
        the master slice itself, or a copy on the device when the optimizer is offloaded; the
        setter writes it back either way."""
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        for name in self.masks:
            p = self.prunable[name]
            p.ds_tensor.mul_(self._partition_mask(name, p.ds_tensor.dtype, p))
            if p.data.numel() == p.ds_numel:  # persistent: whole on every rank
                p.data.mul_(self._mask_as(name, p.dtype))
            hp = safe_get_local_fp32_param(p)  # (padded length,) fp32
            hp.mul_(self._partition_mask(name, hp.dtype, p))
            safe_set_local_fp32_param(p, hp)

    @torch.no_grad()
    def masked_nonzero(self) -> tuple[int, int]:
        """Nonzero pruned entries in (module params, this rank's fp32 master fragments); under
        ZeRO 3 in this rank's slices of both (and in whole persistent parameters)."""
        if self.zero3:
            return self._partition_masked_nonzero()
        lp = hp_count = 0
        for name, mask in self.masks.items():
            p = self.prunable[name]
            lp += int(torch.count_nonzero(p.detach()[~mask]))
            frag = self.master_fragment(p)
            if frag is not None:
                hp, start, numel = frag
                pruned = ~mask.flatten()[start : start + numel].to(hp.device)
                hp_count += int(torch.count_nonzero(hp.reshape(-1)[pruned]))
        return lp, hp_count

    def _partition_masked_nonzero(self) -> tuple[int, int]:
        from deepspeed.utils import safe_get_local_fp32_param

        lp = hp_count = 0
        for name, mask in self.masks.items():
            p = self.prunable[name]
            start, length, _ = self._partition(p)
            pruned = ~mask.flatten()[start : start + length]
            lp += int(torch.count_nonzero(p.ds_tensor[:length][pruned]))
            if p.data.numel() == p.ds_numel:
                lp += int(torch.count_nonzero(p.data[~mask]))
            hp = safe_get_local_fp32_param(p)[:length]
            hp_count += int(torch.count_nonzero(hp[pruned]))
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


def set_distributed_env(
    rank: int, local_rank: int, world_size: int, local_world_size: int,
    device: torch.device | None = None,
) -> None:
    """Env vars DeepSpeed reads before it trusts an existing process group.

    Ray Train has already initialised torch.distributed (gloo, or NCCL on GPUs); without all five
    of these DeepSpeed falls back to MPI discovery. MASTER_ADDR/PORT are not used to connect
    again. On a GPU, LOCAL_RANK is the worker's CUDA device index: ZeRO 3 places its buffers on
    `cuda:<LOCAL_RANK>`, and Ray Train's local rank need not be the index of the GPU it gave.
    """
    os.environ["RANK"] = str(rank)
    on_gpu = device is not None and device.type == "cuda"
    os.environ["LOCAL_RANK"] = str(device.index if on_gpu else local_rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    # the engine checks DeepSpeed's choice (trainers/device.py); this decides it before import
    os.environ["DS_ACCELERATOR"] = deepspeed_accelerator_name(device or torch.device("cpu"))
