"""Attention-head pruning's curve: score and inference time against the heads kept.

One foldtune run per target of heads kept (default 100%, 75%, 50% and 25% of the
backbone's heads, read from its config: all-MiniLM-L6-v2 has 6 layers x 12 = 72), the
100% row with `pruning.heads` off, the others with `pruning.heads.target_heads` set to
that share (rounded, at least one). Each row trains the same essays on the same folds
(drawn from the same rows with the same folds.seed; the script checks the folds files
agree) with `configs/ellipse_minilm_fast.yaml` and `training.cuda_graphs=false` on every
row, pruning refusing CUDA graphs: the rows differ in pruning alone. The five folds still
train at once in threads of one process.

For each row:
- OOF MCRMSE (the run's scores.json) and its difference to the unpruned row's;
- the heads kept by each fold (foldtune.json of fold_N/best: `head_gates.kept`, what the
  gates kept) and the heads left in its weights (the backbone's heads less those in
  `pruned_heads`: a layer whose every head closed keeps one, zeroed);
- inference on test.csv: `infer.py --run RUN` as a whole process (imports, loading each
  fold, tokenizing, predicting, writing) and infer's own "predicted N texts ... in X s"
  (from the run's loading to its predictions), each as seconds per 1,000 essays;
- the training command's wall time.

The gates draw their noise from the random generator the fold threads share, so a pruned
row's score is not a sequential run's (`-- training.parallel_folds=1` gives that).

Every row trains before any row's inference is timed. `--phase train` stops there and
`--phase infer` times the rows its --out holds, so that the training can share the GPU with
other work and the timing need not. In about five minutes on one H200 (estimated from
docs/benchmarks.md: the fast config trains in ~30 s with CUDA graphs; without them and
with the gates, a minute or so a row, and ~15 s of infer.py):

    python3 benchmarks/pruning_curve.py --model .devicekit/models/all-MiniLM-L6-v2-fp16 \\
        --train .devicekit/data/ellipse/train.csv --test .devicekit/data/ellipse/test.csv \\
        --out $OUT/pruning_curve.json; cp runs/pruning_curve/*.log $OUT/

On a CPU, a tiny random BERT (2 layers x 2 heads) with --model's tokenizer, 2 folds x 1
epoch of the first 40 essays at max_len 64 (the test does this):

    python benchmarks/pruning_curve.py --tiny --model MINILM_FOLDER --train train.csv --test test.csv \\
        --targets 1.0,0.5
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import DONE, Rows, parse_shares, run_timed, tiny_defaults  # noqa: E402

CONFIG = REPO / "configs" / "ellipse_minilm_fast.yaml"
TINY_ARCHITECTURE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TINY_JOB = dict(rows=40, test_rows=10)
# Two folds in two threads: the GPU run's fold threads, on the CPU. Eager attention: auto
# would log its choice per backbone, and the tiny shape is no kernel's benchmark.
TINY_OVERRIDES = ["folds.n_splits=2", "training.epochs=1", "data.max_len=64", "training.parallel_folds=2",
                  "model.attention=eager"]
# pruning.heads refuses CUDA graphs; the unpruned row trains without them too, so that the
# rows differ in pruning alone.
EVERY_ROW = ["training.cuda_graphs=false"]
PREDICTED = re.compile(r"predicted (\d+) texts with .* in ([0-9.]+) s \(([0-9.]+) s per 1,000 texts")


def backbone_heads(folder: Path) -> int:
    """Attention heads in all layers together, from the backbone's config.json."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    return config.num_hidden_layers * config.num_attention_heads


def heads_of_checkpoints(run_dir: Path, total: int) -> tuple[list[int], list[int]]:
    """Per fold (in fold order): the heads the gates kept, and the heads left in the weights."""
    kept, in_weights = [], []
    folders = sorted(run_dir.glob("fold_*/best"), key=lambda folder: int(folder.parent.name.split("_")[1]))
    for folder in folders:
        meta = json.loads((folder / "foldtune.json").read_text())
        removed = sum(len(heads) for heads in meta.get("pruned_heads", {}).values())
        kept.append(meta["head_gates"]["kept"] if "head_gates" in meta else total)
        in_weights.append(total - removed)
    return kept, in_weights


def train_row(share: float, total: int, overrides: list[str], logs: Path) -> dict:
    """One target's run: trained by train.py, its OOF and each fold's heads read back."""
    target = max(1, round(share * total))
    pruning = [] if share == 1.0 else ["pruning.heads.enabled=true", f"pruning.heads.target_heads={target}"]
    name = f"heads-{round(100 * share)}"
    result, wall = run_timed(name, [sys.executable, REPO / "train.py", "--config", CONFIG, "--name", name,
                                f"output.dir={logs}", *overrides, *EVERY_ROW, *pruning], logs)
    done = DONE.search(result.stderr + result.stdout)
    run_dir = Path(done.group(1))
    scores = json.loads((run_dir / "scores.json").read_text())
    kept, in_weights = heads_of_checkpoints(run_dir, total)
    return {"run": name, "target_share": share, "target_heads": target, "heads_total": total,
            "pruning": bool(pruning), "heads_kept": kept, "heads_in_weights": in_weights,
            "oof": scores["oof"]["mcrmse"], "train_wall_s": round(wall, 1), "after_imports_s": float(done.group(2)),
            "run_dir": str(run_dir), "folds_file": str(run_dir / "folds.csv")}


