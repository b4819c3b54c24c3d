"""Command lines of train.py, infer.py and `foldtune distill` (also `foldtune train`, `foldtune infer`,
foldtune-train and foldtune-infer: commands.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from foldtune.commands import as_typed, prog_of
from foldtune.logs import log_to_run_folder, setup_console_logging, stop_logging_to

log = logging.getLogger("foldtune")

# configs/ beside train.py when run from a checkout; the current folder otherwise.
_REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = _REPO_CONFIGS / "default.yaml" if (_REPO_CONFIGS / "default.yaml").is_file() else Path("configs/default.yaml")

# Where a relative path leads: a user who keeps configs/ and data/ side by side may expect
# the config file's folder.
TRAIN_PATHS = ("relative paths, on the command line and in the config (data files, a model.name folder, output.dir,\n"
               "distill.teacher, pseudo.teacher, pseudo.file), are resolved from the working directory, not from the\n"
               "config file's folder")
INFER_PATHS = ("relative paths (--run, --test, --blend, --out, and a run's data.test_file) are resolved from the "
               "working directory")


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


class _TrainCall:
    """Who runs _train: train.py prints a user's mistake in one line and ends with an exit
    status; foldtune.train (train_run) gets the exception raised and the run folder."""

    def __init__(self, raise_errors: bool):
        self.raise_errors = raise_errors
        self.run_dir: Path | None = None


def train_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = _train_parser(prog or prog_of("train")).parse_intermixed_args(argv)
    return _train(args, _TrainCall(raise_errors=False))


def train_run(argv: Sequence[str]) -> Path:
    """What train.py does with these arguments (the same checks, run lock and logging to
    the run folder), for the Python API: a mistake, a stop or a failed write raises its
    exception (ConfigError, DataError, TrainingInterrupted, WriteError...), and the run
    folder is returned."""
    call = _TrainCall(raise_errors=True)
    _train(_train_parser("foldtune.train").parse_intermixed_args(argv), call)
    return call.run_dir


def _train_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train every fold of a config; write checkpoints, OOF predictions and scores.",
        epilog=f"examples: {as_typed(prog)} --config configs/ellipse_minilm.yaml training.lr=3e-5 folds.n_splits=3\n"
               f"          {as_typed(prog)} --resume runs/ellipse_minilm-20261125-101500\n"
               "          accelerate launch --multi_gpu --num_processes 2 train.py --config C.yaml  "
               "(the mode that pays for the model's size)\n"
               "          accelerate launch --multi_gpu --num_processes 2 train.py --fold-parallel --config C.yaml\n"
               "          accelerate launch --multi_gpu --num_processes 2 train.py --data-parallel --config C.yaml\n\n"
               f"{TRAIN_PATHS}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--folds", default=None, help="train only these folds, e.g. 0,2 (default: all)")
    parser.add_argument("--name", default=None, help="run folder name under output.dir (default: config-time)")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue a stopped run: finished folds are kept, the interrupted one continues")
    parser.add_argument("--force", action="store_true",
                        help="with --resume: continue even if the config or the train file changed")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--fold-parallel", action="store_true",
                      help="under accelerate launch: spread the folds over the processes, each training its own "
                           "(training.parallel_folds of them at a time, in threads). Without --fold-parallel or "
                           "--data-parallel the launch chooses by the backbone's size")
    mode.add_argument("--data-parallel", action="store_true",
                      help="under accelerate launch: train every fold on all the processes together, each taking a "
                           "share of every batch")
    # Options may come before, between or after the overrides (parse_intermixed_args).
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser


def distill_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`foldtune distill`: a train run with a teacher (distill.teacher), so one student
    model; the config's other keys apply as in any run (README: Distillation)."""
    prog = prog or prog_of("distill")
    parser = argparse.ArgumentParser(
        prog=prog, description="Train one student model on targets alpha * true + (1 - alpha) * teacher, the\n"
                               "teacher a blend file or a run: a train run with distill.teacher set.",
        epilog=f"examples: {prog} --teacher runs/blend.json --config configs/ellipse_minilm_student.yaml\n"
               f"          {prog} --config configs/ellipse_minilm_student.yaml distill.holdout_fold=null  "
               "(the model to ship)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None, metavar="BLEND_OR_RUN",
                        help="blend.json (foldtune ensemble) or a run folder (default: the config's distill.teacher)")
    parser.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--name", default=None, help="run folder name under output.dir (default: config-time)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. distill.alpha=0.25 distill.holdout_fold=null")
    args = parser.parse_intermixed_args(argv)
    # quoted: the override's value is read as YAML, and a path is text whatever it looks like
    teacher = [f"distill.teacher={json.dumps(args.teacher)}"] if args.teacher is not None else []
    as_train = argparse.Namespace(config=args.config, folds=None, name=args.name, resume=None, force=False,
                                  fold_parallel=False, data_parallel=False, overrides=[*args.overrides, *teacher])
    return _train(as_train, _TrainCall(raise_errors=False), student=True)


