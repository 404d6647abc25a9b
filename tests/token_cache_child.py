"""A token-cache fill in a process of its own, for tests/test_token_cache.py to kill.

    python tests/token_cache_child.py WORK_DIR ROOT [--block-at SHARD]

WORK_DIR holds `teacher/` (a saved causal LM) and `blocks.npz` (input_ids, attention_mask).
With --block-at the fill computes the shards before SHARD, then, asked for SHARD, writes
`WORK_DIR/blocked` and waits forever (until it is killed). At the end it prints the fill's
statistics as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from specs.lm import TokenCacheSpec  # noqa: E402
from trainers.hf_models import load_hf_dir  # noqa: E402
from trainers.token_cache import compress_token_topk, fill_token_cache  # noqa: E402

KEY = "k-test"
SPEC = TokenCacheSpec(k=8, logprobs="int8", shard_size=3)
TEMPERATURE = 2.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("root", type=Path)
    parser.add_argument("--block-at", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same arithmetic in every process: bit-equal shards
    model = load_hf_dir(args.work / "teacher")
    data = np.load(args.work / "blocks.npz")
    ids, mask = data["input_ids"], data["attention_mask"]

    def teacher_topk(start: int, stop: int):
        if args.block_at is not None and start >= args.block_at * SPEC.shard_size:
            (args.work / "blocked").write_text(str(start))
            while True:  # killed here, in the middle of the fill
                time.sleep(60)
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(ids[start:stop]).long(),
                           attention_mask=torch.from_numpy(mask[start:stop]).long()).logits
        return compress_token_topk(logits, SPEC.k, TEMPERATURE)

    _, stats = fill_token_cache(args.root, KEY, num_samples=len(ids), seq_len=ids.shape[1],
                                vocab_size=model.config.vocab_size, spec=SPEC,
                                teacher_topk=teacher_topk)
    print(json.dumps(dataclasses.asdict(stats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
