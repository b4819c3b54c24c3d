"""A run as a folder to upload as a Kaggle dataset: `foldtune export --run RUN_DIR --out OUT_DIR [--fp16]`.

    OUT_DIR/
      config.yaml, run.json, scores.json, oof.csv, report.md   the run's own files (what exists)
      fold_<k>/best/        every fold's checkpoint: model.safetensors (fp32, or fp16 with --fp16),
                            config.json (the backbone's architecture), tokenizer files, foldtune.yaml/json
      fold_<k>/result.json  the fold's scores: it marks the fold finished for inference
      foldtune-<v>-py3-none-any.whl   foldtune itself, for `pip install --no-index --no-deps`
      inference.ipynb       the notebook that writes submission.csv from this folder
      export.json           what was exported, from where, in which dtype

`foldtune export --blend BLEND_OR_STACK --out OUT_DIR [--fp16]` packs a blend file or a stack
folder (foldtune ensemble) instead: every member run under members/<i>_<name>/ as above,
blend.json or the stack's stack.json (and its other files) at the top with the members'
paths pointing there, one wheel, the notebook; export.json names the top file.

The folder of a run is a run folder: `infer.py --run OUT_DIR` and the notebook read it with
the same code; that of a blend or stack is read by `infer.py --blend OUT_DIR/stack.json` (or
blend.json) and by the notebook. Nothing in it needs the hub: the backbone is built from config.json and
filled from the fold's weights. fp16 weights are loaded back into the fp32 model.
The folder appears whole or not at all (written under a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from foldtune import __version__
from foldtune.commands import Once, prog_of, warn_deprecated
from foldtune.files import atomic_directory, atomic_write_json
from foldtune.run_layout import RESULT_FILE, RUN_FILE, read_provenance
from foldtune.run_lock import RunLock, RunLockError

log = logging.getLogger("foldtune")

NOTEBOOK = Path("notebooks") / "inference.ipynb"
RUN_FILES = ("config.yaml", "run.json", "scores.json", "oof.csv", "folds.csv", "report.md")
EXPORT_FILE = "export.json"


class ExportError(RuntimeError):
    """A run that cannot be exported, or a package that cannot be built."""


def source_root() -> Path:
    """The foldtune checkout this code runs from (its wheel and notebook are built from it)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or not (root / NOTEBOOK).is_file():
        raise ExportError(f"{root} is not a foldtune source checkout (pyproject.toml and {NOTEBOOK} expected): "
                          "export from a clone of the repository (pip install -e .)")
    return root


def build_wheel(out_dir: Path, root: Path | None = None) -> Path:
    """A wheel of foldtune, built offline from a clean copy of the source (no build/ left behind)."""
    root = root or source_root()
    with tempfile.TemporaryDirectory(prefix="foldtune-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (root / name).is_file():
                shutil.copy2(root / name, src / name)
        shutil.copytree(root / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc",
                                                                                  "*.egg-info"))
        result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                                 "--no-index", "--quiet", "--wheel-dir", str(Path(tmp) / "dist"), str(src)],
                                capture_output=True, text=True)
        wheels = sorted((Path(tmp) / "dist").glob("foldtune-*.whl"))
        if result.returncode != 0 or not wheels:
            raise ExportError(f"could not build the foldtune wheel (pip wheel, offline, needs setuptools "
                              f"installed):\n{result.stderr.strip()[-2000:]}")
        target = out_dir / wheels[0].name
        shutil.copy2(wheels[0], target)
    return target


def copy_weights(source: Path, target: Path, fp16: bool) -> None:
    """The checkpoint's weights; with fp16, floating tensors stored in float16 (half the size)."""
    import torch
    from safetensors.torch import load_file, save_file

    if not fp16:
        shutil.copy2(source, target)
        return
    tensors = {name: t.to(torch.float16) if t.is_floating_point() else t for name, t in load_file(source).items()}
    save_file(tensors, str(target), metadata={"format": "pt", "foldtune_dtype": "float16"})


