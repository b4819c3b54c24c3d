"""One GPU against two: the same jobs trained by one process, fold-parallel and
data-parallel (accelerate launch, NCCL), one after the other on one machine.

    python benchmarks/scaling.py --minilm /path/to/all-MiniLM-L6-v2 \\
        --train ../shared/data/ellipse/train.csv --test ../shared/data/ellipse/test.csv --out scaling.json

Jobs:
- minilm: configs/ellipse_minilm_fast.yaml (5 folds x 4 epochs on the essays) on one GPU;
  launched with no mode, which chooses fold-parallel for MiniLM (each process's folds in
  threads), then infer.py on that run; and data-parallel, which trains eagerly (no CUDA
  graphs, one fold at a time), beside the same eager settings on one GPU.
- deberta: configs/deberta_v3_base.yaml, its techniques on, with the architecture of
  microsoft/deberta-v3-base in random weights (no weights exist offline) and the MiniLM
  word-piece tokenizer, so the essays keep their real token lengths (cut at the recipe's
  1,536). The job is the recipe's steady state, shortened: 5 folds x 1 epoch of the first
  --deberta-rows essays, AWP and SWA on from that epoch. One GPU, data-parallel and
  fold-parallel. With the recipe's fused attention (--deberta-attention flex) a run of
  fold 0 on one GPU and one data-parallel first fill the compiled kernels' cache (a kernel
  per batch shape), as an earlier run on the machine would; on a fresh machine that took
  longer than the shortened job itself, so `--deberta-attention eager` (transformers'
  attention, nothing compiled) is what measures the modes against each other.

Each row: the whole process's wall time, the run's own time after its imports (train.py's
"done: ... in X s"), training samples a second over that time, and the OOF MCRMSE.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from deberta_speed import DEBERTA_V3_BASE  # noqa: E402

# NVLink multicast stays off on shared multi-GPU hosts (set there; kept here for any other).
NCCL_SAFE = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DONE = re.compile(r"done: \S+ in ([0-9.]+) s")


def command(gpus: int, mode: str | None, config: str, name: str, overrides: list[str]) -> list[str]:
    train = [str(REPO / "train.py"), "--config", config, "--name", name, *overrides]
    if mode:
        train.insert(1, mode)
    if gpus == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *train]


def run(job: str, setting: str, gpus: int, mode: str | None, config: str, name: str, overrides: list[str],
        runs_dir: Path, samples: int, out: Path | None) -> dict:
    env = {**os.environ, **NCCL_SAFE, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    started = time.perf_counter()
    result = subprocess.run(command(gpus, mode, config, name, [f"output.dir={runs_dir}", *overrides]), env=env,
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    (runs_dir / f"{name}.log").write_text(result.stdout + result.stderr)
    row = {"job": job, "setting": setting, "gpus": gpus, "mode": mode or "none given", "rc": result.returncode,
           "wall_s": round(wall, 1)}
    # the main process's line (a fold-parallel process ends its own share earlier)
    own_log = runs_dir / name / "train.log"
    done = DONE.search(own_log.read_text()) if own_log.is_file() else None
    chosen = re.search(r"\d+ processes, (fold-parallel|data-parallel): (.*)", result.stderr)
    if chosen:
        row["chosen"] = chosen.group(1)
    if done:
        row["after_imports_s"] = float(done.group(1))
        row["samples_per_s"] = round(samples / float(done.group(1)), 1)
    scores = runs_dir / name / "scores.json"
    if result.returncode == 0 and scores.is_file():
        data = json.loads(scores.read_text())
        row["oof"] = round(data["oof"]["mcrmse"], 4)
        row["fold_s"] = [f["seconds"] for f in data["folds"].values()]
    return record(row, result, out, failed=result.returncode != 0 or not scores.is_file())


def record(row: dict, result: subprocess.CompletedProcess, out: Path | None, failed: bool) -> dict:
    """The row, with the command's last error line if it failed, printed and appended to `out`."""
    if failed:
        row["error"] = (result.stderr.strip().splitlines() or ["?"])[-1][:300]
    print(json.dumps(row), flush=True)
    if out is not None:
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    return row


def infer(run_dir: Path, out: Path | None) -> dict:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "infer.py"), "--run", str(run_dir)], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "0"})
    row = {"infer": str(run_dir), "rc": result.returncode, "wall_s": round(time.perf_counter() - started, 1)}
    if result.returncode == 0:
        row["rows"] = len(pd.read_csv(run_dir / "submission.csv"))
    return record(row, result, out, failed=result.returncode != 0)


def train_samples(train_csv: Path, n_splits: int, epochs: int) -> int:
    """Rows a job trains on over all its folds and epochs (each row is in n_splits - 1 folds' training)."""
    return len(pd.read_csv(train_csv)) * (n_splits - 1) * epochs


