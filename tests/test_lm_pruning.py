"""Pruning transformers: which weights global magnitude pruning ranks, and structured pruning of
MLP neurons and KV groups whose shrunk model, saved and reloaded, computes the masked model."""

import pytest
import torch
from tiny_lm import causal_lm, gpt2_config, llama_config, no_network

from trainers.hf_models import HFModelError, load_hf_dir, save_hf_dir
from trainers.lm_pruning import (
    plan_from_masks,
    plan_structured,
    projection_weights,
    prune_global_magnitude_,
    shrink,
    structured_masks,
    structured_parameters,
)
from trainers.pruning import apply_masks_

__all__ = ["no_network"]
pytestmark = pytest.mark.usefixtures("no_network")
VOCAB = 320


def _ids(seed=0):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _masked(model, plan):
    params = dict(model.named_parameters())
    apply_masks_(params, structured_masks(model, plan))
    return model


# ------------------------------------------------------------------------ global magnitude


def test_projection_weights_are_the_block_projections_only():
    gpt2 = causal_lm(gpt2_config(VOCAB))
    names = set(projection_weights(gpt2))
    assert names == {f"transformer.h.{i}.{m}.weight" for i in range(4)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    tied = projection_weights(gpt2, include_embeddings=True, include_lm_head=True)
    assert set(tied) - names == {"transformer.wte.weight"}  # the tied LM head is that tensor

    llama = causal_lm(llama_config(VOCAB))
    names = set(projection_weights(llama))
    assert names == {f"model.layers.{i}.{m}.weight" for i in range(4)
                     for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    both = projection_weights(llama, include_embeddings=True, include_lm_head=True)
    assert set(both) - names == {"model.embed_tokens.weight", "lm_head.weight"}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_global_magnitude_prunes_exactly_across_projections_and_nothing_else(family):
    model = causal_lm(gpt2_config(VOCAB) if family == "gpt2" else llama_config(VOCAB))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = prune_global_magnitude_(model, 0.6)
    weights = projection_weights(model)
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == round(0.6 * total)
    kept = torch.cat([before[n][m].abs() for n, m in masks.items()])
    pruned = torch.cat([before[n][~m].abs() for n, m in masks.items()])
    assert pruned.max() <= kept.min()  # one threshold across all layers
    for name, param in model.named_parameters():  # embeddings, norms, head: untouched
        if name not in weights:
            assert torch.equal(param, before[name]), name
    again = prune_global_magnitude_(model, 0.8, previous=masks)
    assert all((again[n] <= masks[n]).all() for n in masks)  # pruned stays pruned
    assert torch.isfinite(_logits(model, _ids())).all()


# ----------------------------------------------------------------------------- structured


def _reload(model, path):
    return load_hf_dir(save_hf_dir(model, path))


@pytest.mark.parametrize("heads,kv_heads,head_sparsity,kept_kv", [
    (4, 2, 0.5, 1),  # grouped-query attention: one of two KV groups, with its 2 query heads
    (4, 4, 0.5, 2),  # multi-head attention: a group is one head
    # 3 heads would not divide the hidden size 64, which transformers' Llama config requires:
    # the plan keeps 2, the nearest count below that it accepts
    (4, 4, 0.25, 2),
    (4, 1, 0.5, 1),  # multi-query: the only group stays
])
def test_llama_shrunk_model_reloads_and_computes_the_masked_model(tmp_path, heads, kv_heads,
                                                                  head_sparsity, kept_kv):
    model = causal_lm(llama_config(VOCAB, heads=heads, kv_heads=kv_heads), seed=1)
    plan = plan_structured(model, mlp_sparsity=0.5, head_sparsity=head_sparsity)
    assert all(len(k) == 64 for k in plan.mlp_keep)
    assert all(len(k) == kept_kv for k in plan.groups_keep)
    masked = _masked(model, plan)
    small = shrink(masked, plan)
    config = small.config
    assert (config.intermediate_size, config.num_key_value_heads) == (64, kept_kv)
    assert config.num_attention_heads == kept_kv * heads // kv_heads
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert config.head_dim == 16  # 64 hidden / 4 heads, as before
    params = sum(p.numel() for p in small.parameters())
    assert params < sum(p.numel() for p in model.parameters())
    again = _reload(small, tmp_path / "small")
    assert again.config.num_attention_heads == config.num_attention_heads
    ids = _ids()
    # the pruned units contribute exact zeros to the masked model; the shrunk one skips them, so
    # only the order of float32 sums could differ: 1e-5 absolute on logits of magnitude ~1
    # (measured: bit-equal)
    assert torch.allclose(_logits(again, ids), _logits(masked, ids), rtol=0, atol=1e-5)


def test_gpt2_neurons_shrink_and_heads_are_masked_only(tmp_path):
    model = causal_lm(gpt2_config(VOCAB), seed=2)
    plan = plan_structured(model, mlp_sparsity=0.5)
    masked = _masked(model, plan)
    small = shrink(masked, plan)
    assert small.config.n_inner == 128 and small.transformer.h[0].mlp.c_fc.weight.shape == (64, 128)
    again = _reload(small, tmp_path / "small")
    ids = _ids(1)
    assert torch.allclose(_logits(again, ids), _logits(masked, ids), rtol=0, atol=1e-5)

    heads = plan_structured(causal_lm(gpt2_config(VOCAB), seed=2), head_sparsity=0.5)
    assert all(len(k) == 2 for k in heads.groups_keep)
    with pytest.raises(HFModelError, match="n_embd / n_head"):
        shrink(model, heads)
    # a masked head's output is exactly 0: its rows of the output projection do not matter
    masked = _masked(causal_lm(gpt2_config(VOCAB), seed=2), heads)
    reference = _logits(masked, ids)
    pruned_head = next(h for h in range(4) if h not in heads.groups_keep[0])
    with torch.no_grad():
        masked.transformer.h[0].attn.c_proj.weight[pruned_head * 16:(pruned_head + 1) * 16] = 5.0
    assert torch.equal(_logits(masked, ids), reference)


def test_plan_keeps_the_largest_units_of_each_layer():
    model = causal_lm(llama_config(VOCAB), seed=3)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 7] *= 100  # neuron 7 of block 1
        model.model.layers[2].self_attn.v_proj.weight[16:32] *= 100  # KV group 1 of block 2
        model.model.layers[2].self_attn.q_proj.weight[:32] *= 0  # query heads of group 0
    plan = plan_structured(model, mlp_sparsity=0.9, head_sparsity=0.5)
    assert 7 in plan.mlp_keep[1] and len(plan.mlp_keep[1]) == 13  # round(0.1 * 128)
    assert plan.groups_keep[2] == (1,)
    assert all(list(k) == sorted(k) for k in plan.mlp_keep)


def test_every_block_keeps_at_least_one_unit_and_bad_sparsity_is_refused():
    model = causal_lm(llama_config(VOCAB, intermediate=8), seed=4)
    plan = plan_structured(model, mlp_sparsity=0.99, head_sparsity=0.99)
    assert all(len(k) == 1 for k in plan.mlp_keep) and all(len(k) == 1 for k in plan.groups_keep)
    with pytest.raises(ValueError, match="mlp_sparsity"):
        plan_structured(model, mlp_sparsity=1.0)


def test_masks_zero_exactly_the_pruned_units():
    model = causal_lm(llama_config(VOCAB), seed=5)
    plan = plan_structured(model, mlp_sparsity=0.25, head_sparsity=0.5)
    masks = structured_masks(model, plan)
    layer = model.model.layers[0]
    gate = masks["model.layers.0.mlp.gate_proj.weight"]
    down = masks["model.layers.0.mlp.down_proj.weight"]
    kept = set(plan.mlp_keep[0])
    assert {j for j in range(128) if gate[j].all()} == kept
    assert {j for j in range(128) if down[:, j].all()} == kept
    assert not any(gate[j].any() for j in range(128) if j not in kept)
    g = plan.groups_keep[0][0]
    q = masks["model.layers.0.self_attn.q_proj.weight"]
    assert q[g * 32:(g + 1) * 32].all() and not q[(1 - g) * 32:(2 - g) * 32].any()
    assert masks["model.layers.0.self_attn.o_proj.weight"].shape == layer.self_attn.o_proj.weight.shape


def test_a_plan_the_config_refuses_is_a_clear_error():
    from trainers.lm_pruning import StructuredPlan

    model = causal_lm(llama_config(VOCAB, heads=4, kv_heads=4), seed=6)
    three_heads = StructuredPlan(mlp_keep=tuple(tuple(range(128)) for _ in range(4)),
                                 groups_keep=tuple((0, 1, 2) for _ in range(4)))
    with pytest.raises(HFModelError, match="3 KV groups per block make an invalid LlamaConfig"):
        shrink(model, three_heads)


def test_a_plan_comes_back_from_its_masks_and_half_a_unit_is_refused():
    """What the export does with a job's masks: the plan they were made from, or an error."""
    model = causal_lm(llama_config(VOCAB, heads=4, kv_heads=2), seed=7)
    plan = plan_structured(model, mlp_sparsity=0.4, head_sparsity=0.5)
    masks = structured_masks(model, plan)
    assert plan_from_masks(model, masks) == plan
    assert plan_from_masks(model, {}) == plan_structured(model)  # no mask: everything kept
    # every mask is over a parameter structured pruning lists (so the engine masks them all)
    assert set(masks) <= set(structured_parameters(model))
    masks["model.layers.1.mlp.down_proj.weight"][0, plan.mlp_keep[1][0]] = False
    with pytest.raises(ValueError, match="block 1: MLP neuron .* partly masked"):
        plan_from_masks(model, masks)


def test_the_norm_and_the_weights_scored_are_the_callers():
    """L1 and L2 rank differently where a unit has one large weight against many smaller ones;
    `weights` replaces the module's values (an engine scores its fp32 master copy)."""
    model = causal_lm(llama_config(VOCAB, intermediate=2), seed=8)
    gate = "model.layers.0.mlp.gate_proj.weight"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.zero_()
        w = model.get_parameter(gate)
        w[0, 0] = 3.1  # neuron 0: L1 3.1, L2 3.1
        w[1, :9] = 1.0  # neuron 1: L1 9, L2 3
    assert plan_structured(model, mlp_sparsity=0.5, norm="l1").mlp_keep[0] == (1,)
    assert plan_structured(model, mlp_sparsity=0.5, norm="l2").mlp_keep[0] == (0,)
    w = model.get_parameter(gate).detach().clone()
    w[0, 0] = 100.0
    assert plan_structured(model, mlp_sparsity=0.5, norm="l1",
                           weights={gate: w}).mlp_keep[0] == (0,)
    with pytest.raises(ValueError, match="norm"):
        plan_structured(model, norm="l3")


def test_a_deeper_round_keeps_a_subset_of_the_last_rounds_units():
    """Units a round zeroed score 0, so the next round (more sparsity) cannot bring them back."""
    model = causal_lm(llama_config(VOCAB, heads=4, kv_heads=4), seed=9)
    first = plan_structured(model, mlp_sparsity=0.3, head_sparsity=0.5)  # 2 of 4 heads
    _masked(model, first)
    second = plan_structured(model, mlp_sparsity=0.6, head_sparsity=0.75)  # 1
    for before, after in [*zip(first.mlp_keep, second.mlp_keep),
                          *zip(first.groups_keep, second.groups_keep)]:
        assert set(after) <= set(before) and len(after) < len(before)