def export_run(run_dir: str | Path, out_dir: str | Path, fp16: bool = False,
               allow_missing_folds: bool = False) -> Path:
    """Write `out_dir`: the run's finished folds, files, a foldtune wheel and the notebook (see
    the module doc). An unfinished fold is refused, or with allow_missing_folds left out. The
    run folder is locked meanwhile (run_lock.py): a run still training is not exported."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run folder (no config.yaml)")
    if out_dir.resolve() == run_dir.resolve():
        raise ExportError("the export folder must not be the run folder")
    with RunLock(run_dir, "export"):
        return _write_export(run_dir, out_dir, fp16, allow_missing_folds)


def _finished_folders(run_dir: Path, allow_missing_folds: bool) -> list[Path]:
    from foldtune.checkpoint import check_same_tokenizer
    from foldtune.inference import fold_checkpoints

    folders = fold_checkpoints(run_dir, allow_missing_folds)   # the finished folds, or an error naming the others
    check_same_tokenizer(folders)                # the notebook averages them: refused there, refused now
    return folders


def _copy_run(run_dir: Path, folders: Sequence[Path], target_dir: Path, fp16: bool) -> list[int]:
    """The run's files and its fold checkpoints `folders` into target_dir; the folds copied."""
    from foldtune.checkpoint import FILES_KEY, WEIGHTS_FILE, read_meta, verify_files, write_meta

    target_dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, target_dir / name)
    folds = []
    for folder in folders:
        meta = read_meta(folder)
        verify_files(folder, meta)          # a fold changed after it was saved is not exported
        target = target_dir / folder.relative_to(run_dir)      # fold_k/best, or fold_k/seed_<s>/best
        shutil.copytree(folder, target, ignore=shutil.ignore_patterns(WEIGHTS_FILE, ".*"))
        # a tfidf_ridge fold's arrays stay float64: small, and in float16 they would predict otherwise
        copy_weights(folder / WEIGHTS_FILE, target / WEIGHTS_FILE, fp16 and meta.get("model_type") != "tfidf_ridge")
        write_meta(target, meta, list(meta.get(FILES_KEY) or [WEIGHTS_FILE]))     # the copies' SHA-256
        shutil.copy2(folder.parent / RESULT_FILE, target.parent / RESULT_FILE)
        if meta["fold"] not in folds:       # a fold's seeds follow one another
            folds.append(meta["fold"])
    # The export holds exactly these folds, whatever run.json asked for.
    atomic_write_json(target_dir / RUN_FILE, {**read_provenance(run_dir, missing_ok=True), "folds": folds})
    return folds


def _write_export(run_dir: Path, out_dir: Path, fp16: bool, allow_missing_folds: bool) -> Path:
    folders = _finished_folders(run_dir, allow_missing_folds)
    root = source_root()
    with atomic_directory(out_dir) as tmp:
        folds = _copy_run(run_dir, folders, tmp, fp16)
        wheel = build_wheel(tmp, root)
        shutil.copy2(root / NOTEBOOK, tmp / NOTEBOOK.name)
        atomic_write_json(tmp / EXPORT_FILE, {
            "run": str(run_dir.resolve()), "exported": dt.datetime.now().isoformat(timespec="seconds"),
            "folds": folds, "weights_dtype": "float16" if fp16 else "float32", "wheel": wheel.name,
            "foldtune": __version__,
        })
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    log.info("exported %s -> %s: %d fold(s), %s weights, %.1f MB", run_dir, out_dir, len(folds),
             "fp16" if fp16 else "fp32", size / 1e6)
    return out_dir


