"""Tiny language models, a corpus and a BPE tokenizer, all built here: no download.

The tests that use them put the Hugging Face Hub offline before transformers is imported, and
`no_network` makes any attempt to open an internet socket fail the test.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

WORDS = ("the cache holds the teacher logits of every token while the student learns to "
         "predict the next word from the words before it and a pruned model keeps only the "
         "weights that matter most for its loss def return class import for in if else").split()
EOS, PAD = "<|endoftext|>", "<pad>"


def corpus(n_docs: int = 40, seed: int = 0) -> list[str]:
    """Documents of 20-60 words drawn from a small vocabulary (deterministic)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
            for _ in range(n_docs)]


def train_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = 320,
                    extra_special: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer trained on `texts`, saved as a transformers tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD, *extra_special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.save_pretrained(str(out_dir))
    return fast


def gpt2_config(vocab_size: int, n_layer: int = 4, n_embd: int = 64, n_head: int = 4, **kw):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                      n_positions=128, bos_token_id=0, eos_token_id=0, **kw)


def llama_config(vocab_size: int, layers: int = 4, hidden: int = 64, heads: int = 4,
                 kv_heads: int = 2, intermediate: int = 128, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads,
                       intermediate_size=intermediate, max_position_embeddings=128,
                       bos_token_id=0, eos_token_id=0, **kw)


def causal_lm(config, seed: int = 0):
    """A randomly initialised causal LM (eval mode), the same for the same seed."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def no_network(monkeypatch):
    """Any connection to an internet address fails the test (local sockets still work)."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: guarded(
        socket.socket(), a[0] if a else k.get("address")))


def write_jsonl(folder: Path, texts: list[str], name: str = "part.jsonl") -> Path:
    """`texts` as one jsonl file, a `{"text": ...}` record per line."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return folder / name


def train_causal_lm(model, input_ids, attention_mask, steps: int, lr: float = 3e-3,
                    batch: int = 8, seed: int = 0):
    """A few steps of next-token cross-entropy in plain torch (AdamW), on random batches of
    (N, L) blocks; returns the model in eval mode."""
    import numpy as np
    import torch

    from trainers.lm_losses import next_token_labels

    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        rows = rng.choice(len(input_ids), batch, replace=False)
        ids = torch.from_numpy(input_ids[rows]).long()
        mask = torch.from_numpy(attention_mask[rows]).long()
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), next_token_labels(ids, mask).flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
