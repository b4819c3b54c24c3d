"""What a search found, written to its folder after every trial, each file whole or not at all:

    trials.csv      a row per trial: number, state, OOF MCRMSE, run folder, its values, each fold's score,
                    why it failed
    best.yaml       the base config with the best complete trial's values: python train.py --config best.yaml
    report.md       the trials' table, the best trial, each key's importance (importance.png)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from foldtune.config import apply_overrides, load_config, read_yaml, set_dotted
from foldtune.files import atomic_path, atomic_write_csv, atomic_write_text

if TYPE_CHECKING:
    from foldtune.search.definition import Search

TRIALS_FILE = "trials.csv"
BEST_FILE = "best.yaml"
REPORT_FILE = "report.md"
IMPORTANCE_PLOT = "importance.png"
# A trial's user attribute: {fold: its MCRMSE} (search/study.py reports the folds' running mean)
FOLD_SCORES = "fold_scores"
MIN_TRIALS_FOR_IMPORTANCE = 2      # complete trials: fANOVA fits a forest to their values


def write_records(study, search: "Search") -> None:
    table = trials_table(study, search)
    atomic_write_csv(search.out / TRIALS_FILE, table)
    best = best_trial(study)
    if best is not None:
        write_best_config(search, best)
    importances, why_not = param_importances(study)
    if importances:
        plot_importances(importances, search.out / IMPORTANCE_PLOT)
    else:
        (search.out / IMPORTANCE_PLOT).unlink(missing_ok=True)
    atomic_write_text(search.out / REPORT_FILE, report_text(search, table, best, importances, why_not))


def best_trial(study):
    """The complete trial of lowest OOF MCRMSE (the first of a tie), or None."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(complete, key=lambda trial: (trial.value, trial.number)) if complete else None


def trials_table(study, search: "Search") -> pd.DataFrame:
    """A row per trial, in order: its state (complete, pruned, fail, running, waiting), OOF
    MCRMSE, run folder, values of the space's keys and fold scores (empty: not trained)."""
    from optuna.trial import TrialState

    folds = range(search.base.folds.n_splits)
    rows = []
    for trial in study.get_trials(deepcopy=False):
        # optuna gives a pruned trial its last fold's score as its value: no OOF MCRMSE
        oof = trial.value if trial.state == TrialState.COMPLETE else None
        rows.append({"number": trial.number, "state": trial.state.name.lower(), "oof_mcrmse": oof,
                     "run": trial.user_attrs.get("run", ""),
                     **{key: trial.params.get(key) for key in search.space.keys},
                     **{f"fold_{fold}": trial.user_attrs.get(FOLD_SCORES, {}).get(str(fold)) for fold in folds},
                     "error": trial.user_attrs.get("error", "")})
    # error: why a failed trial's values could not train (refused together, out of memory)
    columns = ["number", "state", "oof_mcrmse", "run", *search.space.keys, *(f"fold_{fold}" for fold in folds),
               "error"]
    return pd.DataFrame(rows, columns=columns)


def write_best_config(search: "Search", best) -> None:
    """best.yaml: the base config file's keys, the command's overrides and the best trial's
    values, with a header naming the trial; checked to load as train.py will load it."""
    values = apply_overrides(read_yaml(search.config), search.overrides)
    for key, value in best.params.items():
        set_dotted(values, key, value)
    header = (f"# foldtune search {search.out}: trial {best.number} ({best.user_attrs.get('run', '')}), "
              f"OOF MCRMSE {best.value:.4f}\n# the base: {search.config}"
              + (f" with {' '.join(search.overrides)}" if search.overrides else "") + "\n")
    text = header + yaml.safe_dump(values, sort_keys=False)
    path = search.out / BEST_FILE
    atomic_write_text(path, text)
    load_config(path)       # a best.yaml that train.py would refuse is a bug, found here


def param_importances(study) -> tuple[dict[str, float] | None, str]:
    """(each key's importance, summing to 1, most important first; why there is none)."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return None, (f"not computed: it needs at least {MIN_TRIALS_FOR_IMPORTANCE} complete trials, the study has "
                      f"{len(complete)}")
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)      # the same report from the same trials
        return optuna.importance.get_param_importances(study, evaluator=evaluator), ""
    except Exception as err:  # noqa: BLE001 - the report says why; the search goes on
        return None, f"not computed: {type(err).__name__}: {err}"


def plot_importances(importances: dict[str, float], path) -> None:
    """A horizontal bar per key, the most important on top."""
    from matplotlib.figure import Figure

    keys = list(importances)[::-1]
    fig = Figure(figsize=(7, 0.5 * len(keys) + 1.2))
    fig.subplots_adjust(left=0.35, right=0.95, bottom=0.6 / (0.5 * len(keys) + 1.2), top=0.85)
    ax = fig.subplots()
    ax.barh(keys, [importances[key] for key in keys])
    ax.set(title="parameter importance (fANOVA)", xlabel="share of the OOF MCRMSE's variance", xlim=(0, 1))
    ax.grid(axis="x", alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _cell(value: Any) -> str:
    if value is None or isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def report_text(search: "Search", table: pd.DataFrame, best, importances: dict[str, float] | None,
                why_not: str) -> str:
    counts = table["state"].value_counts()
    states = ", ".join(f"{counts[state]} {state}" for state in ("complete", "pruned", "fail", "running", "waiting")
                       if state in counts)
    lines = [f"# Search {search.out.name}", "",
             f"Base config `{search.config}`" + (f" with `{' '.join(search.overrides)}`" if search.overrides else "")
             + f"; space `{search.space.path}` ({len(search.space.keys)} key(s)); {len(table)} trial(s): {states}.",
             "", "## Best trial", ""]
    if best is None:
        lines.append("None yet: no trial is complete.")
    else:
        values = ", ".join(f"`{key}={_cell(value)}`" for key, value in best.params.items())
        lines.append(f"Trial {best.number} (`{best.user_attrs.get('run', '')}`), OOF MCRMSE **{best.value:.4f}**: "
                     f"{values}. `{BEST_FILE}` holds its config: `python train.py --config {search.out / BEST_FILE}`.")
    lines += ["", "## Trials", "", "Pruned: stopped after a fold where the mean MCRMSE of its folds so far was worse "
              "than the median of the complete trials' after as many folds; fold columns hold each fold's MCRMSE.", ""]
    header = [str(column) for column in table.columns]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in table.itertuples(index=False)]
    lines += ["", "## Parameter importance", ""]
    if importances:
        lines += ["fANOVA (optuna.importance.get_param_importances) over the complete trials:", "",
                  "| key | importance |", "|---|---|"]
        lines += [f"| {key} | {value:.3f} |" for key, value in importances.items()]
        lines += ["", f"![parameter importance]({IMPORTANCE_PLOT})"]
    else:
        lines.append(f"Parameter importance {why_not}.")
    return "\n".join(lines) + "\n"
