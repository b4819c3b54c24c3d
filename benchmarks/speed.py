"""foldtune against the Hugging Face Trainer peer: same essays, folds, epochs, lr, batch
size and max_len, one after the other on the same device, in one table.

foldtune runs first, once per speed setting (each switch added to the one before, so each
is measured before and after); the peer then trains on the folds file of the first run.

    python benchmarks/speed.py --model /path/to/all-MiniLM-L6-v2 \\
        --train ../shared/data/ellipse/train.csv [--variants plain,nodrop,graphs,eval256,threads,freeze]

Two times per row: the whole process (wall), and the run's own time after its imports
(train.py's "done: ... in X s" line; the peer's own clock, started after its imports).
Both sides import the same libraries (torch, transformers: 15-20 s on an H100,
whose Python compiles much of them afresh at each start), so the second time is the
one that the pipeline itself decides.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import run_variant  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Cumulative: each setting keeps the switches of the ones before it.
SPEED_SWITCHES = {
    "plain": [],
    "nodrop": ["model.backbone_dropout=0.0"],
    "graphs": ["training.cuda_graphs=true"],
    "eval256": ["training.eval_batch_size=256"],
    "bucket": ["training.bucket_batches=true"],
    "parallel": ["training.parallel_folds=5"],
    "threads": ["training.parallel_folds=5", "training.parallel_mode=threads"],
    "freeze": ["model.freeze_embeddings=true"],
    "compile": ["training.compile=true"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ellipse_minilm.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--variants", default="plain,nodrop,graphs,eval256,threads,freeze")
    parser.add_argument("--runs-dir", default="runs/speed")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--out", default=None, help="write every row as JSON here")
    args = parser.parse_args()

    from foldtune.config import load_config

    cfg = load_config(args.config)
    t = cfg.training
    common = [f"model.name={args.model}", f"data.train_file={args.train}", "data.test_file=null"]
    rows, switches = [], []
    options = SimpleNamespace(config=args.config, runs_dir=args.runs_dir, prefix="speed_")
    for name in args.variants.split(","):
        switches = switches + SPEED_SWITCHES[name]
        row = run_variant(name, switches, options, common)
        scores_file = Path(args.runs_dir) / f"speed_{name}" / "scores.json"
        if scores_file.is_file():
            scores = json.loads(scores_file.read_text())
            row["fold_seconds"] = [f["seconds"] for f in scores["folds"].values()]
        # train.py's own time, from the end of its imports to the report written
        done = re.findall(r"done: .* in ([0-9.]+) s", (Path(args.runs_dir) / f"speed_{name}.log").read_text())
        row["run_seconds"] = float(done[-1]) if done else None
        rows.append(row)

    if not args.skip_peer:
        folds_file = Path(args.runs_dir) / f"speed_{args.variants.split(',')[0]}" / "folds.csv"
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "peer_hf_trainer.py"), "--train", args.train,
             "--folds", str(folds_file), "--model", args.model, "--epochs", str(t.epochs), "--lr", str(t.lr),
             "--batch-size", str(t.batch_size), "--max-len", str(cfg.data.max_len)],
            capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            return 1
        peer = json.loads(result.stdout.strip().splitlines()[-1])["peer"]
        rows.append({"variant": "peer (HF Trainer)", "overrides": "", "seconds": round(seconds, 1),
                     "run_seconds": peer["seconds"], "oof": peer["oof_mcrmse"],
                     "fold_seconds": [f["seconds"] for f in peer["folds"]]})

    import pandas as pd

    n_rows = len(pd.read_csv(args.train))
    samples = n_rows * (cfg.folds.n_splits - 1) * t.epochs      # training rows seen over all folds
    peer = rows[-1] if not args.skip_peer else None
    print("\n| run | switches | OOF MCRMSE | wall s | after imports s | per fold s | train samples/s | "
          "vs peer (wall) | vs peer (after imports) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = f"{peer['seconds'] / r['seconds']:.2f}x" if peer else ""
        run_ratio = (f"{peer['run_seconds'] / r['run_seconds']:.2f}x"
                     if peer and r.get("run_seconds") and peer.get("run_seconds") else "")
        run_seconds = f"{r['run_seconds']:.1f}" if r.get("run_seconds") else "?"
        folds = ", ".join(f"{s:.0f}" for s in r.get("fold_seconds", []))
        oof = f"{r['oof']:.4f}" if "oof" in r else "failed"
        print(f"| {r['variant']} | `{r['overrides'] or '-'}` | {oof} | {r['seconds']:.1f} | {run_seconds} | {folds} | "
              f"{samples / r['seconds']:.0f} | {ratio} | {run_ratio} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
