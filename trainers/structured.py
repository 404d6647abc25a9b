"""Structured (channel) pruning of any PyTorch model: whole channels go, then they are cut out.

Which channels must go together comes from Torch-Pruning's dependency graph, traced once from an
example input: a conv's output channels are coupled with the BatchNorm after it, the input
channels of every layer that reads them, and, through residual additions, with every other layer
that writes into the same sum; concatenations and flattening map the indices along. Each coupled
set is a `ChannelGroup`, described by parameter names and index lists only (no module objects),
so that every process that builds the same model with the same example input computes equal
groups, and masks computed in one process apply in another.

While the student trains, a pruned channel is an ordinary boolean mask (True = kept) over every
parameter slice of its group: the producing layers' filters and biases, the BatchNorm scales and
shifts, and the reading layers' input slices. The masks are kept in force by the same machinery
as magnitude pruning (`trainers.engine`). With the producer's weights, bias and BatchNorm affine
parameters zeroed, the channel is exactly zero after every activation with f(0) = 0 and after a
residual sum of equally dead channels, and its readers ignore it whatever it holds, so the masked
model computes what the smaller model computes. At export `shrink` removes the dead channels with
Torch-Pruning's group pruning; `reshape_modules` gives a freshly built full-size model the smaller
shapes again, so that the export file needs only JSON and safetensors, never a pickle.

Groups that this module cannot mask exactly are left out (never pruned): those touching grouped
(not depthwise) convolutions, LayerNorm / GroupNorm (their statistics mix channels, so a zeroed
channel would not behave like a removed one), embeddings, attention, recurrent layers or bare
parameters. The layers that produce the model's logits are never pruned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from specs.job import LayerSelection
from trainers.pruning import select_layers

# module types whose shapes `shrink` records and `reshape_modules` restores
_CONV = nn.modules.conv._ConvNd
_NORM = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
SHAPE_ATTRS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (_CONV, ("in_channels", "out_channels", "groups")),
    (nn.Linear, ("in_features", "out_features")),
    (_NORM, ("num_features",)),
    (nn.PReLU, ("num_parameters",)),
)


@dataclass(frozen=True)
class ChannelSlice:
    """Where one parameter holds a group's channels: positions `index` along `dim`, the i-th
    position belonging to group channel `channel[i]` (a Linear after a flatten reads each conv
    channel at H*W positions; a layer after a concatenation reads it at an offset)."""

    parameter: str  # e.g. "layer1.0.conv1.weight"
    dim: int
    index: tuple[int, ...]
    channel: tuple[int, ...]
    role: str  # "out": a Conv/Linear output (weight, bias); "in": a Conv/Linear input; "norm"

    @property
    def scored(self) -> bool:
        """Conv/Linear weights decide which channels go; biases and norm parameters do not."""
        return self.role != "norm" and self.parameter.endswith(".weight")


@dataclass(frozen=True)
class ChannelGroup:
    """Coupled channels that are pruned together, named by the layer whose output channels
    Torch-Pruning grouped them from."""

    root: str  # module name, e.g. "layer1.0.conv1"
    channels: int
    slices: tuple[ChannelSlice, ...]

    @property
    def parameters(self) -> list[str]:
        return list(dict.fromkeys(s.parameter for s in self.slices))

    @property
    def producers(self) -> list[str]:
        """The Conv/Linear layers whose output channels the group prunes."""
        return list(dict.fromkeys(s.parameter.rsplit(".", 1)[0] for s in self.slices
                                  if s.role == "out"))


# ------------------------------------------------------------------------------ the graph


def _prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv and Linear modules by name, without the feature-KD projections (never pruned)."""
    from trainers.features import is_projection

    return {n: m for n, m in model.named_modules()
            if isinstance(m, (_CONV, nn.Linear)) and not is_projection(n)}


