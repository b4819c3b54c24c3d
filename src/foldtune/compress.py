"""A smaller copy of a run: `foldtune compress --run RUN --out OUT --rank 64`.

Every fold checkpoint of RUN is loaded, compressed (models/compress.py: fewer encoder
layers with --keep-layers, SVD factors of the word embeddings and of the encoder's
linear layers with --rank or --rank-fraction) and written to OUT/fold_k/best. OUT is a
run folder (config.yaml, run.json, folds.csv, compress.json): `infer.py --run OUT`
predicts with it. The source run's OOF and scores are not copied: they describe the
model before compression (benchmarks/compress.py scores a compressed student).

    OUT/
      config.yaml, folds.csv             the source run's
      run.json                           the source's, listing the folds compressed
      compress.json                      what was done to each fold; parameters and bytes before and after
      fold_<k>/best/                     the compressed checkpoint; its foldtune.json records the
                                         factorised modules ("low_rank") and "compression"
      fold_<k>/result.json               the source fold's (it marks the fold finished for inference;
                                         its scores are the uncompressed model's)
      fold_<k>/seed_<s>/best/, result.json   instead, for each seed of a run with training.seeds
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Sequence

from foldtune.commands import Once, as_typed, prog_of
from foldtune.config import ConfigError, load_config
from foldtune.files import atomic_directory, atomic_write_json
from foldtune.run_layout import RESULT_FILE, RUN_FILE, FoldSeed, read_provenance

RUN_FILES = ("config.yaml", "folds.csv")
SUMMARY_FILE = "compress.json"


def compress_run(run_dir: str | Path, out_dir: str | Path, keep: list[int] | None = None, rank: int | None = None,
                 rank_fraction: float | None = None, embedding: bool = True, linear: bool = True,
                 folds: Sequence[int] | None = None) -> dict:
    """Write `out_dir`, a compressed copy of the run (see the module doc), of every fold
    or of the folds `folds` only; return compress.json."""
    from transformers import AutoTokenizer

    from foldtune.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, checkpoint_job, load_checkpoint
    from foldtune.inference import fold_checkpoints
    from foldtune.models.compress import compress

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml)")
    if out_dir.resolve() == run_dir.resolve():
        raise ValueError("the compressed run must be written to another folder than the source run")
    if load_config(run_dir / "config.yaml").model.type != "transformer":
        raise ValueError(f"{run_dir} is not a transformer run: only a transformer can be compressed")
    folders = fold_checkpoints(run_dir, only=folds)
    summary = {"source": str(run_dir.resolve()), "keep_layers": keep, "rank": rank, "rank_fraction": rank_fraction,
               "embedding": embedding, "linear": linear, "folds": {}}
    folds = []
    with atomic_directory(out_dir) as tmp:
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        for folder in folders:
            model, meta = load_checkpoint(folder)
            done = compress(model, keep, rank, rank_fraction, embedding, linear)
            target = tmp / folder.relative_to(run_dir)      # fold_k/best, or fold_k/seed_<s>/best
            # the validation score in the source's metadata was the uncompressed model's
            before = {k: meta.pop(k) for k in ("val_mcrmse", "val_per_target") if k in meta}
            done = {**done, "source": str(folder.resolve()), "source_scores": before,
                    "bytes_before": (folder / WEIGHTS_FILE).stat().st_size}
            meta["compression"] = done
            checkpoint_job(target, model, AutoTokenizer.from_pretrained(str(folder)),
                           load_config(folder / CONFIG_FILE), meta)()
            done["bytes_after"] = (target / WEIGHTS_FILE).stat().st_size
            shutil.copy2(folder.parent / RESULT_FILE, target.parent / RESULT_FILE)
            summary["folds"][str(FoldSeed(meta["fold"], meta.get("seed")))] = done    # '0', or '0 seed 7'
            folds.append(meta["fold"])
        # the copy holds exactly these folds, whatever the source's run.json asked for
        atomic_write_json(tmp / RUN_FILE, {**read_provenance(run_dir, missing_ok=True),
                                           "folds": list(dict.fromkeys(folds))})
        atomic_write_json(tmp / SUMMARY_FILE, summary)
    return summary


def describe(done: dict) -> str:
    """One line: layers, ranks, parameters and weight-file bytes before and after."""
    from foldtune.checkpoint import WEIGHTS_FILE

    parts = []
    if len(done["kept_layers"]) < done["of_layers"]:
        parts.append(f"layers {','.join(map(str, done['kept_layers']))} of {done['of_layers']} kept")
    if done["rank"] is not None or done["rank_fraction"] is not None:
        how = f"rank {done['rank']}" if done["rank"] is not None else f"rank fraction {done['rank_fraction']:g}"
        parts.append(f"{how}: embeddings " + (f"factorised (rank {done['embedding_rank']})"
                                             if done["embedding_rank"] is not None else "whole")
                     + f", {done['linear_factorised']} linear layer(s) factorised, {len(done['left_whole'])} "
                       "matrices left whole (their factors would not be smaller)")
    p0, p1 = done["parameters_before"], done["parameters_after"]
    line = f"{'; '.join(parts)}; parameters {p0:,} -> {p1:,} ({p1 / p0:.1%})"
    if "bytes_after" in done:
        b0, b1 = done["bytes_before"], done["bytes_after"]
        line += f", {WEIGHTS_FILE} {b0 / 1e6:.1f} MB -> {b1 / 1e6:.1f} MB"
    return line


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    prog = prog or prog_of("compress")
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write a smaller copy of a run: fewer encoder layers and/or low-rank (SVD) factors of the word "
                    "embeddings and the encoder's linear layers. The copy is a run folder for infer.py --run.",
        epilog=f"examples: {as_typed(prog)} --run runs/student --out runs/student_r64 --rank 64\n"
               f"          {as_typed(prog)} --run runs/student --out runs/student_l3 --keep-layers 0,2,4",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, action=Once, help="a finished transformer run folder")
    parser.add_argument("--out", required=True, help="the compressed run folder to write (replaced if it exists)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, help="rank of every factorised matrix")
    size.add_argument("--rank-fraction", type=float, help="rank as a fraction of each matrix's full rank, in (0, 1]")
    parser.add_argument("--keep-layers", help="encoder layers to keep, 0 the bottom, e.g. 0,2,4 (default: all)")
    parser.add_argument("--no-embedding", action="store_true", help="leave the word embeddings whole")
    parser.add_argument("--no-linear", action="store_true", help="leave the encoder's linear layers whole")
    args = parser.parse_args(argv)
    from foldtune.checkpoint import CheckpointError
    from foldtune.models.compress import parse_layers

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        keep = parse_layers(args.keep_layers) if args.keep_layers is not None else None
        summary = compress_run(args.run, args.out, keep, args.rank, args.rank_fraction, not args.no_embedding,
                               not args.no_linear)
    except (ValueError, ConfigError, CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for fold, done in summary["folds"].items():
        print(f"fold {fold}: {describe(done)}")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
