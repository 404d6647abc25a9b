"""The pieces a language-model job adds, without Ray: the prepared token blocks, the teacher
server's top-k answers (what crosses the wire) and scores, the projections a job prunes, a
checkpoint's weights back into the architecture, and the student initialised from the teacher
directory."""

import asyncio
import json

import numpy as np
import pytest
import torch
from tiny_lm import causal_lm, corpus, gpt2_config, llama_config, no_network, train_tokenizer, write_jsonl

from specs import parse_spec
from specs.lm import TextData
from trainers.hf_models import HFModelError, save_hf_dir
from trainers.lm_job import job_model, load_weights_
from trainers.lm_losses import next_token_labels
from trainers.lm_pruning import prunable_projections
from trainers.lm_teacher import (
    LMTeacherReplica,
    TokenTeacherServer,
    bytes_per_position,
    pack_blocks,
    perplexity,
    token_scores,
    topk_dtype,
    unpack_topk,
)
from trainers.text_data import TextDataError, TextDataset, load_text_dataset
from trainers.token_cache import compress_token_topk

__all__ = ["no_network"]
pytestmark = pytest.mark.usefixtures("no_network")
VOCAB = 300


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = corpus(40, seed=3)
    write_jsonl(root / "train", docs[:30])
    write_jsonl(root / "test", docs[30:])
    train_tokenizer(root / "tok", docs[:30], vocab_size=VOCAB)
    return root


@pytest.fixture(scope="module")
def data(corpus_dir):
    spec = TextData(kind="text", train="train/*.jsonl", test="test/*.jsonl", tokenizer="tok",
                    seq_len=16)
    dataset, _ = load_text_dataset(spec, str(corpus_dir))  # relative to the data dir
    return dataset


def _blocks(data, rows):
    return (torch.from_numpy(data.train.input_ids[rows]).long(),
            torch.from_numpy(data.train.attention_mask[rows]).long())


def test_prepared_blocks_round_trip_and_are_checked(data, tmp_path):
    assert data.seq_len == 16 and data.vocab_size == VOCAB and data.train_rows > 20
    saved = data.save(tmp_path / "blocks")
    again = TextDataset.open(tmp_path / "blocks")
    assert again.folder == saved.folder == str(tmp_path / "blocks")
    for split in ("train", "test"):
        a, b = getattr(data, split), getattr(again, split)
        assert np.array_equal(a.input_ids, b.input_ids)
        assert np.array_equal(a.attention_mask, b.attention_mask)
        assert np.array_equal(a.sample_ids, b.sample_ids) and a.documents == b.documents
    assert again.fingerprint() == data.fingerprint()
    assert again.tokenizer_fingerprint == data.tokenizer_fingerprint
    first = (tmp_path / "blocks" / "train.safetensors").stat().st_mtime_ns
    data.save(tmp_path / "blocks")  # the same blocks: nothing rewritten
    assert (tmp_path / "blocks" / "train.safetensors").stat().st_mtime_ns == first
    manifest = json.loads((tmp_path / "blocks" / "manifest.json").read_text())
    manifest["train_digest"] = "0" * 64
    (tmp_path / "blocks" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TextDataError, match="do not match their manifest"):
        TextDataset.open(tmp_path / "blocks")


