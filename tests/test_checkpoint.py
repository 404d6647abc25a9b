"""The job's commit protocol on top of DeepSpeed's in-place checkpoints."""

import json

import pytest

from trainers import checkpoint
from trainers.checkpoint import CheckpointError


def _write(root, name, payload=b"weights"):
    staging = checkpoint.begin(root, name)
    (staging / "model.bin").write_bytes(payload)
    (staging / "deepspeed").mkdir()
    (staging / "deepspeed" / "state.pt").write_bytes(b"optimizer")
    return checkpoint.commit(root, name, {"step": 3})


def test_commit_then_verify(tmp_path):
    folder = _write(tmp_path, "a")
    assert checkpoint.verify(folder) == {"step": 3}
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.bin", "deepspeed/state.pt"}
    assert not checkpoint.partial_path(tmp_path, "a").exists()


def test_a_crashed_write_is_never_loaded(tmp_path):
    _write(tmp_path, "a")
    staging = checkpoint.begin(tmp_path, "b")
    (staging / "model.bin").write_bytes(b"half")  # crash before commit
    assert checkpoint.complete_checkpoints(tmp_path, ["a", "b", "c"]) == ["a"]
    checkpoint.begin(tmp_path, "b")  # the next attempt starts clean
    assert list(checkpoint.partial_path(tmp_path, "b").iterdir()) == []


def test_missing_manifest_is_an_error_not_a_fresh_start(tmp_path):
    folder = _write(tmp_path, "a")
    (folder / checkpoint.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        checkpoint.complete_checkpoints(tmp_path, ["a"])


def test_corrupt_file_or_manifest_is_an_error(tmp_path):
    folder = _write(tmp_path, "a")
    (folder / "model.bin").write_bytes(b"weightz")
    with pytest.raises(CheckpointError, match="does not match"):
        checkpoint.verify(folder)
    (folder / checkpoint.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed"):
        checkpoint.verify(folder)


def test_a_gap_in_the_sequence_is_an_error(tmp_path):
    _write(tmp_path, "a")
    _write(tmp_path, "c")
    with pytest.raises(CheckpointError, match="after the missing 'b'"):
        checkpoint.complete_checkpoints(tmp_path, ["a", "b", "c"])


def test_commit_refuses_to_overwrite(tmp_path):
    _write(tmp_path, "a")
    checkpoint.begin(tmp_path, "a")
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.commit(tmp_path, "a", {})
