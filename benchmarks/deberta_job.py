"""The DeBERTa-v3-base recipe as a job, against the Hugging Face Trainer peer, in one table.

foldtune trains `configs/deberta_v3_base.yaml` (its techniques on) on the essays with the
architecture of microsoft/deberta-v3-base in random weights and the MiniLM word-piece
tokenizer (no DeBERTa weights exist offline; the essays keep their real token lengths).
The peer (`peer_hf_trainer.py`: `Trainer`, `AutoModelForSequenceClassification`) then
trains the same model folder on the foldtune run's folds file, with its epochs, lr, batch
size and max_len: the same optimizer steps per fold, which the table shows for both.
`--ceiling` adds the same-shape BERT (DeBERTa-v3-base's hidden size, layers, heads,
intermediate size and vocabulary) with transformers' SDPA attention, one training step
at a time through foldtune's step (bf16 autocast, fused AdamW) on random ids of the
essays' token lengths (deberta_speed.py's `measure`): the speed this shape could reach.

Times as benchmarks/speed.py takes them: the whole process (wall), and the run's own time
after its imports (train.py's "done: ... in X s"; the peer's own clock). Train samples/s
is train rows x epochs over the after-imports time, evaluation and compilation included.
GPU memory: the most nvidia-smi saw in use during the command (every process's, CUDA
contexts and cached memory included). `--no-peer` leaves the peer out, to set foldtune's
settings against each other (`--variant`).

In about ten minutes on one H200: the first 256 essays, 5 folds x the recipe's 4
epochs (AWP from epoch 2, SWA over epoch 4), 4,096 training samples a side (estimated from
docs/benchmarks.md: foldtune 250-350 s with a fresh machine's compilation, the peer ~100 s,
the ceiling ~30 s). The recipe's fused attention compiles a kernel per batch width on a
fresh machine, which a shortened job pays in full; `-- model.attention=eager` measures
transformers' attention instead.

    python3 benchmarks/deberta_job.py --minilm .devicekit/models/all-MiniLM-L6-v2-fp16 \\
        --train .devicekit/data/ellipse/train.csv --rows 256 --ceiling --out $OUT/deberta_job.json; \\
        cp runs/deberta_job/*.log $OUT/

On a CPU, tiny models in 2 folds x 1 epoch of 40 essays (the test does this):

    python benchmarks/deberta_job.py --tiny --minilm MINILM_FOLDER --train train.csv --ceiling
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from deberta_speed import DEBERTA_V3_BASE  # noqa: E402
from rows import DONE, Rows, run_timed, tiny_defaults  # noqa: E402
from scaling import deberta_backbone  # noqa: E402

CONFIG = REPO / "configs" / "deberta_v3_base.yaml"
TINY_ARCHITECTURE = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
# Four layers: the recipe freezes the bottom two and re-initialises the top one. Eager
# attention: the fused kernel trains on CUDA only.
TINY_JOB = dict(rows=40, epochs=1, max_len=64)
TINY_OVERRIDES = ["folds.n_splits=2", "model.attention=eager"]
FOLD = re.compile(r"fold (\d+): (\d+) train / \d+ valid rows, (\d+) steps")
PEER = "peer (HF Trainer)"


class GpuBusy:
    """The GPU's busy fraction while a command runs: nvidia-smi's utilization.gpu (the share
    of each sample period in which a kernel was executing), sampled every 100 ms and
    averaged; and the most device memory in use meanwhile (memory.used: every process's,
    the CUDA context and the allocator's cache included: what a smaller card must hold).
    None without nvidia-smi (a CPU machine)."""

    def __enter__(self) -> "GpuBusy":
        self.samples: list[tuple[float, float]] = []
        try:
            self.process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", "100", "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except (FileNotFoundError, PermissionError):
            self.process = None
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            out, _ = self.process.communicate()
            self.samples = busy_samples(out)

    @property
    def fraction(self) -> float | None:
        return round(sum(busy for busy, _ in self.samples) / len(self.samples) / 100, 3) if self.samples else None

    @property
    def peak_gib(self) -> float | None:
        return round(max(mib for _, mib in self.samples) / 1024, 1) if self.samples else None


def busy_samples(out: str) -> list[tuple[float, float]]:
    """nvidia-smi's lines "utilization %, memory MiB" as numbers; lines that are not two numbers
    (a GPU that reports [N/A], a line cut when the sampler stops) are left out."""
    samples = []
    for line in out.splitlines():
        try:
            busy, mib = (float(cell) for cell in line.split(","))
        except ValueError:
            continue
        samples.append((busy, mib))
    return samples


def timed(name: str, command: list, logs: Path, caches: Path | None = None
          ) -> tuple[subprocess.CompletedProcess, float, GpuBusy]:
    """rows.run_timed's finished command and wall seconds, and the GPU's use meanwhile.
    caches: a folder for inductor's and Triton's caches of this command alone (--cold-compile)."""
    env = None
    if caches is not None:
        env = {"TORCHINDUCTOR_CACHE_DIR": str(caches / name / "inductor"),
               "TRITON_CACHE_DIR": str(caches / name / "triton")}
    with GpuBusy() as busy:
        result, wall = run_timed(name, command, logs, env)
    return result, wall, busy


def training_flops(train_csv: Path, folds_file: str, tokenizer_folder: Path, max_len: int, epochs: int,
                   architecture: dict) -> float:
    """Model FLOPs of the job's training passes, counting real tokens only.

    Each fold trains on the rows outside it, `epochs` times; a row of n real tokens (its
    word pieces cut at max_len) costs n x deberta_speed.flops_per_token(n): per layer
    3 x (24 H^2 n + 4 n^2 H + 4 x 512 H n + 4 x 512 H^2), one forward (the weight
    products, the attention scores and values, the disentangled terms against 2k = 512
    relative embeddings, their projections) and a backward twice its size. Not counted:
    AWP's second pass, evaluation, and the work frozen layers skip.
    """
    import numpy as np
    from transformers import AutoTokenizer

    from deberta_speed import flops_per_token

    texts = pd.read_csv(train_csv, dtype=str, keep_default_na=False).set_index("text_id")["full_text"]
    folds = pd.read_csv(folds_file, dtype={"text_id": str}).set_index("text_id")["fold"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    n = np.array([min(len(ids), max_len) for ids in tokenizer(texts.loc[folds.index].tolist())["input_ids"]])
    per_row = np.array([length * flops_per_token(length, architecture["hidden_size"],
                                                 architecture["num_hidden_layers"]) for length in n])
    # a row is trained by every fold but its own: n_folds - 1 times per epoch
    return float(per_row.sum() * (folds.nunique() - 1) * epochs)


def foldtune_job(job_overrides: list[str], backbone: Path, train_csv: Path, logs: Path, name: str = "foldtune",
                 caches: Path | None = None):
    """foldtune's row, and the run's resolved config (what the peer must match)."""
    from foldtune.config import load_config

    overrides = [f"model.name={backbone}", f"data.train_file={train_csv}", "data.test_file=null",
                 f"output.dir={logs}", *job_overrides]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")       # the run folder's and log's name
    result, wall, busy = timed(slug, [sys.executable, REPO / "train.py", "--config", CONFIG, "--name", slug,
                                      *overrides], logs, caches)
    done = DONE.search(result.stderr + result.stdout)
    run_dir, after_imports = Path(done.group(1)), float(done.group(2))
    cfg = load_config(run_dir / "config.yaml")
    # folds trained in processes of their own log to fold_N/train.log; one line per fold either way
    logs_text = "".join(log.read_text() for log in [run_dir / "train.log", *sorted(run_dir.glob("fold_*/train.log"))])
    folds = sorted(set((int(f), int(rows), int(steps)) for f, rows, steps in FOLD.findall(logs_text)))
    train_rows = sum(rows for _, rows, _ in folds)
    scores = json.loads((run_dir / "scores.json").read_text())
    return {"run": name, "overrides": job_overrides, "oof": scores["oof"]["mcrmse"], "wall_s": round(wall, 1),
            "after_imports_s": after_imports, "gpu_busy": busy.fraction, "gpu_memory_gib": busy.peak_gib,
            "attention": cfg.model.attention,
            "samples_per_s": round(train_rows * cfg.training.epochs / after_imports, 1),
            "steps_per_fold": [steps for _, _, steps in folds], "folds_file": str(run_dir / "folds.csv")}, cfg


def peer_job(cfg, backbone: Path, train_csv: Path, folds_file: str, logs: Path) -> dict:
    t = cfg.training
    result, wall, busy = timed(
        "peer", [sys.executable, REPO / "benchmarks" / "peer_hf_trainer.py", "--train", train_csv, "--folds",
                 folds_file, "--model", backbone, "--epochs", t.epochs, "--lr", t.lr, "--batch-size", t.batch_size,
                 "--max-len", cfg.data.max_len], logs)
    peer = json.loads(result.stdout.strip().splitlines()[-1])["peer"]
    train_rows = sum(fold["train_rows"] for fold in peer["folds"])
    return {"run": PEER, "oof": peer["oof_mcrmse"], "wall_s": round(wall, 1), "after_imports_s": peer["seconds"],
            "gpu_busy": busy.fraction, "gpu_memory_gib": busy.peak_gib,
            "samples_per_s": round(train_rows * t.epochs / peer["seconds"], 1),
            "steps_per_fold": [fold["steps"] for fold in peer["folds"]], "folds_file": folds_file}


def ceiling(architecture: dict, cfg, tokenizer_folder: Path, train_csv: Path, work: Path, steps: int,
            profile: bool = False) -> dict:
    """The same-shape BERT's training-step throughput at the recipe's batch size, on the essays' lengths."""
    import numpy as np
    from transformers import AutoModel, AutoTokenizer, BertConfig

    from deberta_speed import PLAIN, measure

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    texts = pd.read_csv(train_csv)["full_text"].tolist()
    lengths = np.array([len(ids) for ids in tokenizer(texts)["input_ids"]])   # cut at max_len by measure
    shape = {key: architecture[key] for key in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                "num_attention_heads", "intermediate_size")}
    folder = work / "bert-shape-sdpa"
    # config.json does not keep the attention implementation: transformers loads BERT with
    # SDPA by default, as foldtune's AutoModel.from_pretrained does here.
    AutoModel.from_config(BertConfig(**shape, max_position_embeddings=cfg.data.max_len)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    row = measure("BERT shape, SDPA", PLAIN + [f"data.max_len={cfg.data.max_len}"], lengths, folder, tokenizer,
                  steps, profile=profile, architecture=architecture)
    # measure's FLOPs count DeBERTa's disentangled terms, which BERT has not: no MFU here
    return {"run": f"ceiling: same-shape BERT, SDPA, batch {cfg.training.batch_size} (training steps only)",
            "samples_per_s": row["samples_per_s"], "timed_steps": row["steps"], "peak_gib": row["peak_gib"],
            "padding_share": row["padding_share"],
            **{key: row[key] for key in ("top_kernels", "attention_forward_share") if key in row}}


def table(rows: list[dict]) -> str:
    """The rows as a markdown table; the ratios to the peer's times where the peer ran."""
    peer = next((row for row in rows if row["run"] == PEER), None)
    lines = ["| run | OOF MCRMSE | wall s | after imports s | train samples/s | GPU busy | GPU memory GiB | "
             "MFU (real tokens) | steps per fold | vs peer (wall) | vs peer (after imports) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def share(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    def ratio(key, row):
        return f"{peer[key] / row[key]:.2f}x" if peer is not None and "oof" in row else "-"

    for row in rows:
        job = "oof" in row
        cells = [row["run"], f"{row['oof']:.4f}" if job else "-", row.get("wall_s", "-"),
                 row.get("after_imports_s", "-"), row["samples_per_s"], share(row.get("gpu_busy")),
                 "-" if row.get("gpu_memory_gib") is None else row["gpu_memory_gib"],
                 share(row.get("mfu")), ", ".join(map(str, row["steps_per_fold"])) if job else "-",
                 ratio("wall_s", row), ratio("after_imports_s", row)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", required=True, type=Path,
                        help="all-MiniLM-L6-v2 folder (its tokenizer serves the random DeBERTa)")
    parser.add_argument("--train", required=True, type=Path, help="the essays (train.csv)")
    parser.add_argument("--rows", type=int, default=None, help="the first N essays (default all; --tiny 40)")
    parser.add_argument("--epochs", type=int, default=None, help="default the config's (--tiny 1)")
    parser.add_argument("--max-len", type=int, default=None, help="default the config's (--tiny 64)")
    parser.add_argument("--ceiling", action="store_true", help="also the same-shape BERT SDPA step throughput")
    parser.add_argument("--profile", action="store_true",
                        help="the ceiling row also profiles its step (torch.profiler's top kernels; CUDA only)")
    parser.add_argument("--tiny", action="store_true", help="tiny models, 2 folds x 1 epoch: a CPU smoke test")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/deberta_job"))
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here (after each row)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="another foldtune row with these space-separated overrides on top, e.g. "
                             "'5 folds at once=training.parallel_folds=5' (repeatable)")
    parser.add_argument("--no-peer", action="store_true",
                        help="foldtune's rows only (settings against each other), no Trainer run")
    parser.add_argument("--cold-compile", action="store_true",
                        help="each run compiles into empty caches of its own, as on a fresh machine (otherwise "
                             "a later row reuses the kernels an earlier one compiled)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak for MFU (default an H100/H200 SXM's 989)")
    parser.add_argument("overrides", nargs="*", help="more config overrides for foldtune, after --")
    args = parser.parse_args()
    tiny_defaults(args, TINY_JOB)
    job_overrides = [*(TINY_OVERRIDES if args.tiny else []),
                     *([f"training.epochs={args.epochs}"] if args.epochs else []),
                     *([f"data.max_len={args.max_len}"] if args.max_len else []), *args.overrides]
    architecture = {**DEBERTA_V3_BASE, **(TINY_ARCHITECTURE if args.tiny else {})}
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    results = Rows(args.out)
    keep = results.keep

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        caches = work / "compile-caches" if args.cold_compile else None
        backbone = work / "deberta-v3-base-random"
        deberta_backbone(backbone, args.minilm, architecture)
        train_csv = work / "train.csv"
        pd.read_csv(args.train, dtype=str, keep_default_na=False).iloc[:args.rows].to_csv(train_csv, index=False)
        row, cfg = foldtune_job(job_overrides, backbone, train_csv, args.runs_dir, caches=caches)
        flops = training_flops(train_csv, row["folds_file"], args.minilm, cfg.data.max_len, cfg.training.epochs,
                               architecture)

        def with_mfu(job: dict) -> dict:
            return {**job, "mfu": round(flops / job["after_imports_s"] / (args.peak_tflops * 1e12), 4)}

        keep(with_mfu(row))
        if not args.no_peer:
            keep(with_mfu(peer_job(cfg, backbone, train_csv, row["folds_file"], args.runs_dir)))
        for variant in args.variant:
            name, _, extra = variant.partition("=")
            # the same folds: drawn from the same rows with the same folds.seed
            keep(with_mfu(foldtune_job([*job_overrides, *extra.split()], backbone, train_csv,
                                       args.runs_dir, name=name.strip(), caches=caches)[0]))
        if args.ceiling:
            keep(ceiling(architecture, cfg, args.minilm, train_csv, work, steps=2 if args.tiny else 20,
                         profile=args.profile))
    print("\n" + table(results))
    steps = {row["run"]: row["steps_per_fold"] for row in results if "oof" in row}
    if len({tuple(s) for s in steps.values()}) > 1:
        print(f"optimizer steps per fold differ: {steps}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
