"""Atomic writes: a failure in the middle of a save leaves the previous file or folder."""

import pytest

from foldtune.files import atomic_directory, atomic_path, atomic_write_text


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "scores.json"
    atomic_write_text(target, "old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new cont")
            raise OSError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_a_failed_checkpoint_save_leaves_the_previous_checkpoint(tmp_path):
    best = tmp_path / "best"
    with atomic_directory(best) as tmp:
        (tmp / "model.safetensors").write_bytes(b"old weights")
        (tmp / "foldtune.json").write_text("{}")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_directory(best) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new wei")
            raise RuntimeError("killed")
    assert (best / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    with atomic_directory(best) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new weights")
    assert sorted(p.name for p in best.iterdir()) == ["model.safetensors"]       # replaced whole
    assert (best / "model.safetensors").read_bytes() == b"new weights"
