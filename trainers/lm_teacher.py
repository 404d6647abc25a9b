"""A language-model teacher as a service: top-k per token on the wire, and its test scores.

`TokenTeacherServer` is the plain object (no Ray): a causal LM in inference mode that turns token
blocks into the teacher's top-k per token (the k most probable ids, their log-probabilities at
the distillation temperature T, and the log of the mass outside them, exactly as the token cache
stores them), so that (batch, seq, k) leaves a replica instead of (batch, seq, vocab).
`LMTeacherReplica` is the Ray actor around it: the image teacher's replica with another server,
so the pool, its client (requests in flight, failover) and the request batching are the same.

Wire format, one row per sequence, both ways a single NumPy array (so that `RequestBatcher`
concatenates requests and splits answers by rows):

    request   (B, 2, L) int32       input ids, then the attention mask (1 = real token)
    answer    (B, L) structured     ids (k,) int32, logprobs (k,) float32, rest float32

    blocks = pack_blocks(input_ids, attention_mask)        # (B, 2, L)
    ids, logprobs, rest = unpack_topk(server.topk(blocks))  # (B, L, k), (B, L, k), (B, L)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainers.teacher_pool import TeacherReplica

# A forward's logits are (rows, L, V) float32 and log_softmax makes a second copy: rows are
# taken in chunks of at most this many logits so that a large request (or many students'
# requests batched together) does not hold gigabytes at once.
MAX_LOGITS_PER_FORWARD = 1 << 24  # 64 MiB of float32


def topk_dtype(k: int) -> np.dtype:
    """One position's answer: the teacher's top-k ids and log-probabilities, and `rest`."""
    return np.dtype([("ids", np.int32, (k,)), ("logprobs", np.float32, (k,)),
                     ("rest", np.float32)])


def pack_blocks(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """(B, L) ids and (B, L) mask -> the (B, 2, L) int32 request rows."""
    return np.ascontiguousarray(np.stack([input_ids, attention_mask], axis=1).astype(np.int32))


def pack_topk(ids: torch.Tensor, logprobs: torch.Tensor, rest: torch.Tensor) -> np.ndarray:
    """(B, L, k) ids, (B, L, k) log-probs, (B, L) rest -> the (B, L) structured answer."""
    out = np.empty(tuple(rest.shape), dtype=topk_dtype(ids.shape[-1]))
    out["ids"] = ids.cpu().numpy()
    out["logprobs"] = logprobs.float().cpu().numpy()
    out["rest"] = rest.float().cpu().numpy()
    return out


def unpack_topk(answer: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The structured answer -> ids (B, L, k) int64, logprobs (B, L, k) float32, rest (B, L)
    float32: what `TokenCache.topk` returns too."""
    return (answer["ids"].astype(np.int64), np.ascontiguousarray(answer["logprobs"]),
            np.ascontiguousarray(answer["rest"]))


def bytes_per_position(k: int) -> int:
    """Bytes of the answer per token position (the wire's share of the top-k)."""
    return topk_dtype(k).itemsize


@torch.no_grad()
def token_scores(model: nn.Module, input_ids: torch.Tensor,  # (B, L) int64
                 attention_mask: torch.Tensor,  # (B, L)
                 autocast: bool = False) -> np.ndarray:
    """(3,) float64: the summed next-token negative log-likelihood, the number of positions
    whose most probable token is the next one, and the number of predicted positions (targets
    that are real tokens). Perplexity is exp(sum / count), next-token accuracy correct / count."""
    from trainers.lm_losses import IGNORE_INDEX, next_token_labels

    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits.float()  # (B, L, V)
    labels = next_token_labels(input_ids, attention_mask)  # (B, L)
    keep = labels != IGNORE_INDEX
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                      ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((logits.argmax(-1) == labels) & keep).sum()
    return np.array([float(nll), float(correct), float(keep.sum())], dtype=np.float64)


def perplexity(scores: np.ndarray) -> tuple[float, float]:
    """(perplexity, next-token accuracy) from summed `token_scores`."""
    nll, correct, count = (float(v) for v in scores)
    count = max(count, 1.0)
    return float(np.exp(nll / count)), correct / count


