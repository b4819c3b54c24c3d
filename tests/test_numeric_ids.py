"""Ids that look like numbers or missing values (0001, 1.50, 1e3, NA) stay the input's
text wherever a run's CSVs are read back: a finished run resumes without retraining a
fold, and its OOF, blends and submissions carry the ids exactly as given."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import train_tiny_run

from foldtune.data.demo import make_demo
from foldtune.data.validate import read_csv_text
from foldtune.files import atomic_write_csv
from foldtune.run_layout import read_run_csv

# what pandas reads, unasked, as 1, 1.5, 1000.0, NaN, NaN, NaN, 0, 3, True, 1000
ODD_IDS = ["0001", "1.50", "1e3", "NA", "nan", "NULL", "00", "+3", "TRUE", "1_000"]


def test_a_run_csv_reads_its_ids_back_as_written(tmp_path):
    frame = pd.DataFrame({"text_id": ODD_IDS, "fold": range(len(ODD_IDS)), "a": [0.5] * len(ODD_IDS)})
    atomic_write_csv(tmp_path / "oof.csv", frame)
    back = read_run_csv(tmp_path / "oof.csv", "text_id")
    assert back["text_id"].tolist() == ODD_IDS
    assert back["fold"].tolist() == list(range(len(ODD_IDS))) and back["a"].dtype == "float64"


def _run_with_ids(backbone, work, ids):
    """A finished 2-fold run of 24 demo essays whose first train ids are `ids`."""
    train, test = make_demo(n_train=24, n_test=6, seed=5)
    train["text_id"] = ids + [f"{i:05d}" for i in range(len(train) - len(ids))]
    test["text_id"] = ["0001", "1.50", "1e3", "NA", "007", "5e-1"]
    train.to_csv(work / "train.csv", index=False)
    test.to_csv(work / "test.csv", index=False)
    return train_tiny_run(backbone, work, "odd"), work


@pytest.fixture(scope="module")
def odd_id_run(tiny_bert, tmp_path_factory):
    return _run_with_ids(tiny_bert, tmp_path_factory.mktemp("odd-ids"), ODD_IDS)


@pytest.fixture(scope="module")
def numeric_id_run(tiny_bert, tmp_path_factory):
    """Ids that only look like numbers: pandas reads them as other numbers, none as missing."""
    return _run_with_ids(tiny_bert, tmp_path_factory.mktemp("numeric-ids"), ["0001", "1.50", "1e3", "00", "+3"])


@pytest.mark.parametrize("which", ["numeric_id_run", "odd_id_run"])
def test_resuming_a_finished_run_with_odd_ids_retrains_nothing(which, request, monkeypatch):
    from foldtune.training.prepared import PreparedRun
    from foldtune.training.resume import resume_run

    run, work = request.getfixturevalue(which)
    weights = [run / f"fold_{k}" / "best" / "model.safetensors" for k in (0, 1)]
    written = [w.stat().st_mtime_ns for w in weights]

    def retrain(self, fold, *args, **kwargs):
        raise AssertionError(f"fold {fold} of a finished run was trained again")

    monkeypatch.setattr(PreparedRun, "train_fold", retrain)
    resume_run(run)
    assert [w.stat().st_mtime_ns for w in weights] == written

    given = read_csv_text(work / "train.csv")["text_id"].tolist()
    oof = read_csv_text(run / "oof.csv")
    assert sorted(oof["text_id"]) == sorted(given)
    folds = read_csv_text(run / "folds.csv")
    assert folds["text_id"].tolist() == given


def test_blends_reports_and_submissions_keep_odd_ids(odd_id_run, tmp_path):
    from foldtune.ensemble import load_member
    from foldtune.inference import run_inference
    from foldtune.report import write_report

    run, work = odd_id_run
    given = read_csv_text(work / "train.csv")["text_id"].tolist()
    assert sorted(load_member(run).oof["text_id"].tolist()) == sorted(given)
    report = write_report(run).read_text()      # its scatter plot matches OOF rows to train rows by id
    assert "![OOF prediction against the true score]" in report and "not drawn" not in report

    out = run_inference(run, None, tmp_path / "submission.csv", device="cpu")
    assert read_csv_text(out)["text_id"].tolist() == ["0001", "1.50", "1e3", "NA", "007", "5e-1"]