def _dependency_graph(model: nn.Module, example_input: torch.Tensor, num_classes: int | None):
    """Torch-Pruning's graph of `model`, traced with one forward pass of `example_input`
    (whose output's last dimension is checked to be `num_classes`, unless that is None).

    Tracing reads autograd's graph, so it runs with gradients on; it puts the model in eval mode,
    and each module's own mode is restored afterwards.
    """
    import torch_pruning as tp

    modes = {m: m.training for m in model.modules()}
    outputs = []

    def keep_output(out):
        outputs.append(out)
        return out

    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, forward_fn=lambda m, x: m(x),
                output_transform=keep_output, verbose=False,
            )
    finally:
        for m, mode in modes.items():
            m.training = mode
    out = outputs[0]
    if num_classes is None:
        return graph
    logits = out if isinstance(out, torch.Tensor) else tp.utils.flatten_as_list(out)[0]
    if logits.shape[-1] != num_classes:
        raise ValueError(f"the model's output has shape {tuple(logits.shape)}, not "
                         f"(batch, ..., {num_classes}) logits")
    return graph


def _logit_layers(graph) -> list[nn.Module]:
    """The Conv/Linear layers whose outputs reach the model's output through channel-preserving
    operations only (activations, pooling, reshapes, sums): their channels are the classes."""
    sinks = [node for node in graph.module2node.values() if not node.outputs]
    stack, seen, found = list(sinks), set(), []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(node.module, (_CONV, nn.Linear)):
            found.append(node.module)
            continue
        stack.extend(node.inputs)
    return found


def _describe(group, names: dict[nn.Module, str]) -> ChannelGroup | None:
    """A Torch-Pruning group as parameter slices, or None if it touches anything that a mask
    cannot prune exactly (see the module docstring)."""
    import torch_pruning as tp

    f = tp.pruner.function
    root_module = group[0].dep.target.module
    channels = len(group[0].idxs)
    slices: list[ChannelSlice] = []
    for item in group:
        module, handler = item.dep.target.module, item.dep.handler
        if module not in names:
            # Torch-Pruning's stand-ins for parameter-free operations (sums, activations,
            # reshapes, concatenations) hold nothing to mask; a bare parameter is not supported
            if isinstance(module, nn.Parameter):
                return None
            continue
        root = item.root_idxs
        if any(r is None for r in root):
            return None
        name, index, channel = names[module], tuple(int(i) for i in item.idxs), tuple(int(r) for r in root)

        def add(param: str, dim: int, role: str) -> None:
            slices.append(ChannelSlice(f"{name}.{param}", dim, index, channel, role))

        if isinstance(module, _CONV):
            depthwise = handler == f.prune_depthwise_conv_out_channels
            if depthwise:
                if not module.in_channels == module.out_channels == module.groups:
                    return None  # a channel multiplier: in and out channels are not one-to-one
                add("weight", 0, "out")
                if module.bias is not None:
                    add("bias", 0, "out")
            elif module.groups > 1:
                return None
            elif handler == f.prune_conv_out_channels:
                add("weight", 1 if module.transposed else 0, "out")
                if module.bias is not None:
                    add("bias", 0, "out")
            elif handler == f.prune_conv_in_channels:
                add("weight", 0 if module.transposed else 1, "in")
            else:
                return None
        elif isinstance(module, nn.Linear):
            if handler == f.prune_linear_out_channels:
                add("weight", 0, "out")
                if module.bias is not None:
                    add("bias", 0, "out")
            elif handler == f.prune_linear_in_channels:
                add("weight", 1, "in")
            else:
                return None
        elif isinstance(module, _NORM):
            if module.affine:
                add("weight", 0, "norm")
                add("bias", 0, "norm")
        elif isinstance(module, nn.PReLU):
            if module.num_parameters > 1:
                add("weight", 0, "norm")
        else:
            return None
    return ChannelGroup(names[root_module], channels, tuple(slices))