def _train(args: argparse.Namespace, call: _TrainCall, student: bool = False) -> int:
    """Train the run `args` ask for (train_main's arguments); a student run (foldtune distill)
    must have a teacher."""
    setup_console_logging()
    _start_warm_up(args)        # the GPU starts while the libraries below are imported
    import torch

    from foldtune.checkpoint import CheckpointError
    from foldtune.config import ConfigError, ConfigOrigin, load_config, path_problem
    from foldtune.data.validate import DataError, with_folds_of_column
    from foldtune.blend import EnsembleError
    from foldtune.files import as_write_error
    from foldtune.run_lock import NO_LOCK, RunLock, RunLockError
    from foldtune.training.state import StateError
    from foldtune.training.schedulers import FoldsOutOfMemory
    from foldtune.training.stopping import TrainingInterrupted, install_signal_handlers

    install_signal_handlers()
    run_dir = None
    run_lock = NO_LOCK                                      # released however the run ends
    run_log: logging.Handler = logging.NullHandler()        # closed however the run ends
    fold_parallel = args.fold_parallel
    try:
        from foldtune.training.cross_validation import load_inputs, new_run_dir, parse_folds_arg, run_cross_validation
        from foldtune.training.distributed import current_launch, launched_world_size
        from foldtune.training.resume import resume_run

        started = time.perf_counter()       # the libraries are loaded: the run's own time from here
        if (args.fold_parallel or args.data_parallel) and launched_world_size() == 1:
            log.warning("%s in a single process: the folds train one after another, as without it; start several "
                        "with accelerate launch --multi_gpu --num_processes N train.py ...",
                        "--fold-parallel" if args.fold_parallel else "--data-parallel")
        if args.resume:
            if args.config or args.name:
                raise ConfigError("--resume continues a run with its own saved config: "
                                  "--config and --name do not apply (overrides must match it, or --force)")
            run_dir = Path(args.resume)
            fold_parallel, why = _resume_mode(args, run_dir, args.overrides)
            _quiet_other_processes(fold_parallel)
            if (run_dir / "config.yaml").is_file():     # a run folder; else resume_run says what is wrong
                # locked before its log gets a line: a refused resume writes nothing there
                run_lock = current_launch().run_on_main(lambda: RunLock(run_dir, "resume").acquire())
                if current_launch().is_main:
                    run_log = log_to_run_folder(run_dir)
                    _log_process_mode(fold_parallel, why)
            resume_run(run_dir, args.overrides, args.folds, args.force, fold_parallel)
            return 0
        config = args.config or str(DEFAULT_CONFIG)
        problem = path_problem(config, "a YAML file")
        if problem is not None:
            raise ConfigError(f"{'--config' if args.config else 'the default config (no --config given)'}: {problem}")
        overrides = list(args.overrides) + ([f"output.name={args.name}"] if args.name else [])
        origin = ConfigOrigin(config, tuple(overrides))
        cfg = with_folds_of_column(load_config(config, overrides), origin)     # before --folds is read
        if student and cfg.distill.teacher is None:
            raise ConfigError(f"{config} has no distill.teacher: give the teacher with --teacher BLEND_OR_RUN "
                              "(a blend.json written by foldtune ensemble, or a run folder)")
        if cfg.distill.teacher is not None and args.folds:
            raise ConfigError("a distillation run trains one student (distill.holdout_fold): --folds does not apply")
        folds = parse_folds_arg(args.folds, cfg.folds.n_splits)
        fold_parallel, why = _process_mode(args, cfg, len(folds))
        frame = load_inputs(cfg, fold_parallel, origin)
        if cfg.pseudo.teacher is not None:      # a teacher on other folds fails now, before a run folder is made
            from foldtune.pseudo import check_pseudo
            from foldtune.training.cross_validation import make_fold_column

            check_pseudo(cfg, frame, make_fold_column(frame, cfg))
        launch = current_launch()
        _quiet_other_processes(fold_parallel)
        # one run folder for all the processes, locked by the main one: its name has the main one's clock
        run_lock = launch.run_on_main(lambda: new_run_dir(cfg, Path(config).stem))
        run_dir = run_lock.folder
        if launch.is_main:
            run_log = log_to_run_folder(run_dir)
            _log_process_mode(fold_parallel, why)
        if cfg.distill.teacher is not None:
            from foldtune.distill import run_distillation

            run_distillation(cfg, run_dir, frame)
        else:
            run_cross_validation(cfg, run_dir, folds, frame, fold_parallel=fold_parallel)
        if launch.is_main:      # the others' folds are done, not the run
            log.info("done: %s in %.1f s", run_dir, time.perf_counter() - started)
    except (ConfigError, DataError, CheckpointError, StateError, EnsembleError, RunLockError) as err:
        if call.raise_errors:
            raise
        return _fail(err)
    except TrainingInterrupted as stop:
        if call.raise_errors:
            raise
        print(f"{stop}: the training state is saved. Continue with: {_resume_command(run_dir, fold_parallel)}",
              file=sys.stderr)
        return stop.exit_code
    except OSError as err:
        failure = as_write_error(err)
        if failure is None:
            raise
        if call.raise_errors:
            raise failure from err
        print(f"error: {failure}. {_after_write_failure(failure, run_dir, fold_parallel)}", file=sys.stderr)
        return 1
    except (torch.OutOfMemoryError, FoldsOutOfMemory) as err:
        if call.raise_errors:
            raise
        print(f"error: {_out_of_memory(err, run_dir, fold_parallel)}", file=sys.stderr)
        return 1
    finally:
        from foldtune.training.distributed import close_launch

        call.run_dir = run_dir
        run_lock.release()
        stop_logging_to(run_log)
        close_launch()
    return 0


