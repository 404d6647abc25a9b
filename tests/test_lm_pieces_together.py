"""The language-model pieces in the order a job uses them, in one process without Ray: text
blocks, a teacher trained here, a student from its blocks, a top-k cache, distillation from
the cache by sample id, pruning, and export reloaded by transformers."""

import json
import math

import numpy as np
import pytest
import torch
from tiny_lm import corpus, llama_config, no_network, train_tokenizer

from specs.lm import ForwardKL, HFModel, TextData, TokenCacheSpec
from trainers.hf_models import (
    build_hf_model,
    load_hf_dir,
    model_dir_digest,
    quantize_int8_,
    save_hf_dir,
    save_int8_dir,
)
from trainers.lm_losses import lm_topk_kd_loss, next_token_labels
from trainers.lm_pruning import plan_structured, prune_global_magnitude_, shrink, structured_masks
from trainers.pruning import apply_masks_
from trainers.text_data import (
    check_tokenizers_agree,
    load_text_split,
    load_tokenizer,
    tokenizer_fingerprint,
)
from trainers.token_cache import TokenCache, compress_token_topk, fill_token_cache, token_cache_key

__all__ = ["no_network"]
pytestmark = pytest.mark.usefixtures("no_network")


def _batch(blocks, rows):
    ids = torch.from_numpy(blocks.input_ids[rows]).long()
    mask = torch.from_numpy(blocks.attention_mask[rows]).long()
    return ids, mask, next_token_labels(ids, mask)


def _perplexity(model, blocks):
    with torch.no_grad():
        ids, mask, labels = _batch(blocks, np.arange(len(blocks.input_ids)))
        logits = model(input_ids=ids, attention_mask=mask).logits
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                labels.reshape(-1), ignore_index=-100)
    return math.exp(nll.item())


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is faster than two contending with each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_teacher_cache_distil_prune_export(tmp_path, one_thread):
    torch.manual_seed(0)
    docs = corpus(80, seed=1)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    for split, chunk in (("train", docs[:70]), ("test", docs[70:])):
        with open(tmp_path / split / "part.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in chunk)
    train_tokenizer(tmp_path / "tok", docs[:70], vocab_size=300)
    spec = TextData(kind="text", train=str(tmp_path / "train/*.jsonl"),
                    test=str(tmp_path / "test/*.jsonl"), tokenizer=str(tmp_path / "tok"),
                    seq_len=32)
    tokenizer = load_tokenizer(spec.tokenizer)
    check_tokenizers_agree(tokenizer, load_tokenizer(spec.tokenizer))
    train, test = load_text_split(spec, "train", tokenizer), load_text_split(spec, "test", tokenizer)

    # teacher: a 4-block Llama trained here for some steps of next-token CE
    teacher = build_hf_model(HFModel(kind="hf", config={
        **llama_config(len(tokenizer), hidden=32, intermediate=64).to_diff_dict(),
        "model_type": "llama"})).train()
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(80):
        ids, mask, labels = _batch(train, rng.choice(len(train.input_ids), 8))
        loss = torch.nn.functional.cross_entropy(
            teacher(input_ids=ids, attention_mask=mask).logits.flatten(0, 1), labels.flatten(),
            ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()
    teacher_dir = save_hf_dir(teacher, tmp_path / "teacher", tokenizer=tokenizer)
    teacher_ppl = _perplexity(teacher, test)
    assert teacher_ppl < len(tokenizer) / 4  # it learned something of the corpus

    # the top-k cache, keyed by what it depends on
    topk = TokenCacheSpec(k=16, logprobs="int8", shard_size=16)
    loss_spec = ForwardKL(kind="forward_kl", temperature=1.0, alpha=0.9)
    key = token_cache_key(teacher_digest=model_dir_digest(teacher_dir),
                          data_digest=train.digest(),
                          tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                          seq_len=spec.seq_len, spec=topk, vocab_size=len(tokenizer),
                          temperature=loss_spec.temperature, precision="fp32")

    def teacher_topk(start, stop):
        ids, mask, _ = _batch(train, np.arange(start, stop))
        with torch.no_grad():
            logits = teacher(input_ids=ids, attention_mask=mask).logits
        return compress_token_topk(logits, topk.k, loss_spec.temperature)

    _, stats = fill_token_cache(tmp_path / "cache", key, num_samples=len(train.input_ids),
                                seq_len=spec.seq_len, vocab_size=len(tokenizer), spec=topk,
                                teacher_topk=teacher_topk)
    assert stats.bytes_per_token == 16 * 2 + 16 + 8
    cache = TokenCache.open(tmp_path / "cache", key, topk.max_shards_in_memory)

    # student: blocks 0 and 3 of the teacher, distilled from the cache in shuffled batches
    student = build_hf_model(HFModel(kind="hf", config={
        **llama_config(len(tokenizer), layers=2, hidden=32, intermediate=64).to_diff_dict(),
        "model_type": "llama"},
        init={"from_teacher": True, "layers": [0, 3]}), teacher).train()
    initial_ppl = _perplexity(student, test)
    opt = torch.optim.AdamW(student.parameters(), lr=2e-3)
    kd_terms = []
    for _ in range(40):
        rows = rng.choice(len(train.input_ids), 8, replace=False)
        ids, mask, labels = _batch(train, rows)
        top_ids, top_logp, rest = cache.topk(train.sample_ids[rows])
        loss, parts = lm_topk_kd_loss(student(input_ids=ids, attention_mask=mask).logits,
                                      torch.from_numpy(top_ids), torch.from_numpy(top_logp),
                                      labels, loss_spec, topk.missing_mass,
                                      torch.from_numpy(rest))
        opt.zero_grad()
        loss.backward()
        opt.step()
        kd_terms.append(parts["kd"].item())
    student.eval()
    assert np.mean(kd_terms[-10:]) < 0.7 * np.mean(kd_terms[:5])
    distilled_ppl = _perplexity(student, test)
    assert distilled_ppl < initial_ppl

    # prune: half the projection weights by global magnitude, then a quarter of the neurons
    prune_global_magnitude_(student, 0.5)
    plan = plan_structured(student, mlp_sparsity=0.25, head_sparsity=0.5)
    apply_masks_(dict(student.named_parameters()), structured_masks(student, plan))
    small = shrink(student, plan)
    assert small.config.intermediate_size == 48 and small.config.num_key_value_heads == 1

    # export: an HF directory and int8 compressed-tensors, both loaded back by transformers
    ids, mask, _ = _batch(test, np.arange(4))
    out = load_hf_dir(save_hf_dir(small, tmp_path / "student", tokenizer=tokenizer))
    with torch.no_grad():
        reference = student(input_ids=ids, attention_mask=mask).logits
        # bit-equal in practice; 1e-5: the shrunk model sums fewer exact zeros
        assert torch.allclose(out(input_ids=ids, attention_mask=mask).logits, reference,
                              rtol=0, atol=1e-5)
        quantize_int8_(small)
        quantized = small(input_ids=ids, attention_mask=mask).logits
        int8 = load_hf_dir(save_int8_dir(small, tmp_path / "student-int8", tokenizer=tokenizer))
        assert torch.allclose(int8(input_ids=ids, attention_mask=mask).logits, quantized,
                              rtol=0, atol=1e-6)  # the same int8 values and scales
