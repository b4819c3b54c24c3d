"""A search's trials: each a run folder of the search folder, trained fold by fold, pruned early.

    <out>/
      study.db       optuna's study (SQLite): every trial, its values and fold scores
      search.json    the base config and the space, as the search started: a resume must match
      trial_0000/    a run folder per trial (foldtune runs --runs-dir <out> lists them)
      trials.csv  best.yaml  report.md  importance.png      (records.py)

A trial trains its folds one after another; after each fold the mean of its folds' scores
so far goes to the study (trial.report, step = the fold) and optuna's MedianPruner stops a
trial whose mean is worse than the median of the complete trials' means after as many
folds. The mean rather than the fold's own score: the folds of one trial differ by as much as
trials do (on the essays 0.482 to 0.498 in one trial), and a trial better on its
first fold and worse on its second was pruned though its two folds averaged what the best
trial's did. Each fold's own score is kept in the trial's user attribute FOLD_SCORES.

A pruned trial's run folder stays as it stopped: its finished folds, no scores.json, a
pruned.json (with the mean it was pruned on; `foldtune runs` shows it pruned), and
the study and trials.csv record it pruned. Running the same command again resumes: the
trials that ended are kept, --trials counts the complete and pruned ones, and a trial that
was running when the search stopped is marked failed and its values tried again. A trial
whose values are refused together (a ConfigError) or do not fit the GPU (out of memory) is
recorded failed and the search goes on; MAX_FAILED_IN_A_ROW such trials in a row end it.
Any other error ends the search, its trial recorded failed.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import pandas as pd

from foldtune.config import Config, ConfigError, ConfigOrigin, config_to_dict
from foldtune.files import atomic_write_json
from foldtune.logs import log_to_run_folder, stop_logging_to
from foldtune.run_layout import PRUNED_FILE, FoldResult, FoldSeed
from foldtune.run_lock import RunLock
from foldtune.search.definition import Search
from foldtune.search.records import FOLD_SCORES, write_records

log = logging.getLogger("foldtune")

STUDY_NAME = "foldtune-search"       # one study per search folder
STUDY_FILE = "study.db"
SEARCH_FILE = "search.json"
# Failed trials in a row (values refused together, out of memory) after which the search
# stops: the space or the base config needs a change, not more draws.
MAX_FAILED_IN_A_ROW = 3


def train_folds(cfg: Config, frame: pd.DataFrame, after_fold: Callable[[FoldSeed, FoldResult], None]) -> dict:
    """Train every fold of `cfg` into a new run folder (locked, its log in train.log, as
    train.py does), telling after_fold of each fold; the run's scores."""
    from foldtune.training.cross_validation import new_run_dir, run_cross_validation

    lock = new_run_dir(cfg, "trial")
    run_log = log_to_run_folder(lock.folder)
    try:
        return run_cross_validation(cfg, lock.folder, None, frame, after_fold=after_fold)
    finally:
        lock.release()
        stop_logging_to(run_log)


def run_search(search: Search, trials: int, startup_trials: int = 2, seed: int = 0):
    """Run trials until the study holds `trials` complete or pruned ones; the study."""
    import optuna

    from foldtune.training.cross_validation import load_inputs

    frame = load_inputs(search.base, origin=ConfigOrigin(search.config, search.overrides))
    search.out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(search.out, "search").acquire()
    try:
        _record_or_compare(search)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(f"sqlite:///{search.out.resolve() / STUDY_FILE}")
        earlier = sum(summary.n_trials for summary in optuna.get_all_study_summaries(storage)
                      if summary.study_name == STUDY_NAME)
        study = optuna.create_study(
            storage=storage, study_name=STUDY_NAME, direction="minimize",
            # seeded anew past the trials it holds: a resumed search seeded as it started
            # would draw its first trials' values again
            sampler=optuna.samplers.TPESampler(seed=seed + earlier),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=0),
            load_if_exists=True)
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            log.warning("trial %d was running when the search stopped: marked failed; its values are tried again",
                        trial.number)
            _fail_and_retry(study, trial.number, trial.params)
        done = len(_ended(study))
        if done >= trials:
            log.info("%s holds %d ended trial(s), --trials %d: none to run", search.out, done, trials)
        write_records(study, search)        # a resumed search's, its stopped trials marked failed
        failed: list[str] = []           # the errors of the failed trials since the last that ended
        while len(_ended(study)) < trials:
            try:
                error = _run_trial(study, search, frame)
            finally:        # a trial that stopped or failed is recorded too
                write_records(study, search)
            failed = failed + [error] if error else []
            if len(failed) >= MAX_FAILED_IN_A_ROW:
                raise ConfigError(f"{len(failed)} trials in a row failed (the last: {failed[-1]}): change the "
                                  f"space ({search.space.path}) or the base config, then run the same command to "
                                  "resume")
        return study
    finally:
        lock.release()


