"""A run as a folder to upload as a Kaggle dataset: `foldtune export --run RUN_DIR --out OUT_DIR [--fp16]`.

    OUT_DIR/
      config.yaml, run.json, scores.json, oof.csv, report.md   the run's own files (what exists)
      fold_<k>/best/        every fold's checkpoint: model.safetensors (fp32, or fp16 with --fp16),
                            config.json (the backbone's architecture), tokenizer files, foldtune.yaml/json
      fold_<k>/result.json  the fold's scores: it marks the fold finished for inference
      foldtune-<v>-py3-none-any.whl   foldtune itself, for `pip install --no-index --no-deps`
      inference.ipynb       the notebook that writes submission.csv from this folder
      export.json           what was exported, from where, in which dtype

The folder is a run folder: `infer.py --run OUT_DIR` and the notebook read it with the
same code. Nothing in it needs the hub: the backbone is built from config.json and
filled from the fold's weights. fp16 weights are loaded back into the fp32 model.
The folder appears whole or not at all (written under a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
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


def _write_export(run_dir: Path, out_dir: Path, fp16: bool, allow_missing_folds: bool) -> Path:
    from foldtune.checkpoint import FILES_KEY, WEIGHTS_FILE, check_same_tokenizer, read_meta, verify_files, write_meta
    from foldtune.inference import fold_checkpoints

    folders = fold_checkpoints(run_dir, allow_missing_folds)   # the finished folds, or an error naming the others
    check_same_tokenizer(folders)                # the notebook averages them: refused there, refused now
    root = source_root()
    with atomic_directory(out_dir) as tmp:
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        folds = []
        for folder in folders:
            meta = read_meta(folder)
            verify_files(folder, meta)          # a fold changed after it was saved is not exported
            target = tmp / folder.relative_to(run_dir)      # fold_k/best, or fold_k/seed_<s>/best
            shutil.copytree(folder, target, ignore=shutil.ignore_patterns(WEIGHTS_FILE, ".*"))
            # a tfidf_ridge fold's arrays stay float64: small, and in float16 they would predict otherwise
            copy_weights(folder / WEIGHTS_FILE, target / WEIGHTS_FILE, fp16 and meta.get("model_type") != "tfidf_ridge")
            write_meta(target, meta, list(meta.get(FILES_KEY) or [WEIGHTS_FILE]))     # the copies' SHA-256
            shutil.copy2(folder.parent / RESULT_FILE, target.parent / RESULT_FILE)
            if meta["fold"] not in folds:       # a fold's seeds follow one another
                folds.append(meta["fold"])
        # The export holds exactly these folds, whatever run.json asked for.
        atomic_write_json(tmp / RUN_FILE, {**read_provenance(run_dir, missing_ok=True), "folds": folds})
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


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or prog_of("export"),
        description="Write a self-contained folder of a run (weights, tokenizer, config, foldtune wheel, "
                    "inference notebook) to upload as a Kaggle dataset.")
    parser.add_argument("--run", action=Once, help="a finished run folder, e.g. runs/ellipse_minilm-20261125-101500")
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
    if args.run is None or args.out is None:
        parser.error("the following arguments are required: "
                     + ", ".join(option for option, value in (("--run", args.run), ("--out", args.out))
                                 if value is None))
    from foldtune.checkpoint import CheckpointError
    from foldtune.inference import UnfinishedFolds

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export_run(args.run, args.out, args.fp16, args.allow_missing_folds)
    except UnfinishedFolds as err:
        print(f"error: {err}, or pass --allow-missing-folds to export the others", file=sys.stderr)
        return 2
    except (ExportError, CheckpointError, RunLockError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