def test_an_empty_split_is_an_input_error(corpus_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jsonl").write_text("\n")
    spec = TextData(kind="text", train=str(corpus_dir / "train/*.jsonl"),
                    test=str(tmp_path / "empty/*.jsonl"), tokenizer=str(corpus_dir / "tok"))
    with pytest.raises(TextDataError, match="`data.test`: the files hold no text"):
        load_text_dataset(spec)


# ------------------------------------------------------------------------ the teacher server


def test_the_replica_answers_top_k_per_token_not_the_vocabulary(data, tmp_path):
    """What a replica sends back for (B, L) blocks is (B, L) records of k ids, k log-probs and
    the rest: the same values `compress_token_topk` makes from the full logits."""
    teacher = causal_lm(llama_config(VOCAB, layers=2, hidden=32, intermediate=64), seed=1)
    folder = save_hf_dir(teacher, tmp_path / "teacher")
    spec = parse_spec({
        "name": "wire",
        "data": {"kind": "text", "train": "a", "test": "b", "tokenizer": "t", "seq_len": 16},
        "teacher": {"kind": "checkpoint", "model": {"kind": "hf", "path": str(folder)}},
        "student": {"model": {"kind": "hf", "path": str(folder)}},
        "distillation": {"kind": "forward_kl", "temperature": 2.0},
        "logits": {"mode": "online", "tokens": {"k": 8}},
    })
    replica = LMTeacherReplica(spec.model_dump_json(), str(folder), "digest")
    rows = np.arange(5)
    source = pack_blocks(data.train.input_ids, data.train.attention_mask)  # (N, 2, L) int32
    answer = asyncio.run(replica.logits(source[rows]))
    assert answer.dtype == topk_dtype(8) and answer.shape == (5, 16)
    assert answer.nbytes == 5 * 16 * bytes_per_position(8) == 5 * 16 * (8 * 8 + 4)
    assert answer.nbytes < 5 * 16 * VOCAB * 4 / 8  # far less than the float32 logits
    ids, logprobs, rest = unpack_topk(answer)
    with torch.no_grad():
        logits = teacher(*_blocks(data, rows)).logits
    e_ids, e_logprobs, e_rest = compress_token_topk(logits, 8, 2.0)
    assert np.array_equal(ids, e_ids.numpy())
    # the same forward in the same process: equal up to float32 summation order
    assert np.allclose(logprobs, e_logprobs.numpy(), rtol=0, atol=1e-5)
    assert np.allclose(rest, e_rest.numpy(), rtol=0, atol=1e-5)


def test_server_chunks_give_the_same_answer_and_k_stops_at_the_vocabulary(data, monkeypatch):
    model = causal_lm(llama_config(VOCAB, layers=1, hidden=32, intermediate=64), seed=2)
    x = pack_blocks(data.train.input_ids[:6], data.train.attention_mask[:6])
    whole = TokenTeacherServer(model, "fp32", k=4096, temperature=1.0).topk(x)
    assert whole.dtype == topk_dtype(VOCAB)  # k = vocabulary: the whole distribution
    assert np.all(np.isneginf(whole["rest"]))
    import trainers.lm_teacher as lm_teacher

    monkeypatch.setattr(lm_teacher, "MAX_LOGITS_PER_FORWARD", 2 * 16 * VOCAB)  # 2 rows a forward
    chunked = TokenTeacherServer(model, "fp32", k=4096, temperature=1.0).topk(x)
    assert np.array_equal(whole["ids"], chunked["ids"])
    assert np.allclose(whole["logprobs"], chunked["logprobs"], rtol=0, atol=1e-5)


def test_scores_are_perplexity_and_next_token_accuracy_over_real_targets(data):
    model = causal_lm(llama_config(VOCAB, layers=1, hidden=32, intermediate=64), seed=3)
    ids, mask = _blocks(data, np.arange(len(data.train.input_ids) - 3, len(data.train.input_ids)))
    assert int(mask.sum()) < mask.numel()  # the last block is padded
    nll, correct, count = token_scores(model, ids, mask)
    labels = next_token_labels(ids, mask)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
    assert count == int(keep.sum())
    assert nll == pytest.approx(float(expected), rel=1e-6)  # summed in another order
    assert correct == int((logits.argmax(-1)[keep] == labels[keep]).sum())
    ppl, acc = perplexity(np.array([nll, correct, count]))
    assert ppl == pytest.approx(np.exp(nll / count)) and acc == correct / count


# ---------------------------------------------------------------------------- pruning, weights


def _pruning(**fields):
    spec = parse_spec({
        "name": "p", "data": {"kind": "text", "train": "a", "test": "b", "tokenizer": "t"},
        "teacher": {"kind": "train", "model": {"kind": "hf", "config": {"model_type": "llama"}}},
        "student": {"model": {"kind": "hf", "config": {"model_type": "llama"}}},
        "pruning": fields,
    })
    return spec.pruning


def test_a_job_prunes_the_projections_and_what_the_spec_adds():
    model = causal_lm(llama_config(VOCAB, layers=2, hidden=32, intermediate=64))
    names = set(prunable_projections(model, _pruning()))
    assert names == {f"model.layers.{i}.{part}.weight" for i in (0, 1) for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    more = set(prunable_projections(model, _pruning(embeddings=True, lm_head=True)))
    assert more - names == {"model.embed_tokens.weight", "lm_head.weight"}
    mlp = set(prunable_projections(model, _pruning(layers=["*.mlp.*"])))
    assert mlp == {n for n in names if ".mlp." in n}
    with pytest.raises(ValueError, match="matches no projection"):
        prunable_projections(model, _pruning(layers=["*.attn.*"]))
    tied = causal_lm(gpt2_config(VOCAB, n_layer=1))  # the head is the embedding matrix
    assert set(prunable_projections(tied, _pruning(embeddings=True, lm_head=True))) == {
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
        "transformer.wte.weight"}


def test_checkpoint_weights_load_back_with_their_ties():
    model = causal_lm(gpt2_config(VOCAB, n_layer=1), seed=4)
    # what the engine saves: named parameters (each tensor once) and the buffers
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state.update({n: b.clone() for n, b in model.named_buffers()})
    assert "lm_head.weight" not in state
    again = load_weights_(causal_lm(gpt2_config(VOCAB, n_layer=1), seed=5), state)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(HFModelError, match="lacks weights"):
        load_weights_(causal_lm(gpt2_config(VOCAB, n_layer=1)),
                      {k: v for k, v in state.items() if k != "transformer.ln_f.weight"})
    with pytest.raises(HFModelError, match="the model lacks"):
        load_weights_(causal_lm(gpt2_config(VOCAB, n_layer=1)), {**state, "extra.w": ids})


def test_the_student_starts_from_the_teacher_directory(tmp_path):
    teacher = causal_lm(llama_config(VOCAB, layers=3, hidden=32, intermediate=64), seed=6)
    folder = save_hf_dir(teacher, tmp_path / "teacher")
    config = {**llama_config(VOCAB, layers=2, hidden=32, intermediate=64).to_diff_dict(),
              "model_type": "llama"}
    spec = parse_spec({
        "name": "init", "data": {"kind": "text", "train": "a", "test": "b", "tokenizer": "t"},
        "teacher": {"kind": "checkpoint", "model": {"kind": "hf", "path": str(folder)}},
        "student": {"model": {"kind": "hf", "config": config,
                              "init": {"from_teacher": True, "layers": [0, 2]}}},
    })
    student, record = job_model(spec, "student", tmp_path)
    assert student.training
    assert record["layers"] == [0, 2] and record["kept"] == []
    assert record["copied"] == len(student.state_dict())  # every tensor came from the teacher
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.layers.1.mlp.up_proj.weight"], t["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(s["lm_head.weight"], t["lm_head.weight"])
    resumed, none = job_model(spec, "student", tmp_path, resumed=True)  # weights come later
    assert none is None
    assert not torch.equal(resumed.state_dict()["lm_head.weight"], t["lm_head.weight"])