def _resume_command(run_dir: Path | None, fold_parallel: bool) -> str:
    from foldtune.training.distributed import launched_world_size

    again = (f"accelerate launch --multi_gpu --num_processes {launched_world_size()} train.py"
             if launched_world_size() > 1 else "python train.py")
    mode = ""
    if launched_world_size() > 1:
        mode = " --fold-parallel" if fold_parallel else " --data-parallel"
    return f"{again} --resume {run_dir}{mode}"


def _out_of_memory(err: Exception, run_dir: Path | None, fold_parallel: bool) -> str:
    """One line for a run the GPU ran out of memory in: where, that the finished folds are
    kept, and what to change (fewer folds at once, a resume that may change just that; or
    a smaller step, which changes what the folds learn)."""
    parallel = getattr(err, "parallel", 1)
    where = str(err) if parallel > 1 else "the GPU ran out of memory"
    kept = "; the folds that finished are kept" if run_dir is not None else ""
    if parallel > 1:
        fewer = f"training.parallel_folds={max(1, parallel // 2)}"
        command = f"{_resume_command(run_dir, fold_parallel)} {fewer}" if run_dir is not None else fewer
        return f"{where}{kept}. Train fewer at once: {command}"
    return (f"{where}{kept}. A step needs less memory with model.gradient_checkpointing=true (not under "
            "training.cuda_graphs), a smaller training.batch_size or a shorter data.max_len: each changes what "
            "the folds learn, so start a new run (or resume with --force)")


