"""Size, speed and held-out score of a compressed student, at several ranks and layer subsets.

Each variant is written by `foldtune compress` into --out-dir (a run folder), loaded back
through the checkpoint path that infer.py uses, timed and scored:

    python benchmarks/compress.py --run runs/student_h0 [--train ../shared/data/ellipse/train.csv] \\
        [--ranks full 256 128 64 32] [--layers all 0,2,4 0,1,2] [--heal-epochs 1] [--out-dir runs/compress]

Held-out rows, as the student's own score (distill.py): the essays of the teacher fold
the student was held out from (scores.json's holdout_fold), which neither the student
nor the teacher models behind its targets trained on. The MCRMSE of the "all / full"
row is the student's as its run scored it (up to the GPU's rounding); the compressed
rows are scored on the same essays, predicted the same way (the run's max_len,
truncation and eval batch size, bf16 autocast on a GPU that has it, no clipping). Any
run can be given with --fold k: fold k's checkpoint is scored on fold k's rows (its OOF
rows).

Speed: seconds per 1,000 essays of the forward passes over the held-out essays, already
tokenized, the model loaded and warmed up: the best of --repeats passes. Size: the
parameters and model.safetensors (fp32) of the compressed checkpoint.

--heal-epochs N: after compressing, fine-tune each variant for N epochs on the student's
own training rows and targets (student_targets.csv; a CV run: the other folds with the
true scores) at the run's lr with a linear decay, and score the last step on the held
out rows (no step is chosen by that score). Off by default.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from foldtune.checkpoint import WEIGHTS_FILE, load_checkpoint
from foldtune.compress import compress_run
from foldtune.config import load_config
from foldtune.data.collate import DynamicPadding
from foldtune.data.dataset import TextDataset, encode_data
from foldtune.data.validate import load_train
from foldtune.files import file_sha256
from foldtune.inference import inference_precision
from foldtune.metrics import score_report
from foldtune.models.compress import count_parameters, parse_layers
from foldtune.run_layout import read_run_csv
from foldtune.runtime.predict import predict
from foldtune.runtime.precision import resolve_device


def held_out_fold(run_dir: Path, fold: int | None) -> int:
    """--fold, else the fold a student was held out from (scores.json)."""
    if fold is not None:
        return fold
    scores_file = run_dir / "scores.json"
    scores = json.loads(scores_file.read_text(encoding="utf-8")) if scores_file.is_file() else {}
    if "holdout_fold" not in scores:
        raise SystemExit(f"{run_dir} is not a distilled student (no holdout_fold in scores.json): pass --fold k to "
                         "score its fold-k model on fold k's rows")
    if scores["holdout_fold"] is None:
        raise SystemExit(f"{run_dir} is a student trained on every essay (distill.holdout_fold=null): it has no "
                         "held-out rows; give the student trained with distill.holdout_fold=h")
    return int(scores["holdout_fold"])


def read_rows(run_dir: Path, train_file: Path, fold: int):
    """The train frame (checked against the run's), the fold of each row, the held-out mask."""
    cfg = load_config(run_dir / "config.yaml")
    recorded = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("train_file_sha256")
    if recorded is not None and file_sha256(train_file) != recorded:
        raise SystemExit(f"{train_file} is not the file {run_dir} trained on (SHA-256 differs from run.json)")
    frame = load_train(train_file, cfg.data, cfg.folds)
    id_column = cfg.data.id_column
    folds = read_run_csv(run_dir / "folds.csv", id_column)
    fold_of = dict(zip(folds[id_column], folds["fold"]))
    fold_column = frame[id_column].map(fold_of).to_numpy()
    if pd.isna(fold_column).any():
        raise SystemExit(f"{train_file} has rows that {run_dir / 'folds.csv'} does not list")
    return cfg, frame, fold_column.astype(np.int64), fold_column == fold


def training_rows(run_dir: Path, cfg, frame: pd.DataFrame, fold_column: np.ndarray, fold: int):
    """(texts, targets) the model was trained on: a student's student_targets.csv (its
    essays; pseudo-labelled rows are left out), else the other folds' true scores."""
    names = list(cfg.data.target_columns)
    table_file = run_dir / "student_targets.csv"
    if table_file.is_file():
        table = read_run_csv(table_file, cfg.data.id_column)
        table = table[table["source"] == "train"]
        text_of = dict(zip(frame[cfg.data.id_column], frame[cfg.data.text_column]))
        return [text_of[i] for i in table[cfg.data.id_column]], table[names].to_numpy(dtype=np.float32)
    rows = fold_column != fold
    return frame[cfg.data.text_column][rows].tolist(), frame[names][rows].to_numpy(dtype=np.float32, copy=True)


def heal(model, cfg, train: TextDataset, pad_token_id: int, device: torch.device, epochs: int) -> None:
    """A short fine-tune of a compressed model: AdamW at the run's lr, linear decay to zero, MSE."""
    t = cfg.training
    precision = inference_precision("auto", device)
    loader = torch.utils.data.DataLoader(train, batch_size=t.batch_size, shuffle=True,
                                         collate_fn=DynamicPadding(pad_token_id),
                                         generator=torch.Generator().manual_seed(t.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, eps=t.adam_eps)
    total = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            with precision.autocast():
                preds = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            loss = torch.nn.functional.mse_loss(preds.float(), batch["labels"].to(device))
            optimizer.zero_grad(set_to_none=True)
            precision.scaler.scale(loss).backward()
            precision.scaler.step(optimizer)
            precision.scaler.update()
            schedule.step()
    model.eval()


def timed_predict(model, dataset, batch_size, pad_token_id, device, precision, repeats):
    """(predictions, best seconds of `repeats` passes) after one warm-up pass."""
    preds = predict(model, dataset, batch_size, pad_token_id, device, precision)
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        predict(model, dataset, batch_size, pad_token_id, device, precision)
        best = min(best, time.perf_counter() - started)
    return preds, best


def variant_name(layers: list[int] | None, rank: int | None) -> str:
    return f"layers_{'all' if layers is None else '-'.join(map(str, layers))}_rank_{rank or 'full'}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a student run held out from a fold (or any run, with --fold)")
    parser.add_argument("--train", default=None, help="the labelled essays (default: the run's data.train_file)")
    parser.add_argument("--fold", type=int, default=None, help="score fold k's model on fold k's rows")
    parser.add_argument("--ranks", nargs="+", default=["full", "256", "128", "64", "32"])
    parser.add_argument("--layers", nargs="+", default=["all", "0,2,4", "0,1,2"],
                        help="encoder layer subsets to keep: 'all' or indices such as 0,2,4")
    parser.add_argument("--no-embedding", action="store_true", help="leave the word embeddings whole")
    parser.add_argument("--heal-epochs", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant (the best counts)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-dir", default="runs/compress", help="the compressed run folders go here")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    run_dir = Path(args.run)
    fold = held_out_fold(run_dir, args.fold)
    cfg = load_config(run_dir / "config.yaml")
    train_file = Path(args.train or cfg.data.train_file)
    cfg, frame, fold_column, scored = read_rows(run_dir, train_file, fold)
    names = list(cfg.data.target_columns)
    true = frame[names].to_numpy(dtype=np.float64)[scored]
    device = resolve_device(args.device)
    precision = inference_precision("auto", device)
    source = run_dir / f"fold_{fold}" / "best"

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    encode = lambda texts: encode_data(tokenizer, texts, cfg.data).input_ids  # noqa: E731
    dataset = TextDataset(encode(frame[cfg.data.text_column][scored].tolist()))
    healing = None
    if args.heal_epochs > 0:
        texts, targets = training_rows(run_dir, cfg, frame, fold_column, fold)
        healing = TextDataset(encode(texts), targets)
    batch_size, pad = cfg.training.eval_batch_size, tokenizer.pad_token_id
    print(f"{run_dir}: fold {fold}'s model scored on the {int(scored.sum())} essays of fold {fold}; device {device}, "
          f"{precision.name}", flush=True)

    rows = []
    out_dir = Path(args.out_dir)
    for layers_text in args.layers:
        layers = None if layers_text == "all" else parse_layers(layers_text)
        for rank_text in args.ranks:
            rank = None if rank_text == "full" else int(rank_text)
            folder = source
            if layers is not None or rank is not None:
                target = out_dir / variant_name(layers, rank)
                compress_run(run_dir, target, layers, rank, embedding=not args.no_embedding, folds=[fold])
                folder = target / f"fold_{fold}" / "best"
            model, _ = load_checkpoint(folder, device)
            preds, seconds = timed_predict(model, dataset, batch_size, pad, device, precision, args.repeats)
            row = {"layers": layers_text, "rank": rank_text, "parameters": count_parameters(model),
                   "checkpoint_mb": (folder / WEIGHTS_FILE).stat().st_size / 1e6,
                   "seconds_per_1000": 1000 * seconds / len(dataset),
                   "mcrmse": score_report(true, preds, names)["mcrmse"]}
            if healing is not None:
                heal(model, cfg, healing, pad, device, args.heal_epochs)
                row["healed_mcrmse"] = score_report(true, predict(model, dataset, batch_size, pad, device,
                                                                  precision), names)["mcrmse"]
            rows.append(row)
            print(f"  {variant_name(layers, rank)}: {row}", flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    full = next((r for r in rows if r["layers"] == "all" and r["rank"] == "full"), None)
    header = ["layers", "rank", "parameters", "checkpoint MB", "s / 1,000 essays", "MCRMSE", "vs uncompressed"]
    if healing is not None:
        header.append(f"MCRMSE after {args.heal_epochs} epoch(s) of healing")
    print("\n| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for row in rows:
        change = "-" if full is None else f"{row['mcrmse'] - full['mcrmse']:+.4f}"
        cells = [row["layers"], row["rank"], f"{row['parameters']:,}", f"{row['checkpoint_mb']:.1f}",
                 f"{row['seconds_per_1000']:.2f}", f"{row['mcrmse']:.4f}", change]
        if healing is not None:
            cells.append(f"{row['healed_mcrmse']:.4f}")
        print("| " + " | ".join(cells) + " |")
    scores_file = run_dir / "scores.json"
    if scores_file.is_file() and "student" in (scores := json.loads(scores_file.read_text(encoding="utf-8"))):
        print(f"\n{scores_file}: the student's MCRMSE on fold {fold} as trained, {scores['student']['mcrmse']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
