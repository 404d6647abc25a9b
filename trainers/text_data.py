"""Text data for language models: files -> documents -> tokens -> fixed-length blocks.

    from specs.lm import TextData
    spec = TextData(kind="text", train="corpus/train/*.jsonl", test="corpus/test/*.jsonl",
                    tokenizer="tok/", seq_len=256)
    tokenizer = load_tokenizer(spec.tokenizer)
    blocks = load_text_split(spec, "train", tokenizer)   # TextBlocks: (N, seq_len) arrays
    check_tokenizers_agree(load_tokenizer("teacher/"), tokenizer)

Files come from a glob, sorted, so the order (and each block's sample id) is the same on every
machine. `jsonl`: one JSON object per line, its text in `text_column`; `parquet`: one row per
document, the same column; `txt`: a whole file is one document (UTF-8). With `pack` the
documents' tokens are concatenated, each followed by the tokenizer's end-of-sequence token when
it has one, and cut into `seq_len` blocks (attention then runs across document boundaries, as
in GPT pre-training; the last, partial block is padded); without it each document is one block,
truncated to `seq_len` and padded. Padding has attention mask 0, and
`trainers.lm_losses.next_token_labels` turns it into label -100.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from specs.errors import InputError
from specs.lm import TextData


class TextDataError(InputError):
    """Text files or a tokenizer that cannot be used (exit status 2)."""


class TokenizerMismatch(TextDataError):
    """The teacher's and the student's tokenizers differ; the message names the first
    difference."""


# ----------------------------------------------------------------------------------- files


def list_files(pattern: str) -> list[Path]:
    """The files a glob matches (`**` recurses), sorted by path; none is an error."""
    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise TextDataError(f"no file matches {pattern!r}")
    return files


def read_documents(files: list[Path], format: str, text_column: str = "text") -> Iterator[str]:
    """Every document's text, file by file in the given order."""
    for file in files:
        if format == "txt":
            try:
                yield file.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise TextDataError(f"{file}: not UTF-8 text (byte {err.start})") from None
        elif format == "jsonl":
            with open(file, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise TextDataError(f"{file}:{number}: not JSON ({err.msg})") from None
                    text = record.get(text_column) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise TextDataError(
                            f"{file}:{number}: no string field {text_column!r} "
                            "(the spec's `text_column`)")
                    yield text
        elif format == "parquet":
            import pyarrow.parquet as pq

            try:
                schema = pq.read_schema(file)
            except Exception as err:  # pyarrow raises several types for a damaged file
                raise TextDataError(f"{file}: not a parquet file ({err})") from None
            if text_column not in schema.names:
                raise TextDataError(f"{file}: no column {text_column!r} (the spec's "
                                    f"`text_column`); columns: {schema.names}")
            for number, text in enumerate(pq.read_table(file, columns=[text_column])
                                          .column(text_column).to_pylist()):
                if not isinstance(text, str):
                    raise TextDataError(f"{file}: row {number} of {text_column!r} is not text")
                yield text
        else:
            raise ValueError(f"unknown text format {format!r}")


# ------------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | Path):
    """A fast tokenizer from a directory written by `save_pretrained`, offline, no remote code."""
    from trainers.hf_models import hf_offline

    hf_offline()
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise TextDataError(f"tokenizer directory {folder} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                  trust_remote_code=False)
    except (ValueError, OSError) as err:
        raise TextDataError(f"cannot load the tokenizer in {folder}: {err}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise TextDataError(f"{folder}: a fast (tokenizers) tokenizer is needed")
    return tokenizer


def _id_to_token(tokenizer) -> list[str | None]:
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    table: list[str | None] = [None] * (max(vocab.values()) + 1 if vocab else 0)
    for token, index in vocab.items():
        table[index] = token
    return table


# the parts of a fast tokenizer that decide which ids a text becomes (not its padding or
# truncation settings, which change whenever someone calls it with other arguments)
BACKEND_PARTS = ("normalizer", "pre_tokenizer", "model", "post_processor", "added_tokens")


def _backend_parts(tokenizer) -> dict:
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    return {part: state.get(part) for part in BACKEND_PARTS}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over what decides how text becomes ids: the backend's normalizer, pre-tokenizer,
    model (vocabulary, merges), post-processor and added tokens, and the special tokens."""
    body = {"backend": _backend_parts(tokenizer), "special": tokenizer.special_tokens_map}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_tokenizers_agree(teacher, student, names: tuple[str, str] = ("teacher", "student"),
                           ) -> None:
    """Raise TokenizerMismatch naming the first difference between two tokenizers: vocabulary
    size, then the first id whose token differs, then special tokens, then the rules that turn
    text into ids (normalizer, pre-tokenizer, merges, ...). `names` are what the message calls
    the two."""
    a_name, b_name = names
    t_table, s_table = _id_to_token(teacher), _id_to_token(student)
    if len(teacher) != len(student) or len(t_table) != len(s_table):
        raise TokenizerMismatch(
            f"tokenizers differ in vocabulary size: {a_name} {len(teacher)}, {b_name} "
            f"{len(student)}")
    for index, (a, b) in enumerate(zip(t_table, s_table)):
        if a != b:
            raise TokenizerMismatch(
                f"tokenizers differ at token id {index}: {a_name} {a!r}, {b_name} {b!r}")
    t_special, s_special = teacher.special_tokens_map, student.special_tokens_map
    for role in sorted(set(t_special) | set(s_special)):
        if t_special.get(role) != s_special.get(role):
            raise TokenizerMismatch(
                f"tokenizers differ in special token {role}: {a_name} "
                f"{t_special.get(role)!r}, {b_name} {s_special.get(role)!r}")
    t_parts, s_parts = _backend_parts(teacher), _backend_parts(student)
    for part in BACKEND_PARTS:
        if t_parts[part] != s_parts[part]:
            raise TokenizerMismatch(
                f"tokenizers have the same vocabulary but differ in their {part} (the same "
                "text would become different ids)")


# ---------------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class TextBlocks:
    input_ids: np.ndarray  # (N, seq_len) int32
    attention_mask: np.ndarray  # (N, seq_len) int8, 1 = real token
    sample_ids: np.ndarray  # (N,) int64: the block's position in file/document order
    documents: int

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    def digest(self) -> str:
        """sha256 of the blocks' contents: the data's identity for cache keys."""
        h = hashlib.sha256(str(self.input_ids.shape).encode())
        h.update(np.ascontiguousarray(self.input_ids).tobytes())
        h.update(np.ascontiguousarray(self.attention_mask).tobytes())
        return h.hexdigest()


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # masked out anyway: any valid id does


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (batched through the Rust tokenizer)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def pack_blocks(docs: list[list[int]], seq_len: int, eos_id: int | None,
                pad_id: int) -> TextBlocks:
    """Concatenate the documents (each followed by `eos_id` when there is one) and cut the
    stream into (N, seq_len) blocks; the last block is padded (mask 0)."""
    pieces = [np.asarray(d, dtype=np.int64) for d in docs]
    if eos_id is not None:
        eos = np.array([eos_id], dtype=np.int64)
        pieces = [p for d in pieces for p in (d, eos)]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    n = -(-len(stream) // seq_len)  # ceil
    ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    mask = np.zeros((n, seq_len), dtype=np.int8)
    ids.reshape(-1)[: len(stream)] = stream
    mask.reshape(-1)[: len(stream)] = 1
    return TextBlocks(ids, mask, np.arange(n, dtype=np.int64), len(docs))


def pad_blocks(docs: list[list[int]], seq_len: int, eos_id: int | None,
               pad_id: int) -> TextBlocks:
    """One block per document: its tokens (and `eos_id` when there is one), truncated to
    `seq_len`, then padded (mask 0)."""
    ids = np.full((len(docs), seq_len), pad_id, dtype=np.int32)
    mask = np.zeros((len(docs), seq_len), dtype=np.int8)
    for row, doc in enumerate(docs):
        tokens = list(doc) + ([eos_id] if eos_id is not None else [])
        tokens = tokens[:seq_len]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return TextBlocks(ids, mask, np.arange(len(docs), dtype=np.int64), len(docs))


def load_text_split(spec: TextData, split: str, tokenizer) -> TextBlocks:
    """The `train` or `test` split of a text data source as blocks."""
    pattern = {"train": spec.train, "test": spec.test}[split]
    texts = list(read_documents(list_files(pattern), spec.format, spec.text_column))
    docs = tokenize(tokenizer, texts)
    make = pack_blocks if spec.pack else pad_blocks
    return make(docs, spec.seq_len, tokenizer.eos_token_id, _pad_id(tokenizer))


# -------------------------------------------------------------------- the job's data object

PREPARED_FILES = {"train": "train.safetensors", "test": "test.safetensors"}
PREPARED_MANIFEST = "manifest.json"


def resolve(path: str, data_dir: str | None) -> str:
    """A relative path or glob of the data section is relative to `--data-dir` when given."""
    p = Path(path)
    return str(p if p.is_absolute() or data_dir is None else Path(data_dir) / p)


@dataclass(frozen=True)
class TextDataset:
    """A text source as a job holds it: the training and test blocks, and what made them.

    The driver tokenizes once (`load_text_dataset`, before Ray starts) and writes the blocks
    into the run dir (`save`); every worker maps that copy (`open`), so all of them train on
    the same ids without loading a tokenizer. Sample ids are block positions (see `TextData`).
    """

    train: TextBlocks
    test: TextBlocks
    vocab_size: int  # len(tokenizer): ids run 0..vocab_size-1
    tokenizer_dir: str
    tokenizer_fingerprint: str
    source: dict
    folder: str | None = None  # the prepared copy, once written

    streamed = False

    @property
    def seq_len(self) -> int:
        return int(self.train.input_ids.shape[1])

    @property
    def train_rows(self) -> int:
        return len(self.train.input_ids)

    @property
    def test_rows(self) -> int:
        return len(self.test.input_ids)

    @property
    def num_classes(self) -> int:
        """The classes of a next-token prediction: the vocabulary."""
        return self.vocab_size

    def fingerprint(self) -> str:
        """The training blocks' digest (keys the token cache, with the tokenizer and seq_len)."""
        return self.train.digest()

    def test_batches(self, batch_size: int = 32):
        """(input_ids (B, L) int64, attention_mask (B, L) int64) numpy batches, in order."""
        for i in range(0, self.test_rows, batch_size):
            yield (self.test.input_ids[i:i + batch_size].astype(np.int64),
                   self.test.attention_mask[i:i + batch_size].astype(np.int64))

    def describe(self) -> dict:
        return {"kind": "text", "seq_len": self.seq_len, "vocab_size": self.vocab_size,
                "train_rows": self.train_rows, "test_rows": self.test_rows,
                "train_tokens": self.train.tokens, "test_tokens": self.test.tokens,
                "train_documents": self.train.documents, "test_documents": self.test.documents,
                "tokenizer": self.tokenizer_dir, "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "streamed": False, **self.source}

    def save(self, folder: str | Path) -> "TextDataset":
        """Write the blocks (safetensors) and a manifest into `folder`, unless the same blocks
        are there already; returns the data set with `folder` set."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        manifest = {"train_digest": self.train.digest(), "test_digest": self.test.digest(),
                    "vocab_size": self.vocab_size, "tokenizer_dir": self.tokenizer_dir,
                    "tokenizer_fingerprint": self.tokenizer_fingerprint, "source": self.source,
                    "documents": {"train": self.train.documents, "test": self.test.documents}}
        path = folder / PREPARED_MANIFEST
        if not (path.is_file() and json.loads(path.read_text()) == manifest):
            folder.mkdir(parents=True, exist_ok=True)
            for split, blocks in (("train", self.train), ("test", self.test)):
                tmp = folder / (PREPARED_FILES[split] + ".partial")
                save_file({"input_ids": blocks.input_ids, "attention_mask": blocks.attention_mask,
                           "sample_ids": blocks.sample_ids}, str(tmp))
                tmp.replace(folder / PREPARED_FILES[split])
            tmp = folder / (PREPARED_MANIFEST + ".partial")
            tmp.write_text(json.dumps(manifest, indent=1))
            tmp.replace(path)  # last: a manifest means both files are complete
        return TextDataset(self.train, self.test, self.vocab_size, self.tokenizer_dir,
                           self.tokenizer_fingerprint, self.source, str(folder))

    @classmethod
    def open(cls, folder: str | Path) -> "TextDataset":
        """The copy `save` wrote (a worker's view of the job's data)."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        manifest = json.loads((folder / PREPARED_MANIFEST).read_text())
        splits = {}
        for split in ("train", "test"):
            arrays = load_file(str(folder / PREPARED_FILES[split]))
            splits[split] = TextBlocks(arrays["input_ids"], arrays["attention_mask"],
                                       arrays["sample_ids"], manifest["documents"][split])
            if splits[split].digest() != manifest[f"{split}_digest"]:
                raise TextDataError(f"{folder}: the {split} blocks do not match their manifest")
        return cls(splits["train"], splits["test"], manifest["vocab_size"],
                   manifest["tokenizer_dir"], manifest["tokenizer_fingerprint"],
                   manifest["source"], str(folder))


def load_text_dataset(spec: TextData, data_dir: str | None = None) -> tuple[TextDataset, object]:
    """Tokenize a text source's two splits; returns the data set and the tokenizer. Relative
    globs and the tokenizer directory are taken relative to `data_dir` when one is given."""
    tokenizer_dir = resolve(spec.tokenizer, data_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    resolved = spec.model_copy(update={"train": resolve(spec.train, data_dir),
                                       "test": resolve(spec.test, data_dir)})
    train = load_text_split(resolved, "train", tokenizer)
    test = load_text_split(resolved, "test", tokenizer)
    for split, blocks in (("train", train), ("test", test)):
        if len(blocks.input_ids) == 0:
            raise TextDataError(f"`data.{split}`: the files hold no text")
    source = {"train": resolved.train, "test": resolved.test, "format": spec.format,
              "pack": spec.pack}
    return TextDataset(train, test, len(tokenizer), str(Path(tokenizer_dir).resolve()),
                       tokenizer_fingerprint(tokenizer), source), tokenizer
