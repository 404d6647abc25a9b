"""Pruning transformers: global magnitude over the projections, and structured pruning of MLP
neurons and attention heads that writes a smaller model.

    weights = projection_weights(model)                  # name -> weight, blocks only
    masks = prune_global_magnitude_(model, 0.5)          # one threshold over all of them

    plan = plan_structured(model, mlp_sparsity=0.5, head_sparsity=0.25)
    apply_masks_(params, structured_masks(model, plan))  # the masked full model, while training
    small = shrink(model, plan)                          # fewer neurons and heads, new config

Global magnitude pruning ranks every weight of the attention and MLP projections (GPT-2 keeps
them in transformers' `Conv1D`, weights stored (in, out); Llama-style models in `nn.Linear`) by
|w| against one threshold (trainers/pruning.py's GlobalMagnitudePruner). Embeddings and the LM
head are left out by default (they hold most of a small model's parameters and its input and
output vocabulary); norms always are.

Structured pruning removes units whole. An MLP neuron j is row j of the input projections
(GPT-2 `c_fc`; Llama `gate_proj`, `up_proj`) and column j of the output projection; zeroing it
makes its activation exactly 0 (gelu(0) = 0, silu(0) * 0 = 0), so the masked model computes what
the shrunk one does. An attention unit is one key/value group: a KV head with the query heads
that read it (n_heads / n_kv_heads of them; one head in multi-head attention); zeroing its query,
key and value rows makes its output exactly 0 (uniform attention over zero values). A Hugging
Face config holds one `intermediate_size` and one head count for all layers, so every layer keeps
the same number of neurons and of groups, the highest scoring ones in that layer (score: the L2
norm of all the unit's weights, or the L1 norm), and at least one of each. Query heads go with
their KV group, so `num_attention_heads / num_key_value_heads` stays an integer.

A job (`pruning.granularity: channel`, trainers/engine.py) plans each round on the engine's fp32
master weights and trains with `structured_masks`; the export (trainers/lm_export.py) recovers
the plan from the last masks with `plan_from_masks` and writes `shrink`'s model.

`shrink` cuts the pruned units out and writes `intermediate_size` (GPT-2: `n_inner`),
`num_attention_heads`, `num_key_value_heads` and `head_dim` into the new config. GPT-2's config
derives the head size from n_embd / n_head, so its heads cannot be cut out (only masked); its MLP
neurons can.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from trainers.hf_models import HFModelError, decoder_blocks
from trainers.pruning import GlobalMagnitudePruner, apply_masks_

# ------------------------------------------------------------------------ global magnitude


def _projection_types():
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def projection_weights(model: nn.Module, *, include_embeddings: bool = False,
                       include_lm_head: bool = False) -> dict[str, nn.Parameter]:
    """The weights of the attention and MLP projections inside the decoder blocks, by parameter
    name, in model order; with the input embeddings and the LM head when asked. A weight shared
    by two names (tied embeddings and LM head) is listed once, under its first name."""
    prefix, _ = decoder_blocks(model)
    found: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if name.startswith(prefix + ".") and isinstance(module, _projection_types()):
            found[f"{name}.weight"] = module.weight
    if include_embeddings:
        embeddings = model.get_input_embeddings()
        found.update({f"{n}.weight": m.weight for n, m in model.named_modules()
                      if m is embeddings})
    if include_lm_head:
        head = model.get_output_embeddings()
        if head is not None:
            found.update({f"{n}.weight": m.weight for n, m in model.named_modules() if m is head})
    unique, seen = {}, set()
    for name, weight in found.items():
        if id(weight) not in seen:
            seen.add(id(weight))
            unique[name] = weight
    return unique


def prunable_projections(model: nn.Module, pruning) -> dict[str, nn.Parameter]:
    """What a job prunes in a language model (`pruning` is the job spec's PruningSpec): the
    projection weights of the blocks, with the embeddings and the LM head when the spec asks
    (`pruning.embeddings`, `pruning.lm_head`), narrowed by `pruning.layers` (glob patterns over
    their module names, as for image models)."""
    from trainers.pruning import select_layers

    weights = projection_weights(model, include_embeddings=pruning.embeddings,
                                 include_lm_head=pruning.lm_head)
    modules = {name[: -len(".weight")]: name for name in weights}
    chosen = select_layers(list(modules), pruning.selection, what="projection")
    return {modules[m]: weights[modules[m]] for m in chosen}


@torch.no_grad()
def prune_global_magnitude_(model: nn.Module, sparsity: float,
                            previous: dict[str, torch.Tensor] | None = None,
                            **include: bool) -> dict[str, torch.Tensor]:
    """Zero the smallest `sparsity` share of the projection weights (one threshold across all of
    them; `include` as in `projection_weights`); returns the masks (True = kept)."""
    weights = projection_weights(model, **include)
    masks, _ = GlobalMagnitudePruner.compute_masks(dict(weights), sparsity, previous)
    apply_masks_(dict(weights), masks)
    return masks


# ------------------------------------------------------------------------------ structure


@dataclass(frozen=True)
class Slice:
    """Indices `index` along dimension `dim` of parameter `param`."""

    param: str
    dim: int
    index: tuple[int, ...]


@dataclass(frozen=True)
class Unit:
    """A neuron or a KV group: the slices of parameters that belong to it alone."""

    slices: tuple[Slice, ...]


@dataclass(frozen=True)
class LayerUnits:
    mlp: tuple[Unit, ...]  # one per MLP neuron
    attention: tuple[Unit, ...]  # one per KV group (query heads with their KV head)


def _span(start: int, length: int) -> tuple[int, ...]:
    return tuple(range(start, start + length))


def _family(model: nn.Module) -> str:
    _, blocks = decoder_blocks(model)
    block = blocks[0]
    if model.config.model_type == "gpt2":
        return "gpt2"
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
            hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
        return "llama"
    raise HFModelError(f"structured pruning knows GPT-2 and Llama-style blocks (q/k/v/o and "
                       f"gate/up/down projections), not {type(block).__name__}")


def _with_bias(slices: list[Slice], module: nn.Module, name: str,
               index: tuple[int, ...]) -> None:
    """Add the bias slice of a projection whose output dimension is being cut."""
    if getattr(module, "bias", None) is not None:
        slices.append(Slice(f"{name}.bias", 0, index))


def layer_units(model: nn.Module) -> list[LayerUnits]:
    """The prunable units of every decoder block, with the parameter slices each one owns."""
    family = _family(model)
    prefix, blocks = decoder_blocks(model)
    config = model.config
    layers = []
    for i, block in enumerate(blocks):
        p = f"{prefix}.{i}"
        if family == "gpt2":
            inner = block.mlp.c_fc.weight.shape[1]  # Conv1D weight: (in, out)
            mlp = []
            for j in range(inner):
                s = [Slice(f"{p}.mlp.c_fc.weight", 1, (j,)), Slice(f"{p}.mlp.c_proj.weight", 0, (j,))]
                _with_bias(s, block.mlp.c_fc, f"{p}.mlp.c_fc", (j,))
                mlp.append(Unit(tuple(s)))
            E, H = config.n_embd, config.n_head
            d = E // H
            heads = []
            for h in range(H):
                qkv = _span(h * d, d) + _span(E + h * d, d) + _span(2 * E + h * d, d)
                s = [Slice(f"{p}.attn.c_attn.weight", 1, qkv),
                     Slice(f"{p}.attn.c_proj.weight", 0, _span(h * d, d))]
                _with_bias(s, block.attn.c_attn, f"{p}.attn.c_attn", qkv)
                heads.append(Unit(tuple(s)))
        else:
            attn, mlp_module = block.self_attn, block.mlp
            inner = mlp_module.gate_proj.weight.shape[0]
            mlp = []
            for j in range(inner):
                s = [Slice(f"{p}.mlp.gate_proj.weight", 0, (j,)),
                     Slice(f"{p}.mlp.up_proj.weight", 0, (j,)),
                     Slice(f"{p}.mlp.down_proj.weight", 1, (j,))]
                _with_bias(s, mlp_module.gate_proj, f"{p}.mlp.gate_proj", (j,))
                _with_bias(s, mlp_module.up_proj, f"{p}.mlp.up_proj", (j,))
                mlp.append(Unit(tuple(s)))
            n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
            d = attn.q_proj.weight.shape[0] // n_heads
            group = n_heads // n_kv  # query heads per KV head, consecutive (repeat_kv)
            heads = []
            for g in range(n_kv):
                q_rows = _span(g * group * d, group * d)
                kv_rows = _span(g * d, d)
                s = [Slice(f"{p}.self_attn.q_proj.weight", 0, q_rows),
                     Slice(f"{p}.self_attn.k_proj.weight", 0, kv_rows),
                     Slice(f"{p}.self_attn.v_proj.weight", 0, kv_rows),
                     Slice(f"{p}.self_attn.o_proj.weight", 1, q_rows)]
                _with_bias(s, attn.q_proj, f"{p}.self_attn.q_proj", q_rows)
                _with_bias(s, attn.k_proj, f"{p}.self_attn.k_proj", kv_rows)
                _with_bias(s, attn.v_proj, f"{p}.self_attn.v_proj", kv_rows)
                heads.append(Unit(tuple(s)))
        layers.append(LayerUnits(tuple(mlp), tuple(heads)))
    return layers


# -------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class StructuredPlan:
    """Per decoder block, the MLP neurons and KV groups kept (ascending indices); every block
    keeps as many as the others."""

    mlp_keep: tuple[tuple[int, ...], ...]
    groups_keep: tuple[tuple[int, ...], ...]


def _unit_score(unit: Unit, params: dict[str, torch.Tensor],
                sums: dict[tuple[str, int], torch.Tensor], norm: str = "l2") -> float:
    """The L2 (or L1) norm of all the unit's weights. `sums` caches, per (parameter, dimension),
    the sum of squares (of absolute values) over the other dimensions: one reduction per tensor,
    not one per unit."""
    total = 0.0
    for s in unit.slices:
        key = (s.param, s.dim)
        if key not in sums:
            w = params[s.param].detach().float()
            w = w.pow(2) if norm == "l2" else w.abs()
            other = [d for d in range(w.dim()) if d != s.dim]
            sums[key] = w.sum(dim=other) if other else w
        total += float(sums[key][list(s.index)].sum())
    return total ** 0.5 if norm == "l2" else total


def _keep_top(scores: list[float], keep: int) -> tuple[int, ...]:
    order = torch.argsort(torch.tensor(scores), descending=True, stable=True)
    return tuple(sorted(order[:keep].tolist()))


def _shrunk_config(model: nn.Module, n_mlp: int, n_groups: int):
    """The model's config with `n_mlp` neurons and `n_groups` KV groups per block, validated as
    transformers validates it when saving (HFModelError when it refuses the counts)."""
    family = _family(model)
    config = copy.deepcopy(model.config)
    if family == "gpt2":
        if n_groups != config.n_head:
            raise HFModelError(
                "GPT-2's config derives the head size from n_embd / n_head, so attention heads "
                "cannot be cut out of it; prune its heads by masks only (head_sparsity 0 here)")
        config.n_inner = n_mlp
    else:
        group = config.num_attention_heads // config.num_key_value_heads
        _, blocks = decoder_blocks(model)
        # explicit, so that fewer heads do not change it (Llama derives it from hidden / heads)
        config.head_dim = blocks[0].self_attn.q_proj.weight.shape[0] // config.num_attention_heads
        config.intermediate_size = n_mlp
        config.num_key_value_heads = n_groups
        config.num_attention_heads = n_groups * group
    validate = getattr(config, "validate", None)
    if validate is not None:
        from huggingface_hub.errors import StrictDataclassError  # what transformers 5 raises

        try:
            validate()
        except (ValueError, TypeError, StrictDataclassError) as err:
            raise HFModelError(f"{n_groups} KV groups per block make an invalid "
                               f"{type(config).__name__}: {err}") from None
    return config


def _group_count(model: nn.Module, available: int, sparsity: float) -> int:
    """The number of KV groups to keep: the largest count the config accepts (transformers'
    Llama config wants the hidden size to be a multiple of the head count, even with an explicit
    head_dim) not above `(1 - sparsity) * available` rounded, so at least the asked share is
    pruned; the smallest accepted count if none is that small."""
    target = (1.0 - sparsity) * available
    valid = []
    for n in range(1, available + 1):
        try:
            _shrunk_config(model, 1, n)
            valid.append(n)
        except HFModelError:
            continue
    if not valid:
        raise HFModelError(f"no number of KV groups makes a valid {type(model.config).__name__}")
    below = [n for n in valid if n <= max(1, round(target))]
    return max(below) if below else min(valid)


def plan_structured(model: nn.Module, *, mlp_sparsity: float = 0.0,
                    head_sparsity: float = 0.0, norm: str = "l2",
                    weights: dict[str, torch.Tensor] | None = None) -> StructuredPlan:
    """Which neurons and KV groups each block keeps: the `1 - sparsity` share with the largest
    weight norms (`l2` or `l1`) in that block, at least one. Neurons: the share rounded. Groups:
    the share rounded down to a count the config accepts (see `_group_count`); GPT-2 keeps all
    heads unless asked to prune some, and then can only be masked (see `shrink`). `weights`
    (parameter name -> tensor) scores other values than the module's own, e.g. a training
    engine's fp32 master weights; the module then only gives the structure. A unit whose weights
    are all zero (pruned by an earlier round) scores 0 and stays pruned while the share grows."""
    for name, value in (("mlp_sparsity", mlp_sparsity), ("head_sparsity", head_sparsity)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), not {value}")
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be l1 or l2, not {norm!r}")
    params = {**dict(model.named_parameters()), **(weights or {})}
    sums: dict[tuple[str, int], torch.Tensor] = {}
    mlp_keep, groups_keep = [], []
    units = layer_units(model)
    available = len(units[0].attention)
    if _family(model) == "gpt2" or head_sparsity == 0.0:
        n_groups = max(1, round((1.0 - head_sparsity) * available))
    else:
        n_groups = _group_count(model, available, head_sparsity)
    for layer in units:
        n_mlp = max(1, round((1.0 - mlp_sparsity) * len(layer.mlp)))
        mlp_keep.append(_keep_top([_unit_score(u, params, sums, norm) for u in layer.mlp],
                                  n_mlp))
        groups_keep.append(_keep_top([_unit_score(u, params, sums, norm)
                                      for u in layer.attention], n_groups))
    return StructuredPlan(tuple(mlp_keep), tuple(groups_keep))


def plan_from_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> StructuredPlan:
    """The plan whose `structured_masks` these are: a unit is pruned when every one of its
    weights is masked, kept when none is; a unit partly masked is a ValueError, since no smaller
    model computes it (blocks that keep different counts are `shrunk_config`'s to refuse)."""
    lines: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def state(unit: Unit) -> bool | None:  # True: kept, False: pruned, None: partly masked
        kept, dropped = True, True
        for s in unit.slices:
            if s.param not in masks:  # a parameter without a mask is whole
                dropped = False
                continue
            key = (s.param, s.dim)
            if key not in lines:  # per index along dim: all kept, none kept
                m = masks[s.param].bool()
                other = [d for d in range(m.dim()) if d != s.dim]
                lines[key] = ((m.all(dim=other), ~m.any(dim=other)) if other else (m, ~m))
            all_kept, none_kept = lines[key]
            kept = kept and bool(all_kept[list(s.index)].all())
            dropped = dropped and bool(none_kept[list(s.index)].all())
        return True if kept else False if dropped else None

    mlp_keep, groups_keep = [], []
    for b, layer in enumerate(layer_units(model)):
        for kind, units, out in (("MLP neuron", layer.mlp, mlp_keep),
                                 ("attention group", layer.attention, groups_keep)):
            states = [state(u) for u in units]
            if None in states:
                raise ValueError(f"block {b}: {kind} {states.index(None)} is partly masked")
            out.append(tuple(i for i, kept in enumerate(states) if kept))
    return StructuredPlan(tuple(mlp_keep), tuple(groups_keep))


def _pruned_units(model: nn.Module, plan: StructuredPlan):
    for layer, mlp_keep, groups_keep in zip(layer_units(model), plan.mlp_keep, plan.groups_keep):
        for j, unit in enumerate(layer.mlp):
            if j not in mlp_keep:
                yield unit
        for g, unit in enumerate(layer.attention):
            if g not in groups_keep:
                yield unit


def structured_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter a unit owns a slice of (projection weights, and their biases where the
    model has them), by name, in model order: what structured pruning masks."""
    owned = {s.param for layer in layer_units(model) for unit in (*layer.mlp, *layer.attention)
             for s in unit.slices}
    return {name: p for name, p in model.named_parameters() if name in owned}


def round_head_sparsity(pruning, sparsity: float) -> float:
    """The share of attention groups a round at `sparsity` (its MLP-neuron share) removes: the
    same fraction of `pruning.heads` as of `pruning.target_sparsity`."""
    return pruning.heads * min(1.0, sparsity / pruning.target_sparsity)


def structured_masks(model: nn.Module, plan: StructuredPlan) -> dict[str, torch.Tensor]:
    """Masks (True = kept) over the parameters the plan touches, zeroing every pruned unit."""
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for unit in _pruned_units(model, plan):
        for s in unit.slices:
            mask = masks.setdefault(s.param, torch.ones_like(params[s.param], dtype=torch.bool))
            mask.index_fill_(s.dim, torch.tensor(s.index), False)
    return masks


# -------------------------------------------------------------------------------- shrinking


def shrunk_config(model: nn.Module, plan: StructuredPlan):
    """The config of the model `shrink` makes (HFModelError when transformers refuses it)."""
    n_mlp = {len(k) for k in plan.mlp_keep}
    n_groups = {len(k) for k in plan.groups_keep}
    if len(n_mlp) != 1 or len(n_groups) != 1:
        raise ValueError("every block must keep as many neurons and groups as the others")
    return _shrunk_config(model, n_mlp.pop(), n_groups.pop())


@torch.no_grad()
def shrink(model: nn.Module, plan: StructuredPlan) -> nn.Module:
    """A new model of the same class without the pruned units, its config saying so. The
    remaining weights are copied as they are (masked or not)."""
    config = shrunk_config(model, plan)

    # index along each cut dimension of each parameter: everything not owned by a pruned unit
    state = model.state_dict()
    drop: dict[tuple[str, int], set[int]] = {}
    for unit in _pruned_units(model, plan):
        for s in unit.slices:
            drop.setdefault((s.param, s.dim), set()).update(s.index)
    new_state = dict(state)
    for (name, dim), dropped in drop.items():
        kept = [i for i in range(state[name].shape[dim]) if i not in dropped]
        new_state[name] = new_state[name].index_select(dim, torch.tensor(kept))
    small = type(model)(config)
    small.load_state_dict(new_state, strict=True)
    return small.to(next(model.parameters()).dtype).eval()
