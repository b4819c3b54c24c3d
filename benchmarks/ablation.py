"""Ablation: one technique switched on at a time against a plain config.

Each variant is `train.py --config CONFIG <common overrides> <the variant's overrides>`,
run as its own process; `--parallel N` runs N at once (then each wall time is measured
with N runs sharing the device, the plain one included, so they compare with each
other but not with a run alone). Prints a markdown table of OOF MCRMSE and wall time.

    python benchmarks/ablation.py --config configs/ellipse_minilm.yaml --parallel 4 \\
        --variants plain,llrd,awp -- model.name=/path/to/minilm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One technique each, at the values the recipe (../shared/docs/RECIPE.md) names.
VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "llrd": ["training.layerwise_lr_decay=0.8"],
    "awp": ["awp.enabled=true", "awp.start_epoch=2", "awp.adv_lr=1e-4", "awp.adv_eps=1e-3"],
    "swa": ["averaging.method=swa", "averaging.start_epoch=4", "averaging.swa_lr=1e-6", "averaging.update_every=5"],
    "swa_from_2": ["averaging.method=swa", "averaging.start_epoch=2", "averaging.swa_lr=1e-5",
                   "averaging.update_every=5"],
    "ema": ["averaging.method=ema", "averaging.ema_decay=0.99", "averaging.update_every=1"],
    "grad_ckpt": ["model.gradient_checkpointing=true"],
    "reinit_1": ["model.reinit_layers=1"],
    "freeze_2": ["model.freeze_embeddings=true", "model.freeze_layers=2"],
    "smooth_l1": ["training.loss=smooth_l1", "training.loss_beta=1.0"],
    "mcrmse_loss": ["training.loss=mcrmse"],
    "attention_pool": ["model.pooling=attention"],
    "weighted_layers": ["model.pooling=weighted_layers", "model.pooling_layers=4"],
    "gem_pool": ["model.pooling=gem"],
    "msd": ["model.head_dropout=0.2", "model.head_dropout_samples=5"],
    "no_backbone_dropout": ["model.backbone_dropout=0.0"],
    "madgrad": ["training.optimizer=madgrad", "training.lr=5e-5"],
    "adamw_8bit": ["training.optimizer=adamw_8bit"],
    "head_tail": ["data.long_text=head_tail", "data.head_fraction=0.25"],
}


def run_variant(name: str, overrides: list[str], args, common: list[str]) -> dict:
    run_name = f"{args.prefix}{name}"
    command = [sys.executable, str(REPO / "train.py"), "--config", args.config, "--name", run_name,
               f"output.dir={args.runs_dir}", *common, *overrides]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = Path(args.runs_dir) / f"{run_name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(result.stdout + result.stderr)
    row = {"variant": name, "overrides": " ".join(overrides), "seconds": round(seconds, 1), "rc": result.returncode}
    scores_file = Path(args.runs_dir) / run_name / "scores.json"
    if result.returncode == 0 and scores_file.is_file():
        scores = json.loads(scores_file.read_text())
        row.update(oof=scores["oof"]["mcrmse"], train_seconds=scores["seconds"],
                   folds=[round(f["mcrmse"], 4) for f in scores["folds"].values()])
    else:
        row["error"] = (result.stderr.strip().splitlines() or ["?"])[-1]
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ellipse_minilm.yaml")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names, default: all")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--runs-dir", default="runs/ablation")
    parser.add_argument("--prefix", default="", help="prefix of the run folders' names")
    parser.add_argument("--out", default=None, help="also write the rows as JSON lines here")
    parser.add_argument("--define", action="append", default=[], metavar="NAME=KEY=VALUE;KEY=VALUE",
                        help="an extra variant, e.g. 'combo=data.long_text=head_tail;model.backbone_dropout=0.0'")
    parser.add_argument("common", nargs="*", help="overrides given to every variant (after --)")
    args = parser.parse_args()
    for definition in args.define:
        name, _, overrides = definition.partition("=")
        VARIANTS[name] = [o for o in overrides.split(";") if o]
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        rows = list(pool.map(lambda n: run_variant(n, VARIANTS[n], args, args.common), names))
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n| variant | overrides | OOF MCRMSE | wall s (process) | train s |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        oof = f"{r['oof']:.4f}" if "oof" in r else f"failed: {r.get('error', '')}"
        print(f"| {r['variant']} | `{r['overrides'] or '-'}` | {oof} | {r['seconds']} | {r.get('train_seconds', '')} |")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
