"""Command lines of train.py and infer.py (also installed as foldtune-train and foldtune-infer)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

log = logging.getLogger("foldtune")

# configs/ beside train.py when run from a checkout; the current folder otherwise.
_REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = _REPO_CONFIGS / "default.yaml" if (_REPO_CONFIGS / "default.yaml").is_file() else Path("configs/default.yaml")


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_console_logging() -> None:
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def _log_to_run_folder(run_dir: Path) -> None:
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.info("run folder: %s", run_dir)


def train_main(argv: Sequence[str] | None = None) -> int:
    from foldtune.checkpoint import CheckpointError
    from foldtune.config import ConfigError, load_config
    from foldtune.data.validate import DataError
    from foldtune.ensemble import EnsembleError
    from foldtune.training.state import StateError
    from foldtune.training.stopping import TrainingInterrupted, install_signal_handlers

    parser = argparse.ArgumentParser(
        prog="train.py", description="Train every fold of a config; write checkpoints, OOF predictions and scores.",
        epilog="examples: python train.py --config configs/ellipse_minilm.yaml training.lr=3e-5 folds.n_splits=3\n"
               "          python train.py --resume runs/ellipse_minilm-20261125-101500",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--folds", default=None, help="train only these folds, e.g. 0,2 (default: all)")
    parser.add_argument("--name", default=None, help="run folder name under output.dir (default: config-time)")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue a stopped run: finished folds are kept, the interrupted one continues")
    parser.add_argument("--force", action="store_true",
                        help="with --resume: continue even if the config or the train file changed")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    # Options may come before, between or after the overrides.
    args = parser.parse_intermixed_args(argv)

    setup_console_logging()
    install_signal_handlers()
    run_dir = None
    try:
        from foldtune.training.cross_validation import (load_inputs, new_run_dir, parse_folds_arg, resume_run,
                                                        run_cross_validation)

        if args.resume:
            if args.config or args.name:
                raise ConfigError("--resume continues a run with its own saved config: "
                                  "--config and --name do not apply (overrides must match it, or --force)")
            run_dir = Path(args.resume)
            _log_to_run_folder(run_dir)
            resume_run(run_dir, args.overrides, args.folds, args.force)
            return 0
        config = args.config or str(DEFAULT_CONFIG)
        overrides = list(args.overrides) + ([f"output.name={args.name}"] if args.name else [])
        cfg = load_config(config, overrides)
        if cfg.distill.teacher is not None and args.folds:
            raise ConfigError("a distillation run trains one student (distill.holdout_fold): --folds does not apply")
        folds = parse_folds_arg(args.folds, cfg.folds.n_splits)
        frame = load_inputs(cfg)
        run_dir = new_run_dir(cfg, Path(config).stem)
        _log_to_run_folder(run_dir)
        if cfg.distill.teacher is not None:
            from foldtune.distill import run_distillation

            run_distillation(cfg, run_dir, frame)
        else:
            run_cross_validation(cfg, run_dir, folds, frame)
    except (ConfigError, DataError, CheckpointError, StateError, EnsembleError) as err:
        return _fail(err)
    except TrainingInterrupted as stop:
        print(f"{stop}: the training state is saved. Continue with: python train.py --resume {run_dir}",
              file=sys.stderr)
        return stop.exit_code
    return 0


def infer_main(argv: Sequence[str] | None = None) -> int:
    from foldtune.checkpoint import CheckpointError
    from foldtune.config import ConfigError
    from foldtune.data.validate import DataError

    parser = argparse.ArgumentParser(
        prog="infer.py", description="Average the fold checkpoints of a run into a submission CSV.")
    parser.add_argument("--run", default=None, help="run folder (default: the latest under runs/)")
    parser.add_argument("--blend", default=None, metavar="BLEND_JSON",
                        help="blend the runs of this file (python -m foldtune.ensemble) with its per-target weights")
    parser.add_argument("--runs-dir", default="runs", help="where to look for the latest run (default: %(default)s)")
    parser.add_argument("--test", default=None, help="CSV of texts to score (default: the run's data.test_file)")
    parser.add_argument("--out", default=None,
                        help="submission CSV (default: <run>/submission.csv; with --blend, beside the blend file)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's training.eval_batch_size")
    parser.add_argument("--no-clip", action="store_true", help="do not clip predictions to the training targets' range")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--allow-missing-folds", action="store_true",
                        help="average the folds that have a readable checkpoint, with a warning for the others")
    args = parser.parse_args(argv)

    setup_console_logging()
    try:
        from foldtune.ensemble import EnsembleError
        from foldtune.inference import latest_run, run_blend_inference, run_inference

        if args.blend:
            if args.run or args.allow_missing_folds:
                raise ConfigError("--blend names its runs: --run and --allow-missing-folds do not apply")
            out = run_blend_inference(args.blend, args.test, args.out, args.batch_size, clip=not args.no_clip,
                                      device=args.device)
            print(out)
            return 0
        run_dir = Path(args.run) if args.run else latest_run(args.runs_dir)
        log.info("run folder: %s", run_dir)
        out = run_inference(run_dir, args.test, args.out, args.batch_size, clip=not args.no_clip, device=args.device,
                            allow_missing_folds=args.allow_missing_folds)
    except (ConfigError, DataError, CheckpointError, EnsembleError, ValueError) as err:
        return _fail(err)
    print(out)
    return 0
