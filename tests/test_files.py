"""Atomic writes: a failure in the middle of a save leaves the previous file or folder, and
what a killed process left behind is tidied."""

import os

import pytest
from conftest import ended_pid

from foldtune.files import atomic_directory, atomic_path, atomic_write_text, remove_orphans


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


def test_the_temporaries_of_ended_processes_go_and_the_only_copy_of_a_folder_comes_back(tmp_path, live_pid):
    dead = ended_pid()
    for name in ("fold_0", "fold_1", "fold_2", "fold_2/best", "fold_0/state",
                 f"fold_0/.best.tmp-{dead}", f"fold_1/.best.old-{dead}", f"fold_2/.best.old-{dead}",
                 f"fold_0/.best.tmp-{live_pid}", f"fold_1/.best.tmp-{os.getpid()}"):
        (tmp_path / name).mkdir()
    (tmp_path / f"fold_0/.best.tmp-{dead}/model.safetensors").write_bytes(b"half of the new")
    (tmp_path / f"fold_1/.best.old-{dead}/model.safetensors").write_bytes(b"the only complete copy")
    for name in (f".submission.csv.tmp-{dead}", f"fold_0/state/.state-0000004.pt.tmp-{dead}",
                 f".scores.json.tmp-{live_pid}", f".oof.csv.tmp-{os.getpid()}", ".notes.tmp-x", "run.tmp-1"):
        (tmp_path / name).write_text("x")
    tidied = remove_orphans(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tidied) == sorted([
        f".submission.csv.tmp-{dead}", f"fold_0/.best.tmp-{dead}", f"fold_0/state/.state-0000004.pt.tmp-{dead}",
        f"fold_1/.best.old-{dead}", f"fold_2/.best.old-{dead}"])
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == sorted([
        ".notes.tmp-x", "run.tmp-1", f".oof.csv.tmp-{os.getpid()}", f".scores.json.tmp-{live_pid}",
        "fold_0", f"fold_0/.best.tmp-{live_pid}", "fold_0/state",
        "fold_1", f"fold_1/.best.tmp-{os.getpid()}", "fold_1/best", "fold_1/best/model.safetensors",
        "fold_2", "fold_2/best"])
    assert (tmp_path / "fold_1/best/model.safetensors").read_bytes() == b"the only complete copy"


def test_a_submission_written_again_clears_an_ended_writes_temporary(tmp_path, live_pid):
    import numpy as np

    from foldtune.inference import write_submission

    dead = ended_pid()
    for pid in (dead, live_pid):
        (tmp_path / f".submission.csv.tmp-{pid}").write_text("id,cohesion\nA,")
    (tmp_path / f".other.csv.tmp-{dead}").write_text("not the submission's")
    write_submission(tmp_path / "submission.csv", ["A", "B"], np.array([[1.0], [2.5]]), ["cohesion"], "id")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.csv.tmp-{dead}", f".submission.csv.tmp-{live_pid}",
                                                          "submission.csv"]
    assert (tmp_path / "submission.csv").read_text() == "id,cohesion\nA,1.0\nB,2.5\n"