def channel_groups(
    model: nn.Module, example_input: torch.Tensor, num_classes: int, *,
    include: list[str] | None = None, exclude: list[str] | None = None,
) -> list[ChannelGroup]:
    """The model's prunable channel groups, in module order.

    `example_input` is a batch the model accepts (its values do not matter: zeros keep the random
    state untouched); `num_classes` is checked against the output's last dimension. A group is
    prunable when every Conv/Linear whose output channels it prunes matches an `include` glob
    (default: all) and no `exclude` glob, and none of them produces logits. Layers that only read
    a group's channels are adjusted whatever the selection. A pattern that matches no Conv/Linear
    module is a ValueError naming it; so is a selection that leaves nothing to prune.
    """
    from torch_pruning.ops import TORCH_CONV, TORCH_LINEAR

    layers = _prunable_layers(model)
    selected = set(select_layers(list(layers), LayerSelection(include=include or ["*"],
                                                               exclude=exclude or [])))
    graph = _dependency_graph(model, example_input, num_classes)
    ignored = _logit_layers(graph) + [m for n, m in layers.items() if n not in selected]
    names = {m: n for n, m in model.named_modules()}
    groups = [
        g for g in (_describe(tp_group, names) for tp_group in graph.get_all_groups(
            ignored_layers=ignored, root_module_types=(TORCH_CONV, TORCH_LINEAR)))
        if g is not None and g.channels > 1
    ]
    if not groups:
        raise ValueError("no channel group can be pruned: the selected layers "
                         f"{sorted(selected)} either produce the logits or are coupled with "
                         "layers that cannot be pruned")
    order = {n: i for i, n in enumerate(names.values())}
    return sorted(groups, key=lambda g: order[g.root])


def pruned_parameters(groups: list[ChannelGroup]) -> list[str]:
    """Every parameter a pruned channel can touch (the ones that carry channel masks)."""
    return list(dict.fromkeys(p for g in groups for p in g.parameters))


# ------------------------------------------------------------------------------ the masks


def _positions(s: ChannelSlice) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(s.index, dtype=torch.long), torch.tensor(s.channel, dtype=torch.long)


def channel_scores(weights: dict[str, torch.Tensor], group: ChannelGroup, norm: str) -> torch.Tensor:
    """(channels,) scores: per Conv/Linear weight slice of the group, the mean |w| (l1) or root
    mean square (l2) of the entries the channel owns there (its filter, the next layers' input
    columns), averaged over the slices.

    Hand-written rather than Torch-Pruning's GroupMagnitudeImportance, which reads the weights
    of live modules: under DeepSpeed those are bf16 copies or partitions, while the masks must
    come from the full fp32 master weights, the same on every rank, as a plain function of
    (weights, groups). Averaging over each slice's fan-in keeps layers of different fan-in on one
    scale (as the weight-level measure always did); the group mean is Torch-Pruning's default
    group reduction.
    """
    total = torch.zeros(group.channels, dtype=torch.float64)
    scored = 0
    for s in group.slices:
        if not s.scored:
            continue
        w = weights[s.parameter].detach().double()
        rows = w.movedim(s.dim, 0).reshape(w.shape[s.dim], -1)  # (positions along dim, rest)
        index, channel = _positions(s)
        picked = rows[index]  # (len(index), rest)
        per = picked.abs().sum(1) if norm == "l1" else picked.pow(2).sum(1)
        sums = torch.zeros(group.channels, dtype=torch.float64).index_add_(0, channel, per)
        counts = torch.zeros(group.channels, dtype=torch.float64).index_add_(
            0, channel, torch.full((len(index),), float(rows.shape[1]), dtype=torch.float64))
        mean = sums / counts
        total += mean if norm == "l1" else mean.sqrt()
        scored += 1
    return (total / max(scored, 1)).float()


def _root_slice(g: ChannelGroup) -> ChannelSlice:
    return next(s for s in g.slices if s.role == "out" and s.parameter == f"{g.root}.weight")