def _ended(study) -> list:
    """The trials that count towards --trials: complete or pruned."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def _fail_and_retry(study, number: int, params: dict[str, Any]) -> None:
    from optuna.trial import TrialState

    study.tell(number, state=TrialState.FAIL)
    study.enqueue_trial(params)


def _run_trial(study, search: Search, frame: pd.DataFrame) -> str | None:
    """Ask the study for a trial, train it fold by fold (pruned when a fold is worse than
    the median), tell the study how it ended. The error's line when its values were refused
    together or ran out of memory (the trial failed, the search goes on), else None."""
    import optuna
    import torch

    from foldtune.training.stopping import TrainingInterrupted

    trial = study.ask()
    values = search.space.suggest(trial)
    log.info("trial %d: %s", trial.number, ", ".join(f"{key}={value!r}" for key, value in values.items()))
    # the space holds no folds.* key and no list (training.seeds): the base config's folds and seeds
    models_per_fold = len(search.base.training.seeds or (None,))
    last_fold = search.base.folds.n_splits - 1
    seed_scores: dict[int, list[float]] = {}
    fold_scores: dict[str, float] = {}

    def after_fold(unit: FoldSeed, result: FoldResult) -> None:
        seed_scores.setdefault(unit.fold, []).append(result.score)
        if len(seed_scores[unit.fold]) < models_per_fold:
            return                  # the fold's other seeds are still to train
        # with training.seeds, the mean of its seeds' scores (the ledger's too, until the run ends)
        fold_scores[str(unit.fold)] = sum(seed_scores[unit.fold]) / models_per_fold
        trial.set_user_attr(FOLD_SCORES, dict(fold_scores))
        mean = sum(fold_scores.values()) / len(fold_scores)
        trial.report(mean, step=unit.fold)
        # after the last fold the run is whole: it ends complete, whatever its folds' ranks
        if unit.fold != last_fold and trial.should_prune():
            # said in the trial's folder too: `foldtune runs` shows it pruned, not unfinished
            atomic_write_json(search.out / cfg.output.name / PRUNED_FILE,
                              {"trial": trial.number, "after_fold": unit.fold, "mcrmse": mean})
            log.info("trial %d pruned after fold %d: the mean MCRMSE of its %d fold(s), %.4f, is worse than the "
                     "median of the complete trials' after as many folds", trial.number, unit.fold,
                     len(fold_scores), mean)
            raise optuna.TrialPruned()

    try:
        # values the space allows one by one may be refused together (a ConfigError): the trial fails
        cfg = search.trial_config(trial.number, values)
        trial.set_user_attr("run", cfg.output.name)
        scores = train_folds(cfg, frame, after_fold)
    except optuna.TrialPruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return None
    except TrainingInterrupted:
        _fail_and_retry(study, trial.number, values)
        raise
    except (ConfigError, torch.OutOfMemoryError) as err:
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        trial.set_user_attr("error", line)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.warning("trial %d failed, the search goes on: %s", trial.number, line)
        return line
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    study.tell(trial, scores["oof"]["mcrmse"])
    log.info("trial %d: OOF MCRMSE %.4f (best so far: trial %d, %.4f)", trial.number, scores["oof"]["mcrmse"],
             study.best_trial.number, study.best_value)
    return None


def _record_or_compare(search: Search) -> None:
    """search.json: written when the search starts; a resumed search must have the same
    base config and space, or its trials would not compare."""
    path = search.out / SEARCH_FILE
    now = {"config": str(search.config), "overrides": list(search.overrides), "base": config_to_dict(search.base),
           "space": search.space.as_dict()}
    if not path.is_file():
        atomic_write_json(path, now)
        return
    before = json.loads(path.read_text(encoding="utf-8"))
    differ = [what for what, key in (("base config", "base"), ("space", "space")) if before.get(key) != now[key]]
    if differ:
        raise ConfigError(f"{search.out} holds a search of another {' and '.join(differ)} ({path}): resume it with "
                          f"the config, overrides and space it started with, or give another --out")