def minilm(args, runs_dir: Path, out: Path | None) -> None:
    config = "configs/ellipse_minilm_fast.yaml"
    common = [f"model.name={args.minilm}", f"data.train_file={args.train}", f"data.test_file={args.test}"]
    samples = train_samples(Path(args.train), 5, 4)
    eager = ["training.cuda_graphs=false", "training.parallel_folds=1"]
    run("minilm", "1 GPU", 1, None, config, "minilm-1gpu", common, runs_dir, samples, out)
    run("minilm", "2 GPUs, no mode given", 2, None, config, "minilm-2gpu", common, runs_dir, samples, out)
    if not args.no_infer:
        infer(runs_dir / "minilm-2gpu", out)
    if args.even:       # four of the five folds: two for each GPU
        four = ["--folds", "0,1,2,3"]
        run("minilm", "1 GPU, folds 0-3", 1, None, config, "minilm-1gpu-4", common + four, runs_dir, samples * 4 // 5,
            out)
        run("minilm", "2 GPUs, folds 0-3, no mode given", 2, None, config, "minilm-2gpu-4", common + four, runs_dir,
            samples * 4 // 5, out)
    if not args.skip_eager:
        run("minilm", "1 GPU, eager (as data-parallel trains)", 1, None, config, "minilm-1gpu-eager",
            common + eager, runs_dir, samples, out)
        run("minilm", "2 GPUs, data-parallel", 2, "--data-parallel", config, "minilm-dp", common + eager,
            runs_dir, samples, out)


def deberta_backbone(folder: Path, tokenizer_source: Path, architecture: dict = DEBERTA_V3_BASE) -> None:
    """DeBERTa-v3-base's architecture (or `architecture`) in random weights, with a word-piece tokenizer."""
    import shutil

    import torch
    from transformers import AutoModel, DebertaV2Config

    torch.manual_seed(0)
    AutoModel.from_config(DebertaV2Config(**architecture)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_source / name, folder / name)


def deberta(args, runs_dir: Path, work: Path, out: Path | None) -> None:
    config = "configs/deberta_v3_base.yaml"
    backbone = work / "deberta-v3-base-random"
    deberta_backbone(backbone, Path(args.minilm))
    subset = work / "deberta_train.csv"
    pd.read_csv(args.train, dtype=str, keep_default_na=False).head(args.deberta_rows).to_csv(subset, index=False)
    common = [f"model.name={backbone}", f"data.train_file={subset}", "data.test_file=null", "training.epochs=1",
              "awp.start_epoch=1", "averaging.start_epoch=1", f"model.attention={args.deberta_attention}"]
    samples = train_samples(subset, 5, 1)
    if not args.no_prime and args.deberta_attention == "flex":
        env = {**os.environ, **NCCL_SAFE, "HF_HUB_OFFLINE": "1"}
        primes = [subprocess.Popen(command(gpus, mode, config, f"prime-{gpus}", [f"output.dir={runs_dir}", "--folds",
                                                                                   "0", *common]),
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                  for gpus, mode in ((1, None), (2, "--data-parallel"))]
        started = time.perf_counter()
        print(json.dumps({"prime_rc": [p.wait() for p in primes],
                          "prime_s": round(time.perf_counter() - started, 1)}), flush=True)
    run("deberta", "1 GPU", 1, None, config, "deberta-1gpu", common, runs_dir, samples, out)
    run("deberta", "2 GPUs, data-parallel", 2, "--data-parallel", config, "deberta-dp", common, runs_dir, samples,
        out)
    run("deberta", "2 GPUs, fold-parallel", 2, "--fold-parallel", config, "deberta-fp", common, runs_dir, samples,
        out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", required=True, help="all-MiniLM-L6-v2 folder (its tokenizer serves DeBERTa too)")
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--jobs", default="minilm,deberta")
    parser.add_argument("--deberta-rows", type=int, default=1000)
    parser.add_argument("--deberta-attention", default="flex", choices=["flex", "eager"],
                        help="the recipe's fused attention (compiled per batch shape), or transformers' own")
    parser.add_argument("--even", action="store_true", help="also MiniLM's folds 0-3 (two for each GPU)")
    parser.add_argument("--no-infer", action="store_true", help="leave out infer.py on the fold-parallel run")
    parser.add_argument("--no-prime", action="store_true", help="time DeBERTa with the kernels' cache as it is")
    parser.add_argument("--skip-eager", action="store_true", help="leave out MiniLM's eager and data-parallel rows")
    parser.add_argument("--runs-dir", default="runs/scaling")
    parser.add_argument("--out", default=None, help="append every row as a JSON line here")
    args = parser.parse_args()
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else None
    jobs = args.jobs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "minilm" in jobs:
            minilm(args, runs_dir, out)
        if "deberta" in jobs:
            deberta(args, runs_dir, Path(tmp), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
