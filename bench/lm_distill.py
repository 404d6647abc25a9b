"""Language-model distillation benchmark on a corpus every machine has: the Python standard
library's source files of the running interpreter.

Not a test and not run in CI: it trains a teacher and seven students on two CPU cores (about 25
minutes). Every model is trained by stillhouse jobs (`orchestrator.job.run_job`, the driver of
`stillhouse run`), all on one embedded local Ray cluster, from `examples/lm-stdlib.yaml`:

0. the corpus: the standard library's top-level `.py` files, sorted, every 10th file in the
   test split (a split by file), the first `--max-files` of them; a byte-level BPE tokenizer
   (the `tokenizers` library) trained on the training split (scripts/lm_stdlib_files.py);
1. `distilled-s0`: the example as it is, without pruning: the 4-block Llama teacher trained in
   the job, then the 2-block student (half the width, random initial weights) distilled
   online by forward KL against the teacher's whole distribution (`logits.tokens.k` = the
   vocabulary, sent by the teacher replicas every step): full-logit distillation;
2. `cached-s0`: the same student, seed 0, distilled from the top-k token cache (k = `--topk`,
   at most 64; the missing mass as the `tail` bucket), filled once by the teacher replicas from
   job 1's teacher (its Hugging Face directory, a `checkpoint` teacher); then pruned by global
   magnitude over the attention and MLP projections through `--prune` (at least 50%), with a
   distilled fine-tuning epoch after each round;
3. `alone-s0`, `alone-s1`: the student trained alone (`distillation.alpha: 0`: next-token
   cross-entropy only) with seeds 0 and 1 (initial weights and data order), reading the same
   cache (whose top-k then weighs nothing);
4. `distilled-s1`: as job 1 with seed 1, the teacher loaded from job 1's directory;
   `cached-s1`: as job 2 with seed 1, from the same cache, without pruning.

Every student trains for the same `--student-epochs` with the same learning rate and batch
size; only the loss and the seed differ. Perplexity is exp of the mean next-token negative
log-likelihood over the test split's real tokens.

    .venv/bin/python bench/lm_distill.py --json bench/results/lm_distill.json
    .venv/bin/python bench/lm_distill.py --quick --json /tmp/lm-smoke.json   # minutes, tiny

With `--json FILE` it writes one JSON object:

    teacher_ppl              the teacher's test perplexity
    student_alone_ppl        the student alone, seed 0 (`student_alone_ppl_seeds`: every seed)
    student_distilled_ppl    the student distilled online from the whole distribution, seed 0
                             (`student_distilled_ppl_seeds`: every seed)
    cached_student_ppl       the student distilled from the top-k cache, seed 0
    cache_bytes_per_token    the cache's stored bytes per token position (ids, log-probs, rest;
                             `cache_file_bytes_per_token` with the shard headers)
    pruned                   per pruning round of the cached student: target_sparsity, sparsity
                             (share of zero projection weights), ppl
    tokens_per_s             tokens trained per second by the 2 workers, online distillation
                             (`tokens_per_s_cached`: from the cache)
    wall_seconds             wall time of this invocation
    seed_spread              the largest |seed 0 - seed 1| perplexity difference of the alone
                             and the distilled students
    distillation_margin      mean alone perplexity - mean distilled perplexity
    goal_distillation        margin > seed_spread
    topk_vs_full             |mean cached - mean distilled| / mean distilled over the seeds
                             (`topk_vs_full_seeds`: per seed, the same seed's two students;
                             `cached_student_ppl_seeds`); goal_topk: <= 0.02

and `exported` (the final pruned student's Hugging Face and int8 directories: bytes, perplexity),
`corpus`, `config` and `run_dirs`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script: make `specs`, `orchestrator` importable
    sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(PROJECT_ROOT / "scripts"))

import yaml  # noqa: E402

from specs import parse_spec  # noqa: E402

EXAMPLE = PROJECT_ROOT / "examples" / "lm-stdlib.yaml"


def _base(args: argparse.Namespace, data_root: Path, vocab: int) -> dict:
    """The example spec with this invocation's data, epochs and sizes."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["data"].update(train=str(data_root / "train/*.jsonl"), test=str(data_root / "test/*.jsonl"),
                       tokenizer=str(data_root / "tokenizer"), seq_len=args.seq_len)
    for section in ("teacher", "student"):
        raw[section]["model"]["config"].update(vocab_size=vocab,
                                               max_position_embeddings=args.seq_len)
    raw["teacher"]["epochs"] = args.teacher_epochs
    raw["student"]["epochs"] = args.student_epochs
    for section in ("teacher", "student"):  # more, smaller steps than the example's
        raw[section]["batch_size"] = args.batch_size
    raw["logits"]["tokens"]["k"] = vocab  # the whole distribution
    raw["pruning"] = {"enabled": False}
    raw["quantization"] = {"method": "none"}
    raw["wandb"] = {"mode": "offline", "group": args.run_name}
    if args.quick:  # a smoke run: tiny models
        raw["teacher"]["model"]["config"].update(hidden_size=64, intermediate_size=128)
        raw["student"]["model"]["config"].update(hidden_size=32, intermediate_size=64)
    return raw


