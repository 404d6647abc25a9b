"""Language-model jobs through the `stillhouse` command on real Ray clusters with real DeepSpeed:
a causal-LM teacher trained here and saved with `save_pretrained`, a student initialised from
its blocks and distilled over 2 workers, online (the replicas answer the top-k per token) and
from the top-k token cache (a fill killed midway resumes without recomputing its finished
shards), pruned by global magnitude or by whole neurons and attention groups, exported as
Hugging Face directories that transformers loads back with the student's logits."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_job_ray import ROOT, STILLHOUSE, _env, assert_nothing_left, check_pruned_checkpoints, run_cli
from tiny_lm import causal_lm, corpus, llama_config, train_causal_lm, train_tokenizer, write_jsonl
from wandb_file import job_history

pytestmark = pytest.mark.ray
VOCAB, SEQ = 300, 32


def _config(layers: int) -> dict:
    return {**llama_config(VOCAB, layers=layers, hidden=32, intermediate=64).to_diff_dict(),
            "model_type": "llama"}


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory) -> Path:
    """Text, a BPE tokenizer, and a 4-block Llama teacher trained here (plain torch, about a
    second per 50 steps) saved with its tokenizer by `save_pretrained`."""
    from specs.lm import TextData
    from trainers.hf_models import save_hf_dir
    from trainers.text_data import load_text_dataset

    root = tmp_path_factory.mktemp("lm-job")
    docs = corpus(120, seed=1)
    write_jsonl(root / "train", docs[:100])
    write_jsonl(root / "test", docs[100:])
    tokenizer = train_tokenizer(root / "tok", docs[:100], vocab_size=VOCAB)
    data, _ = load_text_dataset(TextData(kind="text", train=str(root / "train/*.jsonl"),
                                         test=str(root / "test/*.jsonl"),
                                         tokenizer=str(root / "tok"), seq_len=SEQ))
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher = train_causal_lm(causal_lm(llama_config(VOCAB, layers=4, hidden=32,
                                                         intermediate=64)),
                                  data.train.input_ids, data.train.attention_mask, steps=150)
    finally:
        torch.set_num_threads(threads)
    save_hf_dir(teacher, root / "teacher", tokenizer=tokenizer)
    return root


def _spec(root: Path, name: str, **changes) -> dict:
    spec = {
        "name": name, "seed": 0,
        "data": {"kind": "text", "train": str(root / "train/*.jsonl"),
                 "test": str(root / "test/*.jsonl"), "tokenizer": str(root / "tok"),
                 "seq_len": SEQ},
        "teacher": {"kind": "checkpoint", "model": {"kind": "hf", "path": str(root / "teacher")}},
        "student": {"model": {"kind": "hf", "config": _config(2),
                              "init": {"from_teacher": True, "layers": [0, 3]}},
                    "epochs": 2, "lr": 0.002, "batch_size": 8},
        "distillation": {"kind": "forward_kl", "temperature": 1.0, "alpha": 0.9},
        "pruning": {"target_sparsity": 0.5, "rounds": 1, "finetune_epochs": 1,
                    "schedule": {"kind": "oneshot"}},
        "quantization": {"method": "int8_weights"},
        "deepspeed": {"zero_stage": 1},
        # a long placement timeout: on a loaded machine the replicas' imports alone can take
        # a minute
        "resources": {"teacher_replicas": 2, "teacher_cpus": 0.5, "student_workers": 2,
                      "student_cpus": 0.5, "teacher_request_rows": 8,
                      "placement_timeout_s": 300},
        "wandb": {"mode": "offline", "group": name, "log_every_steps": 5},
    }
    spec.update(changes)
    return spec


def _write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _logits(model, data, rows: int = 6) -> torch.Tensor:
    ids, mask = next(data.test_batches(rows))
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids),
                     attention_mask=torch.from_numpy(mask)).logits.float()


def _check_exports(run_dir: Path, report: dict, shrunk: bool = False) -> None:
    """transformers loads both directories on its own; the fp32 one gives the logits of the
    student the last checkpoint holds, the int8 one those of that student quantized here. With
    `shrunk` (structured pruning) the directories hold a smaller model than the checkpoint's
    masked one, which sums fewer zeros: the tolerance is then relative to the largest logit."""
    import copy

    from transformers import AutoModelForCausalLM

    from specs import load_spec
    from trainers.hf_models import build_hf_model, quantize_int8_
    from trainers.lm_export import FP32_TOLERANCE, INT8_TOLERANCE
    from trainers.lm_job import TEXT_DATA, fresh, load_weights_
    from trainers.text_data import TextDataset

    spec = load_spec(run_dir / "spec.yaml")
    data = TextDataset.open(run_dir / TEXT_DATA)
    last = sorted((run_dir / "checkpoints").glob("student-*"))[-1]
    student = load_weights_(build_hf_model(fresh(spec.student.model)),
                            load_file(str(last / "model.safetensors")))
    reference = _logits(student, data)
    hf = AutoModelForCausalLM.from_pretrained(str(run_dir / "student-hf"), local_files_only=True,
                                              use_safetensors=True).eval()
    # the same fp32 weights and class: equal up to the stated tolerance (1e-5)
    scale = max(1.0, float(reference.abs().max())) if shrunk else 1.0
    assert (_logits(hf, data) - reference).abs().max() <= FP32_TOLERANCE * scale
    quantized = copy.deepcopy(student)
    quantize_int8_(quantized)
    q_reference = _logits(quantized, data)
    int8 = AutoModelForCausalLM.from_pretrained(str(run_dir / "student-int8"),
                                                local_files_only=True).eval()
    config = json.loads((run_dir / "student-int8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    # the same int8 codes and scales: float32 rounding only, relative to the largest logit
    bound = INT8_TOLERANCE * max(1.0, float(q_reference.abs().max()))
    assert (_logits(int8, data) - q_reference).abs().max() <= bound
    assert 0 < (q_reference - reference).abs().max() < 0.1 * reference.abs().max()
    assert report["export"]["int8"]["file_bytes"] < report["export"]["file_bytes"]


def test_online_distillation_of_a_student_from_the_teachers_blocks(tmp_path, lm_files):
    spec = _spec(lm_files, "lm-online", logits={"mode": "online", "tokens": {"k": 16}},
                 precision="fp32")
    run_dir = tmp_path / "run"
    result = run_cli(["run", str(_write(tmp_path, spec)), "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((run_dir / "report.json").read_text())

    # the teacher: its test perplexity through the replicas is the one computed here
    from trainers.hf_models import load_hf_dir
    from trainers.lm_export import _scores
    from trainers.lm_job import TEXT_DATA
    from trainers.text_data import TextDataset

    data = TextDataset.open(run_dir / TEXT_DATA)
    ppl, acc = _scores(load_hf_dir(lm_files / "teacher"), data)
    # fp32 replicas, other batches: float32 summation order only
    assert report["teacher"]["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert report["teacher"]["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert report["teacher"]["perplexity"] < VOCAB / 10  # it learned the corpus

    # the student: blocks 0 and 3 of the teacher, every tensor copied, then distilled
    metas = check_pruned_checkpoints(run_dir, rounds=1)
    init = metas[0]["init"]
    assert init["layers"] == [0, 3] and init["kept"] == [] and init["copied"] == 21
    assert metas[1]["init"] is None
    assert "initialised from" in result.stdout and "21 tensors copied" in result.stdout
    dense, round1 = report["dense_student"], report["rounds"][0]
    assert dense["perplexity"] < 2 * report["teacher"]["perplexity"]
    assert round1["sparsity"] == 0.5 and report["final"]["sparsity"] == 0.5
    assert dense["tokens_per_s"] > 0 and report["tokens_per_s"] == dense["tokens_per_s"]
    # tokens trained on: every rank's targets (real next tokens) of the batches it was dealt
    from trainers.data import epoch_shard

    targets = data.train.attention_mask[:, 1:].sum(axis=1)  # per block
    dealt = [idx for epoch in range(2) for rank in range(2)
             for idx in epoch_shard(data.train_rows, 8, epoch, 0, rank, 2)]
    assert metas[0]["train_tokens"] == sum(int(targets[idx].sum()) for idx in dealt)
    # what was pruned: the blocks' projections only (no embedding, norm or head)
    masks = load_file(str(run_dir / "student-masks.safetensors"))
    assert len(masks) == 14 and all(".self_attn." in n or ".mlp." in n for n in masks)
    assert report["logits"] == {"mode": "online", "k": 16, "wire_bytes_per_position": 132}

    # the exports, loaded back by transformers
    _check_exports(run_dir, report)
    names = [s["name"] for s in report["stages"]]
    assert names == ["teacher", "dense student", "pruned (fp32, zeros stored)",
                     "exported (Hugging Face, fp32)", "exported (int8 weights, compressed-tensors)"]
    assert report["export"]["nonzero_params"] == report["final"]["nonzero_params"]
    assert "perplexity" in result.stdout and "student-int8/" in result.stdout

    # `stillhouse export` writes both directories again from the checkpoints alone
    written = (run_dir / "student-hf" / "model.safetensors").read_bytes()
    shutil.rmtree(run_dir / "student-hf")
    shutil.rmtree(run_dir / "student-int8")
    again = run_cli(["export", str(run_dir)])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (run_dir / "student-hf" / "model.safetensors").read_bytes() == written
    assert (run_dir / "student-int8" / "model.safetensors").is_file()
    assert "next-token acc" in again.stdout and "exported student-int8/" in again.stdout
    redone = json.loads((run_dir / "report.json").read_text())["stages"]
    assert [s["name"] for s in redone] == names
    # the same weights and test blocks, evaluated in another process: float32 rounding only
    assert [s["perplexity"] for s in redone] == pytest.approx(
        [s["perplexity"] for s in report["stages"]], rel=1e-6)

    # W&B: each phase's evaluation at its step, in the offline run files
    rows = [r for r in job_history(run_dir, "student-workers") if "eval/perplexity" in r]
    assert sorted(r["_step"] for r in rows) == [m["global_step"] for m in metas]
    assert [r["eval/perplexity"] for r in sorted(rows, key=lambda r: r["_step"])] == \
        pytest.approx([m["perplexity"] for m in metas], rel=1e-12)  # a float64 round trip


def _shards(cache_root: Path) -> dict[str, tuple[int, int]]:
    """Finished shard files of the (one) cache under `cache_root`: name -> (inode, mtime)."""
    found = {}
    for path in cache_root.glob("*/shard-*.safetensors"):
        stat = path.stat()
        found[path.name] = (stat.st_ino, stat.st_mtime_ns)
    for path in cache_root.glob(".partial-*/shard-*.safetensors"):
        stat = path.stat()
        found[path.name] = (stat.st_ino, stat.st_mtime_ns)
    return found


def test_top_k_cache_job_resumes_a_killed_fill(tmp_path, lm_files):
    """bf16, ZeRO 2, one teacher replica that fills the cache and leaves, and 2 workers that
    read it. The first run is killed (SIGKILL, the driver alone) once the fill has written a
    shard; the rerun finishes the fill from there: the shards found are kept as they are
    (same files), the others computed, then the student trains from the cache. Its pruning is
    structured (half the MLP neurons and half the KV groups of each block), and the exported
    directories hold the smaller model."""
    cache_root = tmp_path / "cache"
    spec = _spec(lm_files, "lm-topk",
                 logits={"mode": "topk", "tokens": {"k": 8, "logprobs": "int8", "shard_size": 2,
                                                    "cache_dir": str(cache_root)}},
                 precision="bf16", deepspeed={"zero_stage": 2},
                 pruning={"target_sparsity": 0.5, "rounds": 1, "finetune_epochs": 1,
                          "schedule": {"kind": "oneshot"}, "granularity": "channel",
                          "heads": 0.5},
                 resources={"teacher_replicas": 1, "teacher_cpus": 1.0, "student_workers": 2,
                            "student_cpus": 1.0, "teacher_request_rows": 8,
                            "placement_timeout_s": 300})
    path = _write(tmp_path, spec)
    run_dir = tmp_path / "run"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(STILLHOUSE + ["run", str(path), "--run-dir", str(run_dir)], cwd=ROOT,
                            env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not list(cache_root.glob(".partial-*/shard-*.safetensors")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the fill never wrote a shard"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    try:
        assert_nothing_left(proc.pid, timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    before = _shards(cache_root)
    staging = list(cache_root.glob(".partial-*"))
    assert len(staging) == 1 and not (cache_root / staging[0].name[len(".partial-"):]).exists()
    assert not (run_dir / "report.json").exists()

    result = run_cli(["run", str(path), "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "token cache: resuming the fill" in result.stdout
    report = json.loads((run_dir / "report.json").read_text())
    cache = report["token_cache"]
    data_rows = report["data"]["train_rows"]
    assert cache["shards"] == -(-data_rows // 2)
    assert cache["reused"] == len(before) and cache["computed"] == cache["shards"] - len(before)
    after = _shards(cache_root)
    assert len(after) == cache["shards"]
    for name, identity in before.items():  # not recomputed: the very same files
        assert after[name] == identity, name
    # 8 int16 ids, 8 one-byte codes + bf16 top + float32 scale, bf16 rest, per token
    assert cache["bytes_per_token"] == 8 * 2 + (8 + 2 + 4) + 2
    folder = Path(cache["dir"])
    assert cache["file_bytes"] == sum(p.stat().st_size for p in folder.glob("shard-*"))
    assert cache["positions"] == data_rows * SEQ

    # masks equal, zero on module and masters; per block 32 of 64 neurons (3 x 2,048 weights)
    # and 1 of 2 KV groups (q and o 512 each, k and v 256): 4,608 of 9,216, exactly half
    check_pruned_checkpoints(run_dir, rounds=1)
    assert report["dense_student"]["perplexity"] < 2 * report["teacher"]["perplexity"]
    _check_exports(run_dir, report, shrunk=True)
    assert np.isfinite(report["final"]["perplexity"])
    structure = report["export"]["structured"]
    assert structure["config_before"] == {"intermediate_size": 64, "num_attention_heads": 4,
                                          "num_key_value_heads": 2}
    assert structure["config_after"] == {"intermediate_size": 32, "num_attention_heads": 2,
                                         "num_key_value_heads": 1}
    config = json.loads((run_dir / "student-hf" / "config.json").read_text())
    assert {k: config[k] for k in structure["config_after"]} == structure["config_after"]
    masks = load_file(str(run_dir / "student-masks.safetensors"))
    pruned = sum(int((~m).sum()) for m in masks.values())
    dense_params = report["stages"][1]["params"]
    assert report["export"]["params"] == dense_params - pruned  # the zeros are gone, not stored
    assert report["export"]["file_bytes"] < report["export"]["dense_file_bytes"]