class TokenTeacherServer:
    """Holds a causal LM in inference mode; answers top-k per token and test scores."""

    def __init__(self, model: nn.Module, precision: str, k: int, temperature: float,
                 device: torch.device | None = None):
        """`k` larger than the vocabulary keeps the whole distribution (k = vocabulary)."""
        self.device = device if device is not None else torch.device("cpu")
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.autocast = precision != "fp32"  # bf16 under autocast, as the image teacher
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.k = min(k, self.vocab_size)
        self.temperature = temperature

    def _rows(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        with warnings.catch_warnings():
            # arrays from Ray's object store are read-only views; the model only reads them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(np.asarray(x)).to(self.device)
        return t[:, 0].long(), t[:, 1].long()  # (B, L) each

    def _chunks(self, n: int, seq_len: int):
        rows = max(1, MAX_LOGITS_PER_FORWARD // max(1, seq_len * self.vocab_size))
        return [(i, min(n, i + rows)) for i in range(0, n, rows)]

    @torch.inference_mode()
    def topk(self, x: np.ndarray) -> np.ndarray:
        """(B, 2, L) request rows -> the (B, L) structured top-k answer (see the module
        docstring), from log_softmax in float32 (trainers/token_cache.py)."""
        from trainers.token_cache import compress_token_topk

        ids, mask = self._rows(x)
        parts = []
        for lo, hi in self._chunks(len(ids), ids.shape[1]):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(input_ids=ids[lo:hi], attention_mask=mask[lo:hi]).logits
            parts.append(pack_topk(*compress_token_topk(logits, self.k, self.temperature)))
        return np.concatenate(parts)

    def score(self, x: np.ndarray) -> np.ndarray:
        """(B, 2, L) request rows -> summed (nll, correct, count), see `token_scores`."""
        ids, mask = self._rows(x)
        total = np.zeros(3, dtype=np.float64)
        for lo, hi in self._chunks(len(ids), ids.shape[1]):
            total += token_scores(self.model, ids[lo:hi], mask[lo:hi], self.autocast)
        return total


def server_fingerprint(teacher_digest: str, precision: str, k: int, temperature: float) -> str:
    """What an LM replica serves: the teacher directory's digest, the precision, and the top-k
    it answers (k and T): a shared pool serves only jobs that want the same answers."""
    return f"{teacher_digest[:16]}-{precision}-k{k}-T{temperature:g}"


class LMTeacherReplica(TeacherReplica):
    """One replica of a language-model teacher. `logits` / `logits_rows` (what the pool client
    calls) answer the top-k per token of (B, 2, L) request rows; `score` answers test scores."""

    def __init__(self, spec_json: str, teacher_dir: str, teacher_digest: str):
        """`teacher_dir`: the teacher's Hugging Face directory, on storage every node sees; a
        restarted replica loads it again (no constructor argument lives in the object store)."""
        from specs import JobSpec
        from specs.lm import HFModel
        from trainers.device import teacher_device
        from trainers.hf_models import build_hf_model
        from trainers.teacher_server import RequestBatcher

        spec = JobSpec.model_validate_json(spec_json)
        torch.set_num_threads(max(1, int(spec.resources.teacher_cpus)))
        model = build_hf_model(HFModel(kind="hf", path=str(Path(teacher_dir))))
        tokens = spec.logits.tokens
        self.server = TokenTeacherServer(model, spec.teacher_precision, tokens.k,
                                         spec.distillation.temperature,
                                         device=teacher_device(spec))
        self.fingerprint = server_fingerprint(teacher_digest, spec.teacher_precision, tokens.k,
                                              spec.distillation.temperature)
        self.batcher = RequestBatcher(self.server.topk, spec.resources.teacher_max_batch,
                                      spec.resources.teacher_max_wait_ms / 1000.0)
        self.served = 0
        self._sources = {}

    async def score(self, x: np.ndarray) -> np.ndarray:
        return self.server.score(x)
