"""A fold still training (its best/ written, its result.json not yet) is never averaged
unasked: infer.py refuses it naming it, --allow-missing-folds leaves it out with one
warning, infer.py without --run takes the latest finished run, and export and compress
refuse it suggesting only options they accept."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import train_tiny_run

from foldtune.cli import infer_main
from foldtune.inference import UnfinishedFolds, predict_run, run_inference


@pytest.fixture(scope="module")
def finished(tiny_deberta, tmp_path_factory):
    work = tmp_path_factory.mktemp("unfinished")
    return train_tiny_run(tiny_deberta, work, "done"), work


@pytest.fixture
def training(finished, tmp_path):
    """A copy of the run as it looks while fold 1 trains: fold_1/best from an early
    evaluation, no fold_1/result.json."""
    run, work = finished
    copy = shutil.copytree(run, tmp_path / "runs" / "training")
    (copy / "fold_1" / "result.json").unlink()
    return copy, work


def test_a_fold_still_training_is_refused_naming_it(training, tmp_path, capsys):
    run, work = training
    with pytest.raises(UnfinishedFolds, match=r"fold\(s\) \[1\] of .*training have no finished checkpoint \(fold 1: "
                                              r"no fold_1/result.json, so still training or stopped\): finish them "
                                              r"with `python train.py --resume .*training`"):
        run_inference(run, None, tmp_path / "sub.csv", device="cpu")
    assert infer_main(["--run", str(run), "--out", str(tmp_path / "sub.csv"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "fold(s) [1] of" in err and err.rstrip().endswith("or pass --allow-missing-folds to average the others")
    assert not (tmp_path / "sub.csv").exists()


@pytest.mark.parametrize("state", ["still training", "no checkpoint yet"])
def test_allow_missing_folds_averages_the_finished_ones_with_one_warning(state, training, tmp_path, capsys):
    run, work = training
    why = "no fold_1/result.json, so still training or stopped"
    if state == "no checkpoint yet":
        shutil.rmtree(run / "fold_1" / "best")
        why = "no checkpoint fold_1/best"
    texts = pd.read_csv(work / "test.csv")["full_text"].tolist()
    fold_0, meta = predict_run(run, texts, device="cpu", folds=[0])
    capsys.readouterr()
    assert infer_main(["--run", str(run), "--out", str(tmp_path / "sub.csv"), "--device", "cpu",
                       "--allow-missing-folds"]) == 0
    err = capsys.readouterr().err
    assert err.count("fold 1 of") == 1 and f"fold 1 of {run} is left out ({why})\n" in err
    assert "1 fold(s) averaged" in err
    got = pd.read_csv(tmp_path / "sub.csv").iloc[:, 1:].to_numpy()
    np.testing.assert_allclose(got, np.clip(fold_0, *meta["target_range"]), rtol=0, atol=1e-6)


def test_infer_without_run_takes_the_latest_finished_run(training, tmp_path, capsys):
    unfinished, work = training
    runs = unfinished.parent
    done = shutil.copytree(work / "runs" / "done", runs / "done")
    newer = (done / "config.yaml").stat().st_mtime + 60
    os.utime(unfinished / "config.yaml", (newer, newer))       # the unfinished run started last
    assert infer_main(["--runs-dir", str(runs), "--out", str(tmp_path / "sub.csv"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"using the latest finished run: {done}\n" in err
    assert str(unfinished) not in err

    shutil.rmtree(done)
    assert infer_main(["--runs-dir", str(runs), "--out", str(tmp_path / "other.csv"), "--device", "cpu"]) == 2
    assert f"error: no finished run under {runs}/ (1 unfinished: finish one with `python train.py --resume RUN`)" \
        in capsys.readouterr().err
    assert not (tmp_path / "other.csv").exists()


@pytest.fixture
def logged():
    """The lines foldtune logs during the test (whatever handlers earlier tests installed)."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("foldtune")
    log.addHandler(handler)
    yield lines
    log.removeHandler(handler)


def test_export_refuses_a_fold_still_training_or_leaves_it_out_when_asked(training, tmp_path, capsys, monkeypatch,
                                                                         logged):
    from foldtune import export

    run, work = training
    assert export.main([str(run), str(tmp_path / "kaggle")]) == 2
    err = capsys.readouterr().err
    assert "fold(s) [1] of" in err and err.rstrip().endswith("or pass --allow-missing-folds to export the others")
    assert not (tmp_path / "kaggle").exists()

    # the option the message names is one export accepts (the wheel: not what is tested here)
    monkeypatch.setattr(export, "build_wheel", lambda out_dir, root=None: out_dir / "foldtune.whl")
    assert export.main([str(run), str(tmp_path / "kaggle"), "--allow-missing-folds"]) == 0
    assert [line for line in logged if "fold 1" in line] == [
        f"fold 1 of {run} is left out (no fold_1/result.json, so still training or stopped)"]
    exported = tmp_path / "kaggle"
    assert sorted(p.name for p in exported.glob("fold_*")) == ["fold_0"]
    assert (exported / "fold_0" / "result.json").read_bytes() == (run / "fold_0" / "result.json").read_bytes()
    texts = pd.read_csv(work / "test.csv")["full_text"].tolist()
    np.testing.assert_array_equal(predict_run(exported, texts, device="cpu")[0],
                                  predict_run(run, texts, device="cpu", folds=[0])[0])

    # an export made before exports held result.json: the way out is a new export, not a resume
    (exported / "fold_0" / "result.json").unlink()
    with pytest.raises(UnfinishedFolds) as refused:
        predict_run(exported, texts, device="cpu")
    assert str(refused.value).endswith(f"no fold_0/result.json, so still training or stopped): export its run "
                                       f"again into {exported} (foldtune export --run RUN --out {exported})")


def test_compress_and_blends_do_not_suggest_an_option_they_lack(training, tmp_path, capsys):
    from foldtune.compress import main as compress_main
    from foldtune.ensemble import main as ensemble_main

    run, work = training
    assert compress_main(["--run", str(run), "--out", str(tmp_path / "small"), "--rank", "4"]) == 2
    err = capsys.readouterr().err
    assert "fold(s) [1] of" in err and "--allow-missing-folds" not in err

    assert ensemble_main([str(run), str(work / "runs" / "done"), "--out", str(tmp_path / "blend.json")]) == 0
    assert infer_main(["--blend", str(tmp_path / "blend.json"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "fold(s) [1] of" in err and "--allow-missing-folds" not in err
    assert not (tmp_path / "submission.csv").exists()
