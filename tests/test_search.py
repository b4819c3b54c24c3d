"""foldtune search: the space file checked before any trial, trials as run folders in the search
folder, best.yaml holding the best trial's values, resume by the same command, the median pruner
told of every fold (scores injected through train_folds, to pin exactly which trials it stops)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from foldtune.config import Config, ConfigError, load_config
from foldtune.run_layout import FoldSeed
from foldtune.runs import list_runs
from foldtune.search import study as search_study
from foldtune.search.command import main as search_main
from foldtune.search.definition import prepare_search
from foldtune.search.space import Choices, Range, SpaceError, load_space
from foldtune.training.stopping import TrainingInterrupted, clear_stop_request

SPACE = {"training.lr": {"low": "1e-5", "high": "1e-3", "log": True}, "model.pooling": {"choices": ["mean", "cls"]}}


@pytest.fixture(scope="module")
def base(tiny_bert, tmp_path_factory) -> Path:
    """A 2-fold, 1-epoch config of the tiny BERT on 24 demo essays, and a space of two keys beside it."""
    from foldtune.data.demo import make_demo

    work = tmp_path_factory.mktemp("search")
    make_demo(n_train=24, n_test=0, seed=5)[0].to_csv(work / "train.csv", index=False)
    config = {"data": {"train_file": str(work / "train.csv"), "test_file": None, "max_len": 48},
              "folds": {"n_splits": 2}, "model": {"name": str(tiny_bert)},
              "training": {"epochs": 1, "batch_size": 6, "eval_steps": 1}, "output": {"dir": str(work / "runs")}}
    (work / "base.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (work / "space.yaml").write_text(yaml.safe_dump(SPACE, sort_keys=False), encoding="utf-8")
    return work / "base.yaml"


def _search(base: Path, out: Path, trials: int, *extra: str) -> int:
    """The search command; no trial pruned (3 startup trials): the pruner is pinned below, with scripted scores."""
    return search_main(["--config", str(base), "--space", str(base.with_name("space.yaml")), "--trials", str(trials),
                        "--out", str(out), "--startup-trials", "3", *extra])


@pytest.fixture(scope="module")
def searched(base) -> Path:
    out = base.parent / "runs" / "search"
    assert _search(base, out, 2) == 0
    return out


def _trials(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "trials.csv")


# --- a real search, tiny ------------------------------------------------------------------


def test_each_trial_is_a_run_of_the_base_config_with_its_values(searched, base):
    trials = _trials(searched)
    assert trials["number"].tolist() == [0, 1]
    assert trials["state"].tolist() == ["complete", "complete"]
    assert trials["run"].tolist() == ["trial_0000", "trial_0001"]
    for _, row in trials.iterrows():
        run_cfg = load_config(searched / row["run"] / "config.yaml")
        assert (run_cfg.training.lr, run_cfg.model.pooling) == (row["training.lr"], row["model.pooling"])
        assert (run_cfg.training.epochs, run_cfg.folds.n_splits, run_cfg.output.dir) == (1, 2, str(searched))
        # the trial's value is its run's OOF MCRMSE, each fold's score the fold's
        scores = json.loads((searched / row["run"] / "scores.json").read_text())
        assert row["oof_mcrmse"] == scores["oof"]["mcrmse"]
        assert [row["fold_0"], row["fold_1"]] == [scores["folds"]["0"]["mcrmse"], scores["folds"]["1"]["mcrmse"]]
    # the ledger lists the trials as it lists any run, with the same scores
    ledger = {entry.path.name: entry for entry in list_runs(searched)}
    assert sorted(ledger) == ["trial_0000", "trial_0001"]
    assert [ledger[run].oof for run in trials["run"]] == trials["oof_mcrmse"].tolist()


def test_best_yaml_is_the_base_config_with_the_best_trials_values(searched, base):
    trials = _trials(searched)
    best = trials.loc[trials["oof_mcrmse"].idxmin()]
    cfg = load_config(searched / "best.yaml")
    assert (cfg.training.lr, cfg.model.pooling) == (best["training.lr"], best["model.pooling"])
    # everything else is the base config's
    expected = load_config(base, [f"training.lr={float(best['training.lr'])!r}", f"model.pooling={best['model.pooling']}"])
    assert cfg == expected
    report = (searched / "report.md").read_text()
    assert f"Trial {best['number']} (`{best['run']}`), OOF MCRMSE **{best['oof_mcrmse']:.4f}**" in report
    assert "| model.pooling |" in report and (searched / "importance.png").stat().st_size > 0


def test_the_same_command_with_more_trials_runs_only_the_missing_ones(searched, base):
    before = _trials(searched)
    assert _search(base, searched, 3) == 0
    after = _trials(searched)
    assert after["number"].tolist() == [0, 1, 2]
    pd.testing.assert_frame_equal(after.iloc[:2], before)
    assert after["state"].tolist() == ["complete"] * 3
    assert sorted(p.name for p in searched.glob("trial_*")) == ["trial_0000", "trial_0001", "trial_0002"]
    # the resumed sampler draws anew: not the first trial's values again
    assert after.loc[2, "training.lr"] not in before["training.lr"].tolist()
    # and a study that holds its trials runs none
    assert _search(base, searched, 3) == 0
    assert len(_trials(searched)) == 3


def test_a_search_folder_refuses_another_base_config_or_space(searched, base, capsys):
    assert _search(base, searched, 4, "training.epochs=2") == 2
    assert capsys.readouterr().err == (
        f"error: {searched} holds a search of another base config ({searched / 'search.json'}): resume it with the "
        "config, overrides and space it started with, or give another --out\n")
    assert len(_trials(searched)) == 3


# --- the space file -------------------------------------------------------------------------


def _space(tmp_path: Path, entries) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(entries, sort_keys=False), encoding="utf-8")
    return path


def test_a_space_file_reads_ranges_and_choices_with_the_keys_types(tmp_path):
    space = load_space(_space(tmp_path, {
        "training.lr": {"low": "1e-5", "high": 1e-4, "log": True},
        "training.layerwise_lr_decay": {"low": 0.7, "high": 1.0},
        "training.epochs": {"low": 2, "high": 5, "step": 1},
        "model.pooling": {"choices": ["mean", "cls", "attention"]},
        "awp.enabled": {"choices": [True, False]},
        "training.head_lr": {"choices": [None, 1e-3]}}), Config())
    assert space.dimensions == (
        Range("training.lr", 1e-5, 1e-4, integer=False, log=True),
        Range("training.layerwise_lr_decay", 0.7, 1.0, integer=False),
        Range("training.epochs", 2, 5, integer=True, step=1),
        Choices("model.pooling", ("mean", "cls", "attention")),
        Choices("awp.enabled", (True, False)),
        Choices("training.head_lr", (None, 1e-3)))



def test_the_committed_essay_space_loads_on_its_base_config_with_cuda_graphs_and_on_a_cpu():
    """configs/search/ellipse_minilm.yaml over configs/ellipse_minilm_fast.yaml (the README's
    evidence command): each bound and choice passes the techniques' refusals under the base's
    CUDA graphs, and the device checks (pooling names, ...) on a CPU without them."""
    from foldtune.models.regressor import load_backbone_config, resolve_backbone
    from foldtune.runtime.precision import resolve_device
    from foldtune.training.checks import check_config_against_device
    from foldtune.training.step import check_techniques

    repo = Path(__file__).resolve().parents[1]
    path, config = repo / "configs" / "search" / "ellipse_minilm.yaml", repo / "configs" / "ellipse_minilm_fast.yaml"
    graphs = load_config(config, ["training.parallel_folds=1"])
    assert graphs.training.cuda_graphs
    space = load_space(path, graphs, check_techniques)
    cpu = load_config(config, ["training.parallel_folds=1", "training.cuda_graphs=false"])
    assert load_space(path, cpu, lambda cfg: check_config_against_device(cfg, resolve_device("cpu"))) == space
    assert space.dimensions == (
        Range("training.lr", 2e-5, 2e-4, integer=False, log=True),
        Range("training.head_lr", 3e-4, 3e-3, integer=False, log=True),
        Range("training.epochs", 2, 5, integer=True, step=1),
        Range("training.warmup_ratio", 0.0, 0.2, integer=False),
        Range("training.layerwise_lr_decay", 0.7, 1.0, integer=False),
        Choices("model.pooling", ("mean", "attention", "gem", "weighted_layers")),
        Range("model.backbone_dropout", 0.0, 0.1, integer=False))
    # weighted_layers pools the top pooling_layers layers: MiniLM has enough of them
    assert load_backbone_config(resolve_backbone(cpu.model.name)).num_hidden_layers >= cpu.model.pooling_layers


@pytest.mark.parametrize("entries, message", [
    ({"training.lrr": {"low": 1e-5, "high": 1e-4}}, "'training.lrr' is not a config key (did you mean 'training.lr'?)"),
    ({"training": {"low": 1, "high": 2}}, "'training' is a section: expected one of its keys, e.g. 'training.epochs'"),
    ({"training.lr": {"low": 1e-3, "high": 1e-5}}, "'training.lr': expected low <= high, got low 0.001 > high 1e-05"),
    ({"awp.enabled": {"choices": ["yes", False]}}, "'awp.enabled': expected choices that are true or false, got 'yes'"),
    ({"training.epochs": {"low": 2, "high": 4.5}}, "'training.epochs': expected an integer as high, got 4.5"),
    ({"model.pooling": {"low": 1, "high": 2}},
     "'model.pooling': expected {choices: [...]} (the key takes a string, not a range), got a range"),
    ({"training.scheduler": {"choices": ["cosine", "step"]}},
     "'training.scheduler': expected choices that are one of linear, cosine, constant, got 'step'"),
    ({"training.lr": {"low": 0, "high": 1e-4, "log": True}}, "'training.lr': expected low > 0 with log: true, got low 0.0"),
    ({"training.layerwise_lr_decay": {"low": 0.7, "high": 1.5}},
     "'training.layerwise_lr_decay': the value 1.5 is refused: config key 'training.layerwise_lr_decay': expected a "
     "number in (0, 1], got 1.5"),
    ({"model.pooling": {"choices": ["mean", "meen"]}},
     "'model.pooling': the value 'meen' is refused: unknown pooling 'meen' in 'model.pooling' (did you mean 'mean'?); "
     "valid: attention, cls, concat_cls, gem, max, mean, weighted_layers"),
    ({"training.lr": {"low": 1e-5, "hi": 1e-4}},
     "'training.lr': expected the fields low, high, log, step or choices, got hi"),
    ({"training.lr": [1e-5, 1e-4]}, "'training.lr': expected {low: ..., high: ...} or {choices: [...]}, got "
                                     "[1e-05, 0.0001]"),
    ({"folds.n_splits": {"choices": [3, 5]}},
     "'folds.n_splits': the trials keep the base config's folds (the trials' scores compare only on the same folds)"),
    ({"training.adam_betas": {"choices": [1, 2]}},
     "'training.adam_betas' holds a list, which the search cannot vary: expected a key of one value"),
])
def test_a_space_mistake_fails_in_one_line_naming_the_file_and_the_key(tmp_path, entries, message):
    from foldtune.runtime.precision import resolve_device
    from foldtune.training.checks import check_config_against_device

    path = _space(tmp_path, entries)
    with pytest.raises(SpaceError) as caught:
        load_space(path, Config(), lambda cfg: check_config_against_device(cfg, resolve_device("cpu")))
    assert str(caught.value) == f"{path}: {message}"


def test_a_space_file_that_is_not_yaml_fails_in_one_line_with_where(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("training.lr: [1, 2\n")
    with pytest.raises(SpaceError) as caught:
        load_space(path, Config(), lambda cfg: None)
    assert str(caught.value) == f"{path}: not valid YAML: line 2, column 1: expected ',' or ']', but got '<stream end>'"


def test_the_command_checks_the_space_before_any_trial(base, tmp_path, capsys):
    path = _space(tmp_path, {"training.lr": {"low": 1e-3, "high": 1e-5}})
    out = tmp_path / "never"
    assert search_main(["--config", str(base), "--space", str(path), "--trials", "2", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {path}: 'training.lr': expected low <= high, got low 0.001 > high 1e-05\n"
    assert not out.exists()


# --- pruning and stops, with each fold's score injected ----------------------------------------


def _scripted(monkeypatch, runs: list) -> list:
    """train_folds replaced: each trial's folds 'score' the next list of `runs` (an exception
    in the list is raised instead); the configs trained are returned in a list."""
    trained, script = [], iter(runs)

    def train_folds(cfg, frame, after_fold):
        trained.append(cfg)
        scores = next(script)
        if isinstance(scores, BaseException):
            raise scores
        for fold, score in enumerate(scores):
            after_fold(FoldSeed(fold), SimpleNamespace(score=score))
        return {"oof": {"mcrmse": sum(scores) / len(scores)}}

    monkeypatch.setattr(search_study, "train_folds", train_folds)
    return trained


def _run(base: Path, out: Path, trials: int):
    search = prepare_search(base, [], base.with_name("space.yaml"), out)
    return search_study.run_search(search, trials, startup_trials=2)


def test_a_trial_is_pruned_after_a_fold_worse_than_the_median_of_the_complete_trials(base, tmp_path, monkeypatch):
    _scripted(monkeypatch, [
        [0.5, 0.3],       # complete
        [0.7, 0.3],       # worse than trial 0 at fold 0, but fewer than 2 complete trials: not pruned
        [0.9, 0.1],       # fold 0 above the median of 0.5 and 0.7 (0.6): pruned, fold 1 never trained
        [0.55, 0.3],      # below the median: goes on
        [0.54, 0.99],     # below the median of 0.5, 0.55, 0.7; after its last fold its best (0.54) is above
                          # the median there (0.3), but a run that has trained every fold is not pruned
    ])
    _run(base, tmp_path / "s", 5)
    trials = _trials(tmp_path / "s")
    assert trials["state"].tolist() == ["complete", "complete", "pruned", "complete", "complete"]
    assert trials["oof_mcrmse"].tolist()[:2] == [0.4, 0.5] and trials["oof_mcrmse"].isna().tolist()[2]
    assert trials.loc[2, "fold_0"] == 0.9 and pd.isna(trials.loc[2, "fold_1"])
    # the trial's folder says so too (`foldtune runs` lists it pruned); no other trial's does
    assert json.loads((tmp_path / "s" / "trial_0002" / "pruned.json").read_text()) == {
        "trial": 2, "after_fold": 0, "mcrmse": 0.9}
    assert sorted(p.parent.name for p in (tmp_path / "s").glob("trial_*/pruned.json")) == ["trial_0002"]
    assert trials.loc[4, ["fold_0", "fold_1"]].tolist() == [0.54, 0.99]
    cfg = load_config(tmp_path / "s" / "best.yaml")
    assert cfg.training.lr == trials.loc[0, "training.lr"]


def test_the_pruner_compares_the_mean_of_the_folds_so_far_not_the_last_fold_alone(base, tmp_path, monkeypatch):
    _scripted(monkeypatch, [
        [0.5, 0.3, 0.4],      # complete: means 0.5, 0.4, 0.4
        [0.7, 0.5, 0.6],      # complete: means 0.7, 0.6, 0.6
        [0.3, 0.6, 0.4],      # fold 1 alone (0.6) is above the median of the fold-1 scores (0.4), its mean
                              # (0.45) below the median of the means (0.5): goes on
        [0.45, 0.85, 0.1],    # fold 0 below the median of 0.5, 0.7, 0.3; its mean after fold 1 (0.65) above the
                              # median of the means 0.4, 0.6, 0.45: pruned
    ])
    search = prepare_search(base, ["folds.n_splits=3"], base.with_name("space.yaml"), tmp_path / "s")
    search_study.run_search(search, 4, startup_trials=2)
    trials = _trials(tmp_path / "s")
    assert trials["state"].tolist() == ["complete", "complete", "complete", "pruned"]
    assert trials.loc[3, ["fold_0", "fold_1"]].tolist() == [0.45, 0.85] and pd.isna(trials.loc[3, "fold_2"])
    assert json.loads((tmp_path / "s" / "trial_0003" / "pruned.json").read_text()) == {
        "trial": 3, "after_fold": 1, "mcrmse": pytest.approx(0.65)}


def test_a_stopped_trial_is_failed_and_its_values_tried_again_on_resume(base, tmp_path, monkeypatch):
    trained = _scripted(monkeypatch, [[0.5, 0.5], TrainingInterrupted(2)])
    try:
        with pytest.raises(TrainingInterrupted):
            _run(base, tmp_path / "s", 3)
    finally:
        clear_stop_request()
    assert _trials(tmp_path / "s")["state"].tolist() == ["complete", "fail", "waiting"]
    trained_again = _scripted(monkeypatch, [[0.6, 0.6], [0.4, 0.4]])
    _run(base, tmp_path / "s", 3)
    trials = _trials(tmp_path / "s")
    assert trials["state"].tolist() == ["complete", "fail", "complete", "complete"]
    assert trained_again[0].training.lr == trained[1].training.lr
    assert trained_again[0].model.pooling == trained[1].model.pooling
    assert trained_again[0].output.name == "trial_0002"


def test_the_report_says_why_it_has_no_importances(base, tmp_path, monkeypatch):
    _scripted(monkeypatch, [[0.5, 0.5]])
    _run(base, tmp_path / "s", 1)
    report = (tmp_path / "s" / "report.md").read_text()
    assert ("Parameter importance not computed: it needs at least 2 complete trials, the study has 1.\n"
            in report)
    assert not (tmp_path / "s" / "importance.png").exists()


def test_a_search_refuses_folds_trained_side_by_side(base):
    with pytest.raises(ConfigError, match=r"^training.parallel_folds=2: a search trains a trial's folds one after "):
        prepare_search(base, ["training.parallel_folds=2"], base.with_name("space.yaml"), None)


def test_a_trial_that_fails_is_recorded_failed_and_not_counted(base, tmp_path, monkeypatch):
    _scripted(monkeypatch, [[0.5, 0.5], RuntimeError("out of memory")])
    with pytest.raises(RuntimeError, match="out of memory"):
        _run(base, tmp_path / "s", 2)
    assert _trials(tmp_path / "s")["state"].tolist() == ["complete", "fail"]
    _scripted(monkeypatch, [[0.6, 0.6]])
    _run(base, tmp_path / "s", 2)
    assert _trials(tmp_path / "s")["state"].tolist() == ["complete", "fail", "complete"]


def test_a_trial_refused_or_out_of_memory_is_failed_and_the_search_goes_on(base, tmp_path, monkeypatch):
    import torch

    _scripted(monkeypatch, [
        [0.5, 0.5],
        ConfigError("model.pooling weighted_layers: pooling_layers 4 but the backbone has 2 layers\nmore"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        [0.6, 0.6],
    ])
    _run(base, tmp_path / "s", 2)
    trials = _trials(tmp_path / "s")
    assert trials["state"].tolist() == ["complete", "fail", "fail", "complete"]
    assert trials["oof_mcrmse"].tolist()[3] == 0.6
    assert trials["error"].fillna("").tolist() == [
        "", "model.pooling weighted_layers: pooling_layers 4 but the backbone has 2 layers",
        "CUDA out of memory. Tried to allocate 2.00 GiB", ""]


def test_three_failed_trials_in_a_row_end_the_search_in_one_line(base, tmp_path, monkeypatch):
    _scripted(monkeypatch, [ConfigError(f"refused {n}") for n in range(3)] + [[0.5, 0.5]])
    with pytest.raises(ConfigError) as stopped:
        _run(base, tmp_path / "s", 1)
    assert str(stopped.value) == (f"3 trials in a row failed (the last: refused 2): change the space "
                                  f"({base.with_name('space.yaml')}) or the base config, then run the same "
                                  "command to resume")
    assert _trials(tmp_path / "s")["state"].tolist() == ["fail", "fail", "fail"]
