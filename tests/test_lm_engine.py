"""The DeepSpeed engine on a causal LM, in one process (a gloo group of one): the step's loss is
the spec's token-level loss of the (B, L, V) logits against the teacher's top-k, over the
non-padding tokens only; the projections are what it prunes, and the masks hold on the module
and on DeepSpeed's fp32 master copies (bf16, ZeRO 1 and 3)."""


import pytest
import torch
from tiny_lm import llama_config

from specs import parse_spec
from trainers.engine import DistillEngine
from trainers.lm_losses import lm_topk_kd_loss, next_token_labels
from trainers.token_cache import compress_token_topk

VOCAB, L, K = 97, 12, 5


@pytest.fixture(scope="module", autouse=True)
def process_group(gloo_process_group):
    """The session's gloo group of one (tests/conftest.py)."""


@pytest.fixture(autouse=True)
def restore_linear():
    """ZeRO 3 replaces `torch.nn.functional.linear` for the process (see tests/test_engine.py)."""
    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear


def _engine(precision="fp32", zero_stage=0, loss=None):
    from transformers import AutoModelForCausalLM

    spec = parse_spec({
        "name": "lm-engine",
        "data": {"kind": "text", "train": "a", "test": "b", "tokenizer": "t", "seq_len": L},
        "teacher": {"kind": "train", "model": {"kind": "hf", "config": {"model_type": "llama"}}},
        "student": {"model": {"kind": "hf", "config": {"model_type": "llama"}}},
        "distillation": loss or {"kind": "jsd", "beta": 0.3, "temperature": 2.0, "alpha": 0.7},
        "logits": {"mode": "online", "tokens": {"k": K}},
        "precision": precision,
        "deepspeed": {"zero_stage": zero_stage, "param_persistence_threshold": 0},
    })
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        llama_config(VOCAB, layers=2, hidden=32, intermediate=64)).train()
    return DistillEngine(model, spec, lr=0.01, micro_batch=4, weight_decay=0.0, grad_clip=1.0,
                         world_size=1, device=torch.device("cpu")), spec


def _batch(seed=0, real=(L, L - 4, 5, L)):
    """Blocks of L ids, the rows padded after `real` tokens; a teacher's top-k for them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(real), L), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(real):
        mask[row, :n] = 1
    teacher = torch.randn(len(real), L, VOCAB, generator=g) * 3  # (B, L, V)
    return ids, mask, teacher


def test_the_step_loss_is_the_token_loss_of_the_logits():
    engine, spec = _engine()
    ids, mask, teacher_logits = _batch()
    top = compress_token_topk(teacher_logits, K, spec.distillation.temperature)
    labels = next_token_labels(ids, mask)
    with torch.no_grad():
        logits = engine.module(input_ids=ids, attention_mask=mask).logits  # before the step
        expected, parts = lm_topk_kd_loss(logits, top[0], top[1], labels, spec.distillation,
                                          spec.logits.tokens.missing_mass, top[2])
    got = engine.train_step((ids, mask), labels, top, 2.0, 0.7)
    # the same forward in the same process: float32 summation order at most
    assert got["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert got["kd"] == pytest.approx(float(parts["kd"]), rel=1e-5)
    assert got["ce"] == pytest.approx(float(parts["ce"]), rel=1e-5)
    without_teacher = engine.train_step((ids, mask), labels, None, 2.0, 0.7)
    assert set(without_teacher) == {"loss", "ce"}  # the teacher's own training: cross-entropy


def test_padding_tokens_do_not_count():
    """Whatever the padded positions hold (ids, teacher top-k), the loss is the same."""
    ids, mask, teacher_logits = _batch(seed=1)
    losses = []
    for garbage in (0, 1):
        engine, spec = _engine()
        ids_g = torch.where(mask.bool(), ids, torch.full_like(ids, 7 + garbage))
        t_g = torch.where(mask.bool()[..., None], teacher_logits, teacher_logits.flip(-1) * garbage)
        top = compress_token_topk(t_g, K, spec.distillation.temperature)
        losses.append(engine.train_step((ids_g, mask), next_token_labels(ids_g, mask), top,
                                        2.0, 0.7)["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # float32 rounding at most


@pytest.mark.parametrize("precision,zero_stage", [("bf16", 1), ("bf16", 3), ("fp32", 2)])
def test_pruned_projections_stay_zero_on_both_copies(precision, zero_stage):
    engine, spec = _engine(precision, zero_stage)
    assert all(".self_attn." in n or ".mlp." in n for n in engine.prunable)
    assert len(engine.prunable) == 14  # 7 projections in each of 2 blocks
    for seed in range(2):
        ids, mask, t = _batch(seed)
        top = compress_token_topk(t, K, 2.0)
        assert engine.train_step((ids, mask), next_token_labels(ids, mask), top, 2.0, 0.7)
    engine.prune_to(0.5)
    for seed in range(2, 5):
        ids, mask, t = _batch(seed)
        top = compress_token_topk(t, K, 2.0)
        assert engine.train_step((ids, mask), next_token_labels(ids, mask), top, 2.0, 0.7)
    assert engine.masked_nonzero() == (0, 0)
    weights = engine.full_fp32_weights(list(engine.prunable))
    pruned = sum(int((~m).sum()) for m in engine.masks.values())
    total = sum(w.numel() for w in weights.values())
    assert pruned == round(0.5 * total)
    for name, mask in engine.masks.items():
        assert int(torch.count_nonzero(weights[name][~mask.cpu()])) == 0, name