def _after_write_failure(failure: OSError, run_dir: Path | None, fold_parallel: bool) -> str:
    """What to do after a write failed: mend the cause, then resume the run (or, when its
    folder holds no config yet, start it again)."""
    import errno

    mend = {errno.ENOSPC: "Free space on the device", errno.EDQUOT: "Free space on the device",
            errno.EROFS: "Make the folder writable", errno.EACCES: "Make the folder writable",
            errno.EPERM: "Make the folder writable"}.get(failure.errno)
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        again = f"continue with: {_resume_command(run_dir, fold_parallel)}"
    else:
        again = "start the run again"
    return f"{mend}, then {again}" if mend else again[0].upper() + again[1:]


def _start_warm_up(args: argparse.Namespace) -> None:
    """Start the GPU (training/warmup.py) as soon as the run's config is known, so that it
    warms up while transformers and the training code are imported and the essays read."""
    from foldtune.config import load_config
    from foldtune.training.warmup import start_warm_up

    try:
        cfg = (load_config(Path(args.resume) / "config.yaml", args.overrides) if args.resume
               else load_config(args.config or str(DEFAULT_CONFIG), args.overrides))
    except Exception:  # noqa: BLE001 - the run itself reports a bad config or run folder, below
        return
    start_warm_up(cfg)


def _process_mode(args: argparse.Namespace, cfg, folds: int) -> tuple[bool, str]:
    """(whether the folds are spread over the launched processes, why): as asked, or chosen
    by the backbone's size and the number of folds (training/distributed.py)."""
    from foldtune.models.regressor import backbone_parameters
    from foldtune.training.distributed import choose_fold_parallel, launched_world_size

    world_size = launched_world_size()
    if args.fold_parallel or args.data_parallel or world_size == 1:
        return args.fold_parallel, "as asked" if world_size > 1 else ""
    if cfg.model.type != "transformer" or cfg.distill.teacher is not None:
        return False, ""                    # refused under a launch (check_launch)
    try:
        parameters = backbone_parameters(cfg.model.name)
    except Exception as err:  # noqa: BLE001 - loading the backbone reports what is wrong with it
        return False, f"the backbone's size could not be read ({type(err).__name__})"
    return choose_fold_parallel(world_size, folds, parameters)


def _resume_mode(args: argparse.Namespace, run_dir: Path, overrides: Sequence[str]) -> tuple[bool, str]:
    """A resumed run's mode: as asked, else the one it was started in (run.json), else chosen."""
    import json

    from foldtune.config import load_config
    from foldtune.training.distributed import launched_world_size

    if args.fold_parallel or args.data_parallel or launched_world_size() == 1:
        return _process_mode(args, None, 0)
    if not (run_dir / "config.yaml").is_file():
        return False, ""                    # resume_run says what is wrong with the folder
    run_file = run_dir / "run.json"
    recorded = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
    if recorded.get("process_mode") in ("fold_parallel", "data_parallel"):
        return recorded["process_mode"] == "fold_parallel", "as the run was started"
    cfg = load_config(run_dir / "config.yaml", overrides)
    return _process_mode(args, cfg, len(recorded.get("folds", [])) or cfg.folds.n_splits)


def _log_process_mode(fold_parallel: bool, why: str) -> None:
    from foldtune.training.distributed import launched_world_size

    if launched_world_size() > 1:
        log.info("%d processes, %s: %s (choose with --fold-parallel or --data-parallel)", launched_world_size(),
                 "fold-parallel" if fold_parallel else "data-parallel", why)


def _quiet_other_processes(fold_parallel: bool) -> None:
    """Data-parallel, the processes other than the main one repeat its lines: warnings only."""
    from foldtune.training.distributed import current_launch

    if not fold_parallel and not current_launch().is_main:
        log.setLevel(logging.WARNING)


def infer_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """infer.py. Ctrl-C ends it with one line and exit status 130; the submission is
    written whole or not at all (files.py), so none is left half-written."""
    prog = prog or prog_of("infer")
    try:
        return _infer(argv, prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C); no submission was written", file=sys.stderr)
        return 130


