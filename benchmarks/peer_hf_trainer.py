"""The peer: what a user would write instead of foldtune, with Hugging Face `Trainer`.

`AutoModelForSequenceClassification` with six regression outputs, the same folds file,
epochs, learning rate, batch size and max_len as the foldtune run it is compared with,
bf16, dynamic padding through `DataCollatorWithPadding`, evaluation each epoch, and the
OOF predictions of the final model of each fold. Trainer's own defaults otherwise
(linear decay, no warmup, no weight decay): a user's first script.

    python benchmarks/peer_hf_trainer.py --train train.csv --folds runs/X/folds.csv \\
        --model /path/to/all-MiniLM-L6-v2 --epochs 4 --lr 5e-5 --batch-size 16 --max-len 512
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import pandas as pd
import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)

TARGETS = ["cohesion", "syntax", "vocabulary", "phraseology", "grammar", "conventions"]


class Essays(torch.utils.data.Dataset):
    def __init__(self, encodings: dict, labels: np.ndarray):
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i].astype(np.float32)
        return item


def subset(encodings: dict, idx: np.ndarray) -> dict:
    return {k: [v[i] for i in idx] for k, v in encodings.items()}


def mcrmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.sqrt(np.mean((y_true - y_pred) ** 2, axis=0))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True)
    parser.add_argument("--folds", required=True, help="folds.csv of the foldtune run (text_id, fold)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--out", default=None, help="write the OOF predictions here")
    args = parser.parse_args()

    started = time.perf_counter()
    frame = pd.read_csv(args.train).merge(pd.read_csv(args.folds), on="text_id")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    encodings = tokenizer(frame["full_text"].tolist(), truncation=True, max_length=args.max_len)
    labels = frame[TARGETS].to_numpy(dtype=np.float32)
    oof = np.zeros_like(labels)
    fold_rows = []
    for fold in sorted(frame["fold"].unique()):
        fold_started = time.perf_counter()
        train_idx = np.flatnonzero(frame["fold"] != fold)
        valid_idx = np.flatnonzero(frame["fold"] == fold)
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model, num_labels=len(TARGETS), problem_type="regression", dtype=torch.float32)
        with tempfile.TemporaryDirectory() as out_dir:
            training_args = TrainingArguments(
                output_dir=out_dir, per_device_train_batch_size=args.batch_size,
                per_device_eval_batch_size=args.batch_size * 2, learning_rate=args.lr,
                num_train_epochs=args.epochs, bf16=torch.cuda.is_available(), eval_strategy="epoch",
                save_strategy="no", logging_strategy="epoch", report_to=[], seed=42, disable_tqdm=True,
            )
            trainer = Trainer(
                model=model, args=training_args, processing_class=tokenizer,
                train_dataset=Essays(subset(encodings, train_idx), labels[train_idx]),
                eval_dataset=Essays(subset(encodings, valid_idx), labels[valid_idx]),
                data_collator=DataCollatorWithPadding(tokenizer),
                compute_metrics=lambda p: {"mcrmse": mcrmse(p.label_ids, p.predictions)},
            )
            trainer.train()
            oof[valid_idx] = trainer.predict(Essays(subset(encodings, valid_idx), labels[valid_idx])).predictions
        seconds = time.perf_counter() - fold_started
        row = {"fold": int(fold), "mcrmse": mcrmse(labels[valid_idx], oof[valid_idx]), "seconds": round(seconds, 1),
               "train_rows": len(train_idx), "steps": trainer.state.global_step}
        fold_rows.append(row)
        print(json.dumps({"peer_fold": row}), flush=True)
    summary = {"peer": {"oof_mcrmse": mcrmse(labels, oof), "seconds": round(time.perf_counter() - started, 1),
                        "folds": fold_rows}}
    if args.out:
        out = pd.DataFrame(oof, columns=TARGETS)
        out.insert(0, "text_id", frame["text_id"])
        out.to_csv(args.out, index=False)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