def _from_teacher(raw: dict, teacher_dir: Path) -> dict:
    raw = copy.deepcopy(raw)
    raw["teacher"] = {"kind": "checkpoint", "model": {"kind": "hf", "path": str(teacher_dir)}}
    return raw


def _cached(raw: dict, args: argparse.Namespace, cache_dir: Path) -> dict:
    raw = copy.deepcopy(raw)
    raw["logits"] = {"mode": "topk", "tokens": {"k": args.topk, "missing_mass": "tail",
                                                "cache_dir": str(cache_dir)}}
    # the replicas fill the cache and leave; the workers then take both cores
    raw["resources"].update(teacher_replicas=2, teacher_cpus=1.0, student_cpus=1.0)
    return raw


def _ppl(report: dict) -> float:
    return report["dense_student"]["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--work-dir", type=Path, default=PROJECT_ROOT / "runs" / "lm-bench")
    parser.add_argument("--run-name", default=time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--max-files", type=int, default=55,
                        help="first N standard-library files (every 10th is a test file)")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per worker")
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--student-epochs", type=int, default=2,
                        help="every student's dense epochs (1: the students stay undertrained, "
                        "and the top-k cache's missing tail costs more; see the README)")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--prune", default="0.3,0.5", help="sparsity after each round")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the alone and "
                        "distilled students (at least 2 for a spread)")
    parser.add_argument("--quick", action="store_true", help="tiny models and data (smoke run)")
    args = parser.parse_args()
    if args.topk > 64:
        parser.error("--topk: at most 64")
    targets = [float(t) for t in args.prune.split(",")]
    if args.quick:
        args.max_files = min(args.max_files, 20)

    from cluster.local import CURRENT, embedded_cluster
    from orchestrator.job import run_job
    from lm_stdlib_files import write_corpus

    started = time.perf_counter()
    work = args.work_dir / args.run_name
    data_root = args.work_dir / f"stdlib-{args.max_files}-v{args.vocab}"
    if not (data_root / "corpus.json").is_file():
        write_corpus(data_root, args.vocab, 10, args.max_files)
    corpus = json.loads((data_root / "corpus.json").read_text())
    base = _base(args, data_root, corpus["vocab_size"])
    runs: dict[str, Path] = {}
    reports: dict[str, dict] = {}

    def job(name: str, raw: dict, seed: int) -> dict:
        raw = copy.deepcopy(raw)
        raw.update(name=f"lm-{name}", seed=seed)
        runs[name] = work / name
        print(f"[bench] {name}", flush=True)
        reports[name] = run_job(parse_spec(raw), run_dir=str(runs[name]), address=CURRENT)
        return reports[name]

    with embedded_cluster(parse_spec(base)):
        job("distilled-s0", base, 0)
        teacher_dir = runs["distilled-s0"] / "teacher-hf"
        loaded = _from_teacher(base, teacher_dir)
        cached = _cached(loaded, args, work / "token-cache")
        cached_pruned = copy.deepcopy(cached)
        cached_pruned["pruning"] = {
            "target_sparsity": targets[-1], "rounds": len(targets), "finetune_epochs": 1,
            "schedule": {"kind": "explicit", "sparsities": targets}}
        cached_pruned["quantization"] = {"method": "int8_weights"}
        job("cached-s0", cached_pruned, 0)
        alone = copy.deepcopy(cached)
        alone["distillation"]["alpha"] = 0.0
        for seed in range(args.seeds):
            job(f"alone-s{seed}", alone, seed)
        for seed in range(1, args.seeds):
            job(f"distilled-s{seed}", loaded, seed)
            job(f"cached-s{seed}", cached, seed)  # the cache is filled: it is read, not refilled

    alone_ppl = [_ppl(reports[f"alone-s{s}"]) for s in range(args.seeds)]
    distilled_ppl = [_ppl(reports[f"distilled-s{s}"]) for s in range(args.seeds)]
    spread = max(max(alone_ppl) - min(alone_ppl), max(distilled_ppl) - min(distilled_ppl))
    margin = sum(alone_ppl) / len(alone_ppl) - sum(distilled_ppl) / len(distilled_ppl)
    cached_report = reports["cached-s0"]
    cached_ppl = [_ppl(reports[f"cached-s{s}"]) for s in range(args.seeds)]
    mean_distilled = sum(distilled_ppl) / len(distilled_ppl)
    topk_vs_full = abs(sum(cached_ppl) / len(cached_ppl) - mean_distilled) / mean_distilled
    export = cached_report["export"]
    result = {
        "teacher_ppl": reports["distilled-s0"]["teacher"]["perplexity"],
        "student_alone_ppl": alone_ppl[0],
        "student_distilled_ppl": distilled_ppl[0],
        "cached_student_ppl": _ppl(cached_report),
        "cache_bytes_per_token": cached_report["token_cache"]["bytes_per_token"],
        "cache_file_bytes_per_token": cached_report["token_cache"]["file_bytes_per_token"],
        "pruned": [{"target_sparsity": r["target_sparsity"], "sparsity": r["sparsity"],
                    "ppl": r["perplexity"]} for r in cached_report["rounds"]],
        "tokens_per_s": reports["distilled-s0"]["tokens_per_s"],
        "tokens_per_s_cached": cached_report["tokens_per_s"],
        "wall_seconds": time.perf_counter() - started,
        "student_alone_ppl_seeds": alone_ppl,
        "student_distilled_ppl_seeds": distilled_ppl,
        "seed_spread": spread,
        "distillation_margin": margin,
        "goal_distillation": margin > spread,
        "topk_vs_full": topk_vs_full,
        "topk_vs_full_seeds": [abs(c - d) / d for c, d in zip(cached_ppl, distilled_ppl)],
        "cached_student_ppl_seeds": cached_ppl,
        "goal_topk": topk_vs_full <= 0.02,
        "teacher_accuracy": reports["distilled-s0"]["teacher"]["accuracy"],
        "exported": {"hf_dir_bytes": export["file_bytes"], "hf_ppl": export["perplexity"],
                     "int8_dir_bytes": export["int8"]["file_bytes"],
                     "int8_ppl": export["int8"]["perplexity"],
                     "dense_file_bytes": export["dense_file_bytes"]},
        "corpus": {**corpus, **{k: reports["distilled-s0"]["data"][k] for k in
                                ("train_tokens", "test_tokens", "train_rows", "seq_len")}},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "run_dirs": {k: str(v) for k, v in runs.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
