"""Text data: files by glob, documents, tokenization with a BPE tokenizer trained here, packed or
padded blocks with stable sample ids, and the teacher/student tokenizer check."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_lm import EOS, corpus, no_network, train_tokenizer

from specs.errors import InputError
from specs.lm import TextData
from trainers.text_data import (
    TextDataError,
    TokenizerMismatch,
    check_tokenizers_agree,
    list_files,
    load_text_split,
    load_tokenizer,
    pack_blocks,
    pad_blocks,
    read_documents,
    tokenize,
    tokenizer_fingerprint,
)

__all__ = ["no_network"]
pytestmark = pytest.mark.usefixtures("no_network")
DOCS = corpus(30)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(out, DOCS)
    return out


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return load_tokenizer(tok_dir)


def _write_all_formats(root, docs):
    """The same documents as jsonl (two files), parquet (two files) and txt (one per file);
    file names chosen so that sorted order is document order."""
    for fmt in ("jsonl", "parquet", "txt"):
        (root / fmt).mkdir(parents=True)
    half = len(docs) // 2
    for part, chunk in enumerate([docs[:half], docs[half:]]):
        with open(root / "jsonl" / f"part-{part}.jsonl", "w") as f:
            for text in chunk:
                f.write(json.dumps({"text": text, "id": 0}) + "\n\n")  # blank lines are skipped
        pq.write_table(pa.table({"text": chunk}), root / "parquet" / f"part-{part}.parquet")
    for i, text in enumerate(docs):
        (root / "txt" / f"doc-{i:03d}.txt").write_text(text)


def test_every_format_yields_the_same_documents_in_sorted_order(tmp_path):
    _write_all_formats(tmp_path, DOCS)
    for fmt, pattern in (("jsonl", "jsonl/*.jsonl"), ("parquet", "parquet/*.parquet"),
                         ("txt", "txt/*.txt")):
        files = list_files(str(tmp_path / pattern))
        assert files == sorted(files)
        assert list(read_documents(files, fmt)) == DOCS, fmt
    assert len(list_files(str(tmp_path / "**" / "*.txt"))) == len(DOCS)


def test_bad_files_name_file_and_place(tmp_path):
    with pytest.raises(TextDataError, match="no file matches"):
        list_files(str(tmp_path / "*.jsonl"))
    bad = tmp_path / "a.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(TextDataError, match=r"a.jsonl:2: no string field 'text'"):
        list(read_documents([bad], "jsonl"))
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(TextDataError, match=r"a.jsonl:2: not JSON"):
        list(read_documents([bad], "jsonl"))
    table = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x"]}), table)
    with pytest.raises(TextDataError, match=r"no column 'text'.*\['body'\]"):
        list(read_documents([table], "parquet"))
    latin = tmp_path / "a.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TextDataError, match="not UTF-8"):
        list(read_documents([latin], "txt"))
    assert issubclass(TextDataError, InputError)  # exit status 2


def test_packing_concatenates_documents_with_eos_into_full_blocks():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    blocks = pack_blocks(docs, seq_len=4, eos_id=0, pad_id=1)
    # stream: 5 6 7 0 | 8 0 9 10 | 11 12 13 0  -> three full blocks
    assert blocks.input_ids.tolist() == [[5, 6, 7, 0], [8, 0, 9, 10], [11, 12, 13, 0]]
    assert blocks.attention_mask.all() and blocks.sample_ids.tolist() == [0, 1, 2]
    blocks = pack_blocks(docs, seq_len=5, eos_id=0, pad_id=1)
    assert blocks.input_ids.tolist() == [[5, 6, 7, 0, 8], [0, 9, 10, 11, 12], [13, 0, 1, 1, 1]]
    assert blocks.attention_mask[-1].tolist() == [1, 1, 0, 0, 0] and blocks.tokens == 12
    assert blocks.input_ids.dtype == np.int32


def test_padding_gives_one_block_per_document():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    blocks = pad_blocks(docs, seq_len=4, eos_id=0, pad_id=1)
    assert blocks.input_ids.tolist() == [[5, 6, 7, 0], [8, 0, 1, 1], [9, 10, 11, 12]]
    assert blocks.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert blocks.sample_ids.tolist() == [0, 1, 2] and blocks.documents == 3


@pytest.mark.parametrize("pack", [True, False])
def test_a_split_is_the_same_from_every_format_and_stable(tmp_path, tok_dir, tokenizer, pack):
    _write_all_formats(tmp_path, DOCS)
    n = 32 if pack else 80  # padded: some documents longer, some shorter than a block
    digests = set()
    for fmt, pattern in (("jsonl", "jsonl/*"), ("parquet", "parquet/*"), ("txt", "txt/*")):
        spec = TextData(kind="text", train=str(tmp_path / pattern), test=str(tmp_path / pattern),
                        format=fmt, tokenizer=str(tok_dir), seq_len=n, pack=pack)
        blocks = load_text_split(spec, "train", tokenizer)
        digests.add(blocks.digest())
    assert len(digests) == 1  # same documents, same order, same blocks
    # the real tokens are exactly the documents' tokens (each followed by the end token)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    docs = [[*d, eos] for d in tokenize(tokenizer, DOCS)]
    if pack:
        real = blocks.input_ids[blocks.attention_mask.astype(bool)]
        assert real.tolist() == [t for d in docs for t in d] and blocks.input_ids.shape[1] == n
    else:
        assert blocks.input_ids.shape == (len(DOCS), n)
        assert any(len(d) > n for d in docs) and any(len(d) < n for d in docs)
        for row, doc in enumerate(docs):  # truncated or padded, one row per document
            real = blocks.input_ids[row][blocks.attention_mask[row].astype(bool)]
            assert real.tolist() == doc[:n]
    other = TextData(kind="text", train=str(tmp_path / "txt/*"), test=str(tmp_path / "txt/*"),
                     format="txt", tokenizer=str(tok_dir), seq_len=n + 1, pack=pack)
    assert load_text_split(other, "test", tokenizer).digest() not in digests


def test_the_same_tokenizer_agrees_with_itself(tok_dir, tmp_path):
    shutil.copytree(tok_dir, tmp_path / "copy")
    a, b = load_tokenizer(tok_dir), load_tokenizer(tmp_path / "copy")
    check_tokenizers_agree(a, b)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    a("some text", truncation=True, max_length=4)  # call settings are not part of its identity
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


def test_a_tokenizer_trained_elsewhere_is_named_at_its_first_different_id(tok_dir, tmp_path):
    train_tokenizer(tmp_path / "other", corpus(30, seed=7) + ["zebra quartz jumps"])
    with pytest.raises(TokenizerMismatch, match=r"differ at token id \d+: teacher '.*', student"):
        check_tokenizers_agree(load_tokenizer(tok_dir), load_tokenizer(tmp_path / "other"))
    train_tokenizer(tmp_path / "small", DOCS, vocab_size=300)
    with pytest.raises(TokenizerMismatch, match="vocabulary size: teacher 320, student 300"):
        check_tokenizers_agree(load_tokenizer(tok_dir), load_tokenizer(tmp_path / "small"))


def test_special_tokens_and_merge_rules_count(tok_dir, tmp_path):
    teacher = load_tokenizer(tok_dir)
    shutil.copytree(tok_dir, tmp_path / "special")
    config_path = tmp_path / "special" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["pad_token"] = EOS  # the same vocabulary, another padding token
    config_path.write_text(json.dumps(config))
    with pytest.raises(TokenizerMismatch, match="special token pad_token"):
        check_tokenizers_agree(teacher, load_tokenizer(tmp_path / "special"))

    shutil.copytree(tok_dir, tmp_path / "merges")
    state_path = tmp_path / "merges" / "tokenizer.json"
    state = json.loads(state_path.read_text())
    state["model"]["merges"] = state["model"]["merges"][:-5]  # same ids, fewer merge rules
    state_path.write_text(json.dumps(state))
    student = load_tokenizer(tmp_path / "merges")
    with pytest.raises(TokenizerMismatch, match="differ in their model"):
        check_tokenizers_agree(teacher, student)
    assert tokenizer_fingerprint(teacher) != tokenizer_fingerprint(student)


def test_missing_tokenizer_is_an_input_error(tmp_path):
    with pytest.raises(TextDataError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