def kept_channels(masks: dict[str, torch.Tensor], groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """Which channels of each group survive, read from the root layer's weight mask."""
    out = {}
    for g in groups:
        s = _root_slice(g)
        m = masks.get(s.parameter)
        if m is None:
            continue
        index, channel = _positions(s)
        kept = torch.zeros(g.channels, dtype=torch.bool)
        kept[channel] = m.movedim(s.dim, 0).reshape(m.shape[s.dim], -1)[index].any(1)
        out[g.root] = kept
    return out


def channel_masks(
    weights: dict[str, torch.Tensor],  # parameter name -> full fp32 tensor
    groups: list[ChannelGroup],
    sparsity: float,
    *,
    norm: str = "l1",
    scope: str = "layer",
    previous: dict[str, torch.Tensor] | None = None,  # name -> bool mask, True = kept
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(parameter masks, kept channels per group root) pruning `round(sparsity * channels)`.

    `scope="layer"`: that many channels of each group, keeping at least one. `scope="global"`:
    that many over all groups together, by one threshold over scores divided by their group's mean
    (Torch-Pruning's "mean" normaliser), so that groups of different scale compare; a group down
    to one channel gives up no more. Channels pruned in an earlier round (`previous`) stay pruned:
    they rank first. Masks cover every tensor in `weights`; tensors that no pruned channel touches
    get all-True masks. `weights` must hold every parameter of every group.
    """
    missing = [p for p in pruned_parameters(groups) if p not in weights]
    if missing:
        raise KeyError(f"channel masks need the weights {missing[:5]} (and {max(0, len(missing) - 5)} more)")
    dead_before = ({k: ~v for k, v in kept_channels(previous, groups).items()}
                   if previous else {})
    scores = {}
    for g in groups:
        s = channel_scores(weights, g, norm)
        before = dead_before.get(g.root)
        if before is not None:
            live = s[~before]
            mean = float(live.mean()) if len(live) else 0.0
            s = torch.where(before, torch.full_like(s, -1.0), s)
        else:
            mean = float(s.mean())
        if scope == "global":
            s = torch.where(s >= 0, s / mean, s) if mean > 0 else torch.where(s >= 0, 0.0 * s, s)
        scores[g.root] = s
    kept = {g.root: torch.ones(g.channels, dtype=torch.bool) for g in groups}
    if scope == "layer":
        for g in groups:
            already = int((scores[g.root] < 0).sum())
            k = max(already, min(g.channels - 1, int(round(sparsity * g.channels))))
            kept[g.root][torch.argsort(scores[g.root], stable=True)[:k]] = False
    elif scope == "global":
        flat = torch.cat([scores[g.root] for g in groups])
        owner = torch.cat([torch.full((g.channels,), i) for i, g in enumerate(groups)])
        index = torch.cat([torch.arange(g.channels) for g in groups])
        k = max(int((flat < 0).sum()), int(round(sparsity * flat.numel())))
        left = [g.channels for g in groups]
        for j in torch.argsort(flat, stable=True).tolist():
            if k == 0:
                break
            i = int(owner[j])
            if left[i] == 1:  # a group with no channel left would cut the network
                continue
            kept[groups[i].root][int(index[j])] = False
            left[i] -= 1
            k -= 1
    else:
        raise ValueError(f"unknown scope {scope!r}")
    masks = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    for g in groups:
        dead = ~kept[g.root]
        for s in g.slices:
            index, channel = _positions(s)
            drop = index[dead[channel]]
            masks[s.parameter].movedim(s.dim, 0)[drop] = False  # movedim is a view: writes through
    return masks, kept


# ------------------------------------------------------------------------- export / reload


def _shape_attrs(module: nn.Module) -> tuple[str, ...]:
    for kind, attrs in SHAPE_ATTRS:
        if isinstance(module, kind):
            return attrs
    return ()


def _shape_of(module: nn.Module) -> dict:
    return {a: int(getattr(module, a)) for a in _shape_attrs(module)}


def shrink(
    model: nn.Module, masks: dict[str, torch.Tensor], example_input: torch.Tensor,
) -> tuple[nn.Module, dict[str, dict[str, int]]]:
    """(a smaller copy of `model` without the channels `masks` pruned, its changed module shapes).

    The shapes, e.g. {"layer1.0.conv1": {"in_channels": 64, "out_channels": 40, "groups": 1},
    "bn1": {"num_features": 40}, "fc": {"in_features": 300, "out_features": 10}}, are what
    `reshape_modules` needs to rebuild the smaller model from a full-size one. A channel counts as
    pruned when its root layer's weight slice is masked whole; every other slice of it must be
    masked too (the masks came from `channel_masks`), or this is a ValueError. `model` is left
    untouched.
    """
    from torch_pruning.ops import TORCH_CONV, TORCH_LINEAR

    small = copy.deepcopy(model)
    graph = _dependency_graph(small, example_input, None)
    names = {m: n for n, m in small.named_modules()}
    before = {n: _shape_of(m) for n, m in small.named_modules() if _shape_attrs(m)}
    # all groups first, on the unpruned model: the slices' indices are those of the masks
    pairs = [(tp_group, _describe(tp_group, names)) for tp_group in graph.get_all_groups(
        ignored_layers=_logit_layers(graph), root_module_types=(TORCH_CONV, TORCH_LINEAR))]
    cuts = []
    for tp_group, g in pairs:
        if g is None or _root_slice(g).parameter not in masks:
            continue
        dead = ~kept_channels(masks, [g])[g.root]
        if not dead.any():
            continue
        for s in g.slices:
            m = masks.get(s.parameter)
            index, channel = _positions(s)
            if m is None or m.movedim(s.dim, 0)[index[dead[channel]]].any():
                raise ValueError(f"the masks prune channels of {g.root} but keep part of them "
                                 f"in {s.parameter}: they are not channel masks of this model")
        cuts.append((tp_group, dead.nonzero().flatten().tolist()))
    for tp_group, idxs in cuts:
        # the root's own channel numbering is changed by no other group, so the indices read
        # from the masks stay valid; Torch-Pruning re-maps every other layer's indices itself
        tp_group.prune(idxs=idxs)
    shapes = {n: _shape_of(m) for n, m in small.named_modules()
              if n in before and _shape_of(m) != before[n]}
    return small, shapes


def reshape_modules(model: nn.Module, module_shapes: dict[str, dict[str, int]]) -> nn.Module:
    """Give the named modules of a freshly built full-size `model` the recorded smaller shapes,
    in place, so that the smaller state dict loads with `strict=True`.

    Torch-Pruning's own `tp.state_dict` / `tp.load_state_dict` restore whole module `__dict__`s,
    which only a pickle carries; the export file holds JSON and safetensors, so the modules are
    resized here from their shape attributes (parameters and buffers are zeros until loaded).
    """
    modules = dict(model.named_modules())
    for name, shape in module_shapes.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"module_shapes names {name!r}, which the model does not have")
        attrs = _shape_attrs(module)
        unknown = sorted(set(shape) - set(attrs))
        if unknown:
            raise ValueError(f"module_shapes gives {name!r} ({type(module).__name__}) the "
                             f"attributes {unknown}; it can take {list(attrs)}")
        for attr, value in shape.items():
            setattr(module, attr, int(value))
        _resize_tensors(module)
    return model


def _resize_tensors(module: nn.Module) -> None:
    """New zero parameters and buffers that fit the module's shape attributes."""

    def fresh(name: str, shape: tuple[int, ...], fill: float = 0.0) -> None:
        old = getattr(module, name, None)
        if old is None:
            return
        new = torch.full(shape, fill, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            setattr(module, name, new)

    if isinstance(module, _CONV):
        k = tuple(module.kernel_size)
        if module.transposed:  # (in, out / groups, *k)
            fresh("weight", (module.in_channels, module.out_channels // module.groups, *k))
        else:  # (out, in / groups, *k)
            fresh("weight", (module.out_channels, module.in_channels // module.groups, *k))
        fresh("bias", (module.out_channels,))
    elif isinstance(module, nn.Linear):
        fresh("weight", (module.out_features, module.in_features))
        fresh("bias", (module.out_features,))
    elif isinstance(module, _NORM):
        n = (module.num_features,)
        fresh("weight", n)
        fresh("bias", n)
        fresh("running_mean", n)
        fresh("running_var", n, 1.0)
    elif isinstance(module, nn.PReLU):
        fresh("weight", (module.num_parameters,))