def export_ensemble(blend_path: str | Path, out_dir: str | Path, fp16: bool = False) -> Path:
    """Write `out_dir` for a blend file or a stack (foldtune ensemble): every member run under
    members/<i>_<name>/ (its files and finished folds, as export_run copies a run), the blend's
    blend.json or the stack's files at the top with the members' paths pointing there, one
    foldtune wheel and the notebook, which predicts with the blend or stack it finds
    (infer.py --blend's code). Every member must have finished all its folds; each member
    run is locked meanwhile."""
    from foldtune.blend import read_blend
    from foldtune.stack import STACK_FILE, is_stack, read_stack

    blend_path, out_dir = Path(blend_path), Path(out_dir)
    if is_stack(blend_path):
        stack = read_stack(blend_path)
        record, runs, source, top = dict(stack.record), stack.runs, stack.folder, STACK_FILE
    else:
        record, runs = read_blend(blend_path)
        source, top = None, "blend.json"
    if any(out_dir.resolve() == p.resolve() for p in [*runs, blend_path.resolve().parent]):
        raise ExportError("the export folder must not be a member run's folder or the blend's")
    names = [f"{i}_{run.name}" for i, run in enumerate(runs)]
    with contextlib.ExitStack() as locks:
        for run in runs:
            locks.enter_context(RunLock(run, "export"))
        folders = [_finished_folders(run, False) for run in runs]
        root = source_root()
        with atomic_directory(out_dir) as tmp:
            folds = {name: _copy_run(run, found, tmp / "members" / name, fp16)
                     for name, run, found in zip(names, runs, folders)}
            if source is not None:          # the stack's vocabulary, its models' files, its OOF and scores
                for path in source.iterdir():
                    if path.is_file() and path.name != STACK_FILE:
                        shutil.copy2(path, tmp / path.name)
            atomic_write_json(tmp / top, {**record, "members": [f"members/{name}" for name in names]})
            wheel = build_wheel(tmp, root)
            shutil.copy2(root / NOTEBOOK, tmp / NOTEBOOK.name)
            atomic_write_json(tmp / EXPORT_FILE, {
                "blend": str(blend_path.resolve()), "file": top, "members": folds,
                "exported": dt.datetime.now().isoformat(timespec="seconds"),
                "weights_dtype": "float16" if fp16 else "float32", "wheel": wheel.name, "foldtune": __version__,
            })
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    log.info("exported %s (%d runs) -> %s, %s weights, %.1f MB", blend_path, len(runs), out_dir,
             "fp16" if fp16 else "fp32", size / 1e6)
    return out_dir


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or prog_of("export"),
        description="Write a self-contained folder of a run (weights, tokenizer, config, foldtune wheel, "
                    "inference notebook) to upload as a Kaggle dataset.")
    parser.add_argument("--run", action=Once, help="a finished run folder, e.g. runs/ellipse_minilm-20261125-101500")
    parser.add_argument("--blend", action=Once, metavar="BLEND_OR_STACK",
                        help="instead of --run: a blend file or a stack folder (foldtune ensemble), with all its runs")
    parser.add_argument("--out", help="folder to write (replaced whole if it exists)")
    # RUN_DIR OUT_DIR, the spelling before --run and --out: kept for one release
    parser.add_argument("positional", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--fp16", action="store_true", help="store the weights in float16 (half the size; "
                                                            "loaded back in float32)")
    parser.add_argument("--allow-missing-folds", action="store_true",
                        help="export the finished folds, with a warning for the others (default: refuse)")
    args = parser.parse_intermixed_args(argv)
    if args.positional:
        if len(args.positional) != 2 or args.run is not None or args.out is not None:
            parser.error(f"unrecognized arguments: {' '.join(args.positional)} (give the run as --run RUN_DIR "
                         "and the folder to write as --out OUT_DIR)")
        args.run, args.out = args.positional
        warn_deprecated(parser.prog, args.positional, ["--run", args.run, "--out", args.out])
    if args.run is not None and args.blend is not None:
        parser.error("give --run RUN_DIR or --blend BLEND_OR_STACK, not both")
    if args.blend is not None and args.allow_missing_folds:
        parser.error("--allow-missing-folds: a blend or stack takes its runs whole (as infer.py --blend does)")
    source = ("--run", args.run) if args.blend is None else ("--blend", args.blend)
    if source[1] is None or args.out is None:
        parser.error("the following arguments are required: "
                     + ", ".join(option for option, value in (source, ("--out", args.out)) if value is None))
    from foldtune.blend import EnsembleError
    from foldtune.checkpoint import CheckpointError
    from foldtune.inference import UnfinishedFolds

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.blend is not None:
            out = export_ensemble(args.blend, args.out, args.fp16)
        else:
            out = export_run(args.run, args.out, args.fp16, args.allow_missing_folds)
    except UnfinishedFolds as err:
        print(f"error: {err}" + ("" if args.blend else ", or pass --allow-missing-folds to export the others"),
              file=sys.stderr)
        return 2
    except (ExportError, CheckpointError, EnsembleError, RunLockError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