def infer_row(run_dir: Path, test_csv: Path, logs: Path, name: str) -> dict:
    """infer.py --run on the test essays: the whole process, and infer's own prediction time."""
    result, wall = run_timed(f"{name}-infer", [sys.executable, REPO / "infer.py", "--run", run_dir, "--test", test_csv,
                                           "--out", logs / f"{name}-submission.csv"], logs)
    predicted = PREDICTED.search(result.stderr + result.stdout)
    n = int(predicted.group(1)) if predicted else len(pd.read_csv(test_csv))
    return {"test_rows": n, "infer_wall_s": round(wall, 1),
            "infer_s_per_1000": round(1000 * wall / n, 2),
            "predict_s": float(predicted.group(2)) if predicted else None,
            "predict_s_per_1000": float(predicted.group(3)) if predicted else None}


def table(rows: list[dict]) -> str:
    unpruned = next((row for row in rows if not row["pruning"]), None)
    lines = ["| target (heads kept) | heads kept per fold | heads in the weights per fold | OOF MCRMSE | vs unpruned | "
             "infer.py s per 1,000 essays | predicting s per 1,000 essays | train wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        delta = f"{row['oof'] - unpruned['oof']:+.4f}" if unpruned is not None else "-"
        cells = [f"{100 * row['target_share']:g}% ({row['target_heads']} of {row['heads_total']})"
                 + ("" if row["pruning"] else ", pruning off"),
                 ", ".join(map(str, row["heads_kept"])), ", ".join(map(str, row["heads_in_weights"])),
                 f"{row['oof']:.4f}", delta,
                 row["infer_s_per_1000"], row["predict_s_per_1000"] if row["predict_s_per_1000"] is not None else "-",
                 row["train_wall_s"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def tiny_backbone(folder: Path, tokenizer_source: Path) -> Path:
    """A random BERT of TINY_ARCHITECTURE with the tokenizer of `tokenizer_source`."""
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    torch.manual_seed(0)
    AutoModel.from_config(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512,
                                     **TINY_ARCHITECTURE)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path,
                        help="the backbone folder (all-MiniLM-L6-v2; with --tiny, only its tokenizer is used)")
    parser.add_argument("--train", required=True, type=Path, help="the essays (train.csv)")
    parser.add_argument("--test", required=True, type=Path, help="the essays inference is timed on (test.csv)")
    parser.add_argument("--targets", default="1.0,0.75,0.5,0.25",
                        help="shares of the backbone's heads to keep, one row each; 1.0: pruning off "
                             "(default: %(default)s)")
    parser.add_argument("--rows", type=int, default=None, help="the first N training essays (default all; --tiny 40)")
    parser.add_argument("--test-rows", type=int, default=None, help="the first N test essays (default all; --tiny 10)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random BERT, 2 folds x 1 epoch at max_len 64: a CPU smoke test")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/pruning_curve"))
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here (after each row)")
    parser.add_argument("--phase", choices=("all", "train", "infer"), default="all",
                        help="all: train every row, then time each row's inference; train: the rows "
                             "without inference; infer: time inference of the rows --out holds (trained by "
                             "--phase train), e.g. once the GPU is no longer shared (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="more config overrides for every row, after --")
    args = parser.parse_args()
    targets = parse_shares(args.targets, "--targets")
    tiny_defaults(args, TINY_JOB)
    if args.phase == "infer" and (args.out is None or not args.out.is_file()):
        raise SystemExit(f"--phase infer: --out {args.out} must hold the rows of a --phase train run")
    args.runs_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_csv, test_csv = work / "train.csv", work / "test.csv"
        for source, rows, copy in ((args.train, args.rows, train_csv), (args.test, args.test_rows, test_csv)):
            pd.read_csv(source, dtype=str, keep_default_na=False).iloc[:rows].to_csv(copy, index=False)
        if args.phase == "infer":
            trained = json.loads(args.out.read_text())
        else:
            # a tiny backbone lives in runs_dir: the rows' checkpoints name it, and --phase infer loads them
            backbone = tiny_backbone(args.runs_dir / "tiny-bert", args.model) if args.tiny else args.model.resolve()
            total = backbone_heads(backbone)
            overrides = [*(TINY_OVERRIDES if args.tiny else []), f"model.name={backbone}",
                         f"data.train_file={train_csv}", "data.test_file=null", *args.overrides]
            trained = Rows(args.out)
            for share in targets:
                trained.keep(train_row(share, total, overrides, args.runs_dir))
        if args.phase == "train":
            return check_folds(trained)
        # every row trained before any is timed: inference runs with the training finished
        results = Rows(args.out)
        for row in trained:
            results.keep({**row, **infer_row(Path(row["run_dir"]), test_csv, args.runs_dir, row["run"])})
    print("\n" + table(results))
    return check_folds(results)


def check_folds(results: list[dict]) -> int:
    """0 when every row trained on the same folds, else 1 (said on stderr)."""
    folds = {row["run"]: pd.read_csv(row["folds_file"], dtype={"text_id": str}).sort_values("text_id")["fold"].tolist()
             for row in results}
    if len({tuple(f) for f in folds.values()}) > 1:
        print(f"the rows' folds differ: {', '.join(folds)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
