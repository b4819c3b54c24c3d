"""training.seeds: each fold trained once per seed (fold_k/seed_<s>), the fold's OOF the mean
of its seeds', each seed scored on its own predictions, inference averaging every (fold,
seed) checkpoint, resume retraining only the (fold, seed) models that had not finished."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import assert_scores_match_oof, train_tiny_run

from foldtune.checkpoint import load_checkpoint, read_meta
from foldtune.config import ConfigError, load_config
from foldtune.data.dataset import TextDataset, encode_texts
from foldtune.inference import UnfinishedFolds, predict_run
from foldtune.metrics import column_rmse
from foldtune.runtime.precision import resolve_precision
from foldtune.runtime.predict import predict

SEEDS = (42, 7)
TARGETS = ["cohesion", "syntax", "vocabulary", "phraseology", "grammar", "conventions"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("seeds")


@pytest.fixture(scope="module")
def seeded(tiny_bert, work):
    return train_tiny_run(tiny_bert, work, "seeded", "training.seeds=[42,7]")


def _predictions(csv) -> np.ndarray:
    """A run's OOF predictions as they were computed (float32: written with float32's digits)."""
    return pd.read_csv(csv)[TARGETS].to_numpy(dtype=np.float32)


def test_a_run_trains_a_checkpoint_per_fold_and_seed_each_with_its_seed(seeded):
    assert sorted(p.relative_to(seeded).as_posix() for p in seeded.glob("fold_*/**/best")) == [
        "fold_0/seed_42/best", "fold_0/seed_7/best", "fold_1/seed_42/best", "fold_1/seed_7/best"]
    for fold in (0, 1):
        for seed in SEEDS:
            folder = seeded / f"fold_{fold}" / f"seed_{seed}"
            meta = read_meta(folder / "best")
            assert (meta["fold"], meta["seed"]) == (fold, seed)
            assert load_config(folder / "best" / "foldtune.yaml").training.seed == seed
            assert json.loads((folder / "result.json").read_text())["fold"] == fold
        # the seed acts: the two models of a fold predict otherwise
        a, b = (_predictions(seeded / f"fold_{fold}" / f"seed_{seed}" / "oof.csv") for seed in SEEDS)
        assert np.abs(a - b).max() > 1e-3


def test_the_fold_oof_is_the_mean_of_its_seeds_oof(seeded):
    run_oof = pd.read_csv(seeded / "oof.csv")
    for fold in (0, 1):
        per_seed = [pd.read_csv(seeded / f"fold_{fold}" / f"seed_{seed}" / "oof.csv") for seed in SEEDS]
        fold_oof = pd.read_csv(seeded / f"fold_{fold}" / "oof.csv")
        assert fold_oof["text_id"].tolist() == per_seed[0]["text_id"].tolist() == per_seed[1]["text_id"].tolist()
        mean = np.mean([p[TARGETS].to_numpy(dtype=np.float32) for p in per_seed], axis=0, dtype=np.float64)
        np.testing.assert_array_equal(fold_oof[TARGETS].to_numpy(dtype=np.float32), mean.astype(np.float32))
        rows = run_oof[run_oof["fold"] == fold].set_index("text_id").loc[fold_oof["text_id"]]
        np.testing.assert_array_equal(rows[TARGETS].to_numpy(), fold_oof[TARGETS].to_numpy())


def test_each_seed_is_scored_on_its_own_predictions_and_the_run_on_their_mean(seeded, work):
    train = pd.read_csv(work / "train.csv", dtype={"text_id": str})
    assert_scores_match_oof(seeded, train)          # the OOF (seeds averaged) and each fold's
    scores = json.loads((seeded / "scores.json").read_text())
    truth = train.set_index("text_id")
    for seed in SEEDS:
        oof = pd.concat([pd.read_csv(seeded / f"fold_{k}" / f"seed_{seed}" / "oof.csv") for k in (0, 1)])
        rmse = column_rmse(truth.loc[oof["text_id"], TARGETS].to_numpy(dtype=np.float64),
                           oof[TARGETS].to_numpy(dtype=np.float64))
        assert scores["seeds"][str(seed)]["mcrmse"] == pytest.approx(rmse.mean(), abs=1e-6)
        assert [scores["seeds"][str(seed)]["per_target"][t] for t in TARGETS] == pytest.approx(rmse.tolist(), abs=1e-6)
        for fold in (0, 1):
            result = json.loads((seeded / f"fold_{fold}" / f"seed_{seed}" / "result.json").read_text())
            assert scores["folds"][str(fold)]["seeds"][str(seed)]["mcrmse"] == result["mcrmse"]
    assert list(scores["seeds"]) == ["42", "7"]
    assert scores["seeds"]["42"]["mcrmse"] != scores["seeds"]["7"]["mcrmse"] != scores["oof"]["mcrmse"]
    report = (seeded / "report.md").read_text()
    for seed in SEEDS:
        assert f"| OOF seed {seed} | " in report and f"{scores['seeds'][str(seed)]['mcrmse']:.4f} |" in report
    assert f"| **OOF** (seeds averaged) | {scores['oof']['per_target']['cohesion']:.4f} |" in report


def test_one_seed_in_seeds_gives_the_oof_of_training_seed(tiny_bert, work):
    alone = train_tiny_run(tiny_bert, work, "seed_7", "training.seed=7")
    listed = train_tiny_run(tiny_bert, work, "seeds_7", "training.seeds=[7]")
    assert (listed / "oof.csv").read_bytes() == (alone / "oof.csv").read_bytes()
    assert (listed / "fold_0" / "seed_7" / "best").is_dir() and not (listed / "fold_0" / "best").exists()
    assert (listed / "fold_1" / "oof.csv").read_bytes() == (alone / "fold_1" / "oof.csv").read_bytes()


def _checkpoint_predictions(folder, texts) -> np.ndarray:
    model, _ = load_checkpoint(folder, "cpu")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    dataset = TextDataset(encode_texts(tokenizer, texts, 48, "head", 0.25).input_ids)
    import torch

    return predict(model, dataset, 32, tokenizer.pad_token_id, torch.device("cpu"),
                   resolve_precision("fp32", torch.device("cpu")), 1)


def test_inference_averages_every_fold_and_seed_checkpoint(seeded, work):
    texts = pd.read_csv(work / "test.csv")["full_text"].tolist()
    each = {(fold, seed): _checkpoint_predictions(seeded / f"fold_{fold}" / f"seed_{seed}" / "best", texts)
            for fold in (0, 1) for seed in SEEDS}
    preds, meta = predict_run(seeded, texts, device="cpu")
    np.testing.assert_allclose(preds, np.mean(list(each.values()), axis=0), rtol=0, atol=1e-6)
    assert (meta["n_folds"], meta["n_models"]) == (2, 4)
    # fold weights weigh folds: each fold's seeds averaged first
    weighted, _ = predict_run(seeded, texts, device="cpu", fold_weights=[3, 1])
    fold_means = [(each[(k, 42)] + each[(k, 7)]) / 2 for k in (0, 1)]
    np.testing.assert_allclose(weighted, 0.75 * fold_means[0] + 0.25 * fold_means[1], rtol=0, atol=1e-6)


def test_an_unfinished_seed_of_a_fold_is_refused_naming_it(seeded, work, tmp_path):
    run = shutil.copytree(seeded, tmp_path / "training")
    (run / "fold_1" / "seed_7" / "result.json").unlink()
    texts = pd.read_csv(work / "test.csv")["full_text"].tolist()
    with pytest.raises(UnfinishedFolds, match=r"fold\(s\) \[1\] of .*training have no finished checkpoint \(fold 1: "
                                              r"no fold_1/seed_7/result.json, so still training or stopped\)"):
        predict_run(run, texts, device="cpu")
    preds, meta = predict_run(run, texts, device="cpu", allow_missing_folds=True)
    np.testing.assert_array_equal(preds, predict_run(seeded, texts, device="cpu", folds=[0])[0])
    assert meta["n_models"] == 2
    shutil.rmtree(run / "fold_1" / "seed_7" / "best")
    with pytest.raises(UnfinishedFolds, match=r"\(fold 1: no checkpoint fold_1/seed_7/best\)"):
        predict_run(run, texts, device="cpu")


def test_resume_after_a_stop_trains_only_the_unfinished_fold_seed_models(tiny_bert, work, seeded, monkeypatch):
    import signal

    from foldtune.run_layout import FoldSeed
    from foldtune.training import stopping
    from foldtune.training.resume import resume_run
    from foldtune.training.state import state_files
    from foldtune.training.trainer import FoldTrainer

    original = FoldTrainer._count_step
    steps = []

    def counting(self):
        original(self)
        steps.append((self.unit, self.step))
        if self.unit == FoldSeed(0, 7) and self.step == 1 and stop_at_first:
            stopping.request_stop(signal.SIGTERM)

    monkeypatch.setattr(FoldTrainer, "_count_step", counting)
    stop_at_first = True
    try:
        with pytest.raises(stopping.TrainingInterrupted):
            train_tiny_run(tiny_bert, work, "stopped", "training.seeds=[42,7]")
    finally:
        stopping.clear_stop_request()
    run = work / "runs" / "stopped"
    assert steps == [(FoldSeed(0, 42), 1), (FoldSeed(0, 42), 2), (FoldSeed(0, 7), 1)]
    assert (run / "fold_0" / "seed_42" / "result.json").is_file() and state_files(run / "fold_0" / "seed_7")
    assert not (run / "fold_0" / "seed_7" / "result.json").exists() and not (run / "oof.csv").exists()

    steps.clear()
    stop_at_first = False
    resume_run(run)
    # fold 0 seed 42 is read back, fold 0 seed 7 goes on from its step 1, fold 1 trains both seeds
    assert steps == [(FoldSeed(0, 7), 2), (FoldSeed(1, 42), 1), (FoldSeed(1, 42), 2),
                     (FoldSeed(1, 7), 1), (FoldSeed(1, 7), 2)]
    np.testing.assert_allclose(_predictions(run / "oof.csv"), _predictions(seeded / "oof.csv"), rtol=0, atol=1e-6)
    assert json.loads((run / "scores.json").read_text())["seeds"].keys() == {"42", "7"}


@pytest.mark.parametrize("value, expected", [
    ("[]", "expected null or a non-empty list of distinct integers in [0, 2^32), e.g. [42, 7, 1234], got []"),
    ("[42,7,42]", "expected null or a non-empty list of distinct integers in [0, 2^32), e.g. [42, 7, 1234], got "
                  "[42, 7, 42]"),
    ("[42,1.5]", "expected an integer, got 1.5"),
    ("[seven]", "expected an integer, got 'seven'"),
    ("7", "expected a list, got 7"),
])
def test_a_bad_seeds_value_is_a_one_line_config_error(value, expected):
    with pytest.raises(ConfigError) as bad:
        load_config(None, [f"training.seeds={value}"])
    assert str(bad.value) == f"config key 'training.seeds' set on the command line: {expected}"
    assert "\n" not in str(bad.value)


@pytest.mark.parametrize("overrides, world_size, expected", [
    (["model.type=tfidf_ridge"], 1, "training.seeds: model.type tfidf_ridge fits the same model whatever the seed: "
                                    "set training.seeds: null"),
    (["distill.teacher=runs/x"], 1, "training.seeds: a distillation run trains one student: set training.seeds: "
                                    "null"),
    ([], 2, "training.seeds: not under a launch of 2 processes yet: run it as plain python train.py "
            "(training.parallel_folds trains seeds side by side), or set training.seeds: null"),
])
def test_what_cannot_train_seeds_says_so_in_one_line(overrides, world_size, expected):
    from foldtune.training.checks import check_seeds

    cfg = load_config(None, ["training.seeds=[1,2]", *overrides])
    with pytest.raises(ConfigError) as refused:
        check_seeds(cfg, world_size)
    assert str(refused.value) == expected
    check_seeds(load_config(None, overrides), world_size)       # without seeds: nothing to refuse


def test_an_export_of_a_seeded_run_predicts_as_the_run(seeded, work, tmp_path, monkeypatch):
    from foldtune import export

    monkeypatch.setattr(export, "build_wheel", lambda out_dir, root=None: out_dir / "foldtune.whl")
    out = export.export_run(seeded, tmp_path / "kaggle")
    assert json.loads((out / "run.json").read_text())["folds"] == [0, 1]
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("fold_*/**/result.json")) == [
        "fold_0/seed_42/result.json", "fold_0/seed_7/result.json", "fold_1/seed_42/result.json",
        "fold_1/seed_7/result.json"]
    texts = pd.read_csv(work / "test.csv")["full_text"].tolist()
    np.testing.assert_array_equal(predict_run(out, texts, device="cpu")[0], predict_run(seeded, texts, device="cpu")[0])


def test_seeds_trained_in_processes_side_by_side_give_the_sequential_oof(tiny_bert, work, seeded):
    run = train_tiny_run(tiny_bert, work, "processes", "training.seeds=[42,7]", "training.parallel_folds=2",
                         "training.parallel_mode=processes")
    assert (run / "oof.csv").read_bytes() == (seeded / "oof.csv").read_bytes()
    assert read_meta(run / "fold_1" / "seed_7" / "best")["seed"] == 7


def test_a_compressed_seeded_run_keeps_every_fold_and_seed(seeded, work, tmp_path):
    from foldtune.compress import compress_run

    summary = compress_run(seeded, tmp_path / "small", rank=4)
    out = tmp_path / "small"
    assert list(summary["folds"]) == ["0 seed 42", "0 seed 7", "1 seed 42", "1 seed 7"]
    assert json.loads((out / "run.json").read_text())["folds"] == [0, 1]
    assert read_meta(out / "fold_1" / "seed_7" / "best")["seed"] == 7
    texts = pd.read_csv(work / "test.csv")["full_text"].tolist()
    assert predict_run(out, texts, device="cpu")[1]["n_models"] == 4


def test_seeds_written_without_brackets_on_the_command_line_are_integers():
    assert load_config(None, ["training.seeds=42,7"]).training.seeds == (42, 7)
    # a string list keeps its pieces as they are: a column named "7" stays "7"
    assert load_config(None, ["data.target_columns=a,7"]).data.target_columns == ("a", "7")
