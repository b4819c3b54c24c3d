"""Resuming a stopped run: its saved config and data checked, then its folds trained on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from foldtune.config import ConfigError, ConfigOrigin, config_diff, load_config, path_problem, save_config
from foldtune.files import file_sha256, remove_orphans
from foldtune.run_layout import CONFIG_FILE, read_provenance
from foldtune.training.cross_validation import load_inputs, parse_folds_arg, run_cross_validation
from foldtune.training.distributed import current_launch

log = logging.getLogger("foldtune")


# Settings a resume may change without --force: how many folds train at once, not what a
# fold learns (in processes, or without dropout, each fold's result is the same; the
# way out after the GPU ran out of memory with several folds at once).
HOW_NOT_WHAT = ("training.parallel_folds",)


def resume_run(run_dir: str | Path, overrides: Sequence[str] = (), folds_arg: str | None = None,
               force: bool = False, fold_parallel: bool = False) -> dict | None:
    """Continue a stopped run: its saved config (overrides must not change it, unless
    force, but for HOW_NOT_WHAT), the same data, the folds it was asked to train."""
    run_dir = Path(run_dir)
    problem = path_problem(run_dir, "a run folder")
    if problem is not None:
        raise ConfigError(f"--resume: {problem}: nothing to resume")
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"--resume: {run_dir.resolve()} is not a run folder (no config.yaml): nothing to resume")
    saved = load_config(run_dir / CONFIG_FILE)
    if saved.distill.teacher is not None:
        raise ConfigError(f"{run_dir} is a distillation run: it cannot be resumed; train it again")
    cfg = load_config(run_dir / CONFIG_FILE, overrides)
    changes = config_diff(saved, cfg)
    how = [change for change in changes if change[0] in HOW_NOT_WHAT]
    changes = [change for change in changes if change[0] not in HOW_NOT_WHAT]
    if changes and not force:
        lines = "; ".join(f"{key}: {old!r} (saved) -> {new!r}" for key, old, new in changes)
        raise ConfigError(f"the config differs from the one {run_dir} was trained with: {lines}. "
                          "Resuming would mix two configs in one run; pass --force to do it anyway")
    frame = load_inputs(cfg, fold_parallel, ConfigOrigin(run_dir / CONFIG_FILE, tuple(overrides)))
    run_info = read_provenance(run_dir)
    recorded = run_info.get("train_file_sha256")
    if recorded and recorded != file_sha256(cfg.data.train_file) and not force:
        raise ConfigError(f"{cfg.data.train_file} has changed since {run_dir} started (its SHA-256 differs); "
                          "pass --force to continue on the new file")
    if changes:
        log.warning("resuming %s with a changed config (--force): %s", run_dir,
                    ", ".join(key for key, _, _ in changes))
    for key, old, new in how:
        log.info("resuming %s with %s %r (saved %r)", run_dir, key, new, old)
    if changes or how:
        current_launch().run_on_main(lambda: save_config(cfg, run_dir / CONFIG_FILE))
    folds = parse_folds_arg(folds_arg, cfg.folds.n_splits) if folds_arg else run_info["folds"]
    current_launch().run_on_main(lambda: remove_orphans(run_dir))      # what a killed process left
    return run_cross_validation(cfg, run_dir, folds, frame, resume=True, fold_parallel=fold_parallel)
