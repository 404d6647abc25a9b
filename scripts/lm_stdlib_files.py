"""Write a text corpus every machine has, for the language-model example and benchmark: the
Python standard library's source files of the running interpreter, and a BPE tokenizer trained
on its training split.

    .venv/bin/python scripts/lm_stdlib_files.py OUT            # OUT/{train,test}/*.jsonl, OUT/tokenizer/
    .venv/bin/python scripts/lm_stdlib_files.py OUT --vocab 2048 --test-every 10 --max-files 0

The files are the `.py` files directly in the standard library's folder (`sysconfig`'s
`stdlib` path; not its packages or tests), sorted by name. Every `--test-every`-th file (the
10th, 20th, ...) goes to the test split, the others to training: a split by file, so no test
text was seen in training. Each file is one document, a jsonl record `{"text": ..., "path":
...}` (`data.format: jsonl`). `--max-files N` keeps the first N files (0: all). The tokenizer is
a byte-level BPE (the `tokenizers` library, as GPT-2's) with `<|endoftext|>` and `<pad>`,
trained on the training split only and saved as a transformers tokenizer directory.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

EOS, PAD = "<|endoftext|>", "<pad>"


def stdlib_files(max_files: int = 0) -> list[Path]:
    """The standard library's top-level `.py` files, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    return files[:max_files] if max_files else files


def split_files(files: list[Path], test_every: int) -> tuple[list[Path], list[Path]]:
    """(train, test): every `test_every`-th file (1-based) is a test file."""
    test = [f for i, f in enumerate(files, 1) if i % test_every == 0]
    train = [f for i, f in enumerate(files, 1) if i % test_every != 0]
    return train, test


def write_split(folder: Path, files: list[Path]) -> int:
    """The files as one jsonl file of documents; returns the characters written."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = 0
    with open(folder / "part-00000.jsonl", "w", encoding="utf-8") as out:
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            chars += len(text)
            out.write(json.dumps({"text": text, "path": path.name}) + "\n")
    return chars


def train_bpe(out_dir: Path, files: list[Path], vocab_size: int) -> int:
    """A byte-level BPE tokenizer trained on `files`, saved for `AutoTokenizer`; its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(
        (p.read_text(encoding="utf-8", errors="replace") for p in files), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.save_pretrained(str(out_dir))
    return len(fast)


def write_corpus(out: Path, vocab_size: int = 2048, test_every: int = 10,
                 max_files: int = 0) -> dict:
    """Write OUT/train, OUT/test and OUT/tokenizer; returns what was written."""
    train, test = split_files(stdlib_files(max_files), test_every)
    stats = {"train_files": len(train), "test_files": len(test),
             "train_chars": write_split(out / "train", train),
             "test_chars": write_split(out / "test", test),
             "vocab_size": train_bpe(out / "tokenizer", train, vocab_size),
             "stdlib": sysconfig.get_paths()["stdlib"]}
    (out / "corpus.json").write_text(json.dumps(stats, indent=1))
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    parser.add_argument("--test-every", type=int, default=10)
    parser.add_argument("--max-files", type=int, default=0, help="first N files only (0: all)")
    args = parser.parse_args()
    print(json.dumps(write_corpus(args.out, args.vocab, args.test_every, args.max_files),
                     indent=1))


if __name__ == "__main__":
    main()