def _infer(argv: Sequence[str] | None, prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Average the fold checkpoints of one or more runs into a submission CSV.",
        epilog=f"example: {as_typed(prog)} --run runs/A --run runs/B --weights 0.6,0.4 --max-len 1024 "
               f"--precision fp16\n\n{INFER_PATHS}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=None,
                        help="run folder (or exported folder); repeat to average runs (default: the latest under "
                             "runs/)")
    parser.add_argument("--blend", default=None, metavar="BLEND_OR_STACK",
                        help="blend the runs of this file (foldtune ensemble) with its per-target weights, or stack "
                             "them with the models of this stack folder (foldtune ensemble --stack)")
    parser.add_argument("--runs-dir", default="runs", help="where to look for the latest run (default: %(default)s)")
    parser.add_argument("--weights", default=None,
                        help="one weight per --run, e.g. 0.6,0.4 (normalised to sum to one; default: equal)")
    parser.add_argument("--fold-weights", action="append", default=None, metavar="W0,W1,...",
                        help="one weight per fold of a run (normalised); with several runs, once per --run in order")
    parser.add_argument("--test", default=None, help="CSV of texts to score (default: the first run's data.test_file)")
    parser.add_argument("--out", default=None, help="submission CSV (default: <first run>/submission.csv)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: each run's training.eval_batch_size")
    parser.add_argument("--max-len", type=int, default=None,
                        help="tokens per text at inference, may exceed training's (default: each run's data.max_len)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="autocast on GPU (auto: bf16 where supported, else fp16); CPU runs fp32 "
                             "(default: %(default)s)")
    parser.add_argument("--no-clip", action="store_true", help="do not clip predictions to the training targets' range")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--allow-missing-folds", action="store_true",
                        help="average the finished folds that have a readable checkpoint, with a warning naming the "
                             "others")
    args = parser.parse_args(argv)

    # imported once the arguments are read: --help answers before torch is loaded
    from foldtune.checkpoint import CheckpointError
    from foldtune.config import ConfigError
    from foldtune.data.validate import DataError
    from foldtune.inference import UnfinishedFolds

    setup_console_logging()
    try:
        from foldtune.blend import EnsembleError
        from foldtune.inference import latest_run, parse_weights, run_blend_inference, run_inference

        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: expected an integer >= 1")
        if args.max_len is not None and args.max_len < 8:
            raise ValueError(f"--max-len {args.max_len}: expected an integer >= 8")
        if args.blend:
            if args.run or args.allow_missing_folds or args.weights or args.fold_weights:
                raise ConfigError("--blend names its runs and weights: --run, --weights, --fold-weights and "
                                  "--allow-missing-folds do not apply")
            out = run_blend_inference(args.blend, args.test, args.out, args.batch_size, clip=not args.no_clip,
                                      device=args.device)
            print(out)
            return 0
        run_dirs = [Path(r) for r in args.run] if args.run else [latest_run(args.runs_dir)]
        weights = parse_weights(args.weights, "--weights") if args.weights else None
        fold_weights = [parse_weights(text, "--fold-weights") for text in args.fold_weights or []] or None
        if fold_weights is not None and len(fold_weights) != len(run_dirs):
            raise ValueError(f"--fold-weights given {len(fold_weights)} time(s) for {len(run_dirs)} --run(s): "
                             "give it once per --run, in the same order")
        log.info("run folder(s): %s" if args.run else "using the latest finished run: %s",
                 ", ".join(map(str, run_dirs)))
        out = run_inference(run_dirs, args.test, args.out, args.batch_size, clip=not args.no_clip, device=args.device,
                            allow_missing_folds=args.allow_missing_folds, weights=weights, fold_weights=fold_weights,
                            max_len=args.max_len, precision=args.precision)
    except UnfinishedFolds as err:
        # --run may leave them out; --blend takes its runs whole
        print(f"error: {err}" + ("" if args.blend else ", or pass --allow-missing-folds to average the others"),
              file=sys.stderr)
        return 2
    except (ConfigError, DataError, CheckpointError, EnsembleError, ValueError) as err:
        return _fail(err)
    except OSError as err:
        from foldtune.files import as_write_error

        failure = as_write_error(err)
        if failure is None:
            raise
        print(f"error: {failure}; no submission was written (the folds are untouched): mend that, then run "
              "infer.py again", file=sys.stderr)
        return 1
    print(out)
    return 0
