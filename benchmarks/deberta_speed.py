"""DeBERTa-v3-base architecture (random weights) trained through foldtune's own FoldTrainer:
throughput, model FLOP utilisation, peak memory, and where the time goes.

No weights are needed: the architecture of microsoft/deberta-v3-base is built from its
config and saved to a temporary folder that `model.name` points at. Rows are random
token ids with the lengths of the real essays (`--lengths`, one integer per line, e.g.
the essays' word-piece counts), cut at max_len.

    python benchmarks/deberta_speed.py --lengths lengths.txt --out deberta.json
    python benchmarks/deberta_speed.py --lengths lengths.txt --size large \
        --config configs/deberta_v3_large.yaml --only large --out large.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from foldtune.config import ConfigError, load_config  # noqa: E402
from foldtune.data.dataset import TextDataset  # noqa: E402
from foldtune.training.trainer import FoldData, FoldTrainer  # noqa: E402

H100_BF16_PEAK = 989e12  # dense bf16 tensor-core peak of an H100 SXM (an H200 has the same), FLOP/s

DEBERTA_V3_BASE = dict(
    vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=512, type_vocab_size=0, position_biased_input=False, relative_attention=True,
    position_buckets=256, max_relative_positions=-1, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
    share_att_key=True, hidden_act="gelu", layer_norm_eps=1e-7, pad_token_id=0,
)
# microsoft/deberta-v3-large differs from the base in its size alone.
SIZES = {"base": {}, "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                   intermediate_size=4096)}


def flops_per_token(length: int, hidden: int = 768, layers: int = 12, span: int = 512) -> float:
    """Model FLOPs of a forward and backward pass per token of a sequence of `length`.

    Per layer and token, forward: the six weight matrices (Q, K, V, output, two FFN)
    24 H^2; content-to-content scores and the weighted sum of values 4 L H; the
    disentangled terms (content-to-position and position-to-content scores against the
    2k relative embeddings) 2 * 2 * span * H; projecting the span relative embeddings
    through the query and key matrices, 2 * 2 * span * H^2 per sequence, spread over L.
    Backward is twice the forward. Recomputation under checkpointing is not counted.
    """
    per_layer = 24 * hidden**2 + 4 * length * hidden + 4 * span * hidden + 4 * span * hidden**2 / length
    return 3 * layers * per_layer


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_backbone(folder: Path, architecture: dict):
    from transformers import AutoModel, DebertaV2Config, DebertaV2Tokenizer

    AutoModel.from_config(DebertaV2Config(**architecture)).save_pretrained(folder)
    vocab = [("[PAD]", 0.0), ("[UNK]", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("[MASK]", 0.0), ("▁", -1.0)]
    tokenizer = DebertaV2Tokenizer(vocab=vocab)
    tokenizer.save_pretrained(folder)
    return tokenizer


def synthetic_fold(lengths: np.ndarray, rng: np.random.Generator) -> FoldData:
    ids = [[2] + rng.integers(10, 128000, size=n - 2).tolist() + [3] for n in lengths]
    targets = rng.uniform(1, 5, size=(len(ids), 6)).astype(np.float32)
    return FoldData(0, TextDataset(ids, targets), TextDataset(ids[:16], targets[:16]), [str(i) for i in range(16)],
                    np.arange(16), ("a", "b", "c", "d", "e", "f"), (1.0, 5.0))


def measure(name: str, overrides: list[str], lengths: np.ndarray, folder: Path, tokenizer, steps: int,
            profile: bool = False, config: Path = REPO / "configs" / "deberta_v3_base.yaml",
            architecture: dict = DEBERTA_V3_BASE) -> dict:
    cfg = load_config(config,
                      [f"model.name={folder}", "data.test_file=null", "awp.start_epoch=1",
                       "averaging.start_epoch=1", *overrides])
    rng = np.random.default_rng(0)
    cut = np.minimum(lengths, cfg.data.max_len)
    rows = rng.choice(cut, size=cfg.training.batch_size * (steps + 3))
    with tempfile.TemporaryDirectory() as out:
        if torch.cuda.is_available():
            left_over = torch.cuda.memory_allocated()   # 0 when the rows before were freed
        trainer = FoldTrainer(cfg, synthetic_fold(rows, rng), tokenizer, out).setup()
        trainer.model.train()           # as FoldTrainer.train() does: dropout and checkpointing act
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        batches = [trainer._to_device(b) for b in trainer.train_loader]
        real = padded = 0
        flops = 0.0
        started = None
        widths = {}
        for batch in batches:           # compile (flex) or tune (cuDNN) once per width, untimed
            widths.setdefault(batch["input_ids"].shape[1], batch)
        step = trainer.training_step          # forward, backward and the hooks (AWP acts from epoch 1 here)
        step.start_epoch(0)
        for batch in widths.values():
            step.forward_backward(batch)
            trainer._optimizer_step()
        for i, batch in enumerate(batches):
            if i == 3:                                  # three warm-up steps
                sync()
                started = time.perf_counter()
            if i >= 3:
                width = batch["input_ids"].shape[1]
                real += int(batch["attention_mask"].sum())
                padded += batch["input_ids"].numel()
                flops += batch["input_ids"].numel() * flops_per_token(
                    width, architecture["hidden_size"], architecture["num_hidden_layers"])
            step.forward_backward(batch)
            trainer._optimizer_step()
        sync()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        row = {"setting": name, "overrides": overrides, "steps": len(batches) - 3, "seconds": round(seconds, 2),
               "samples_per_s": round((len(batches) - 3) * cfg.training.batch_size / seconds, 1),
               "real_tokens_per_s": round(real / seconds), "padded_tokens_per_s": round(padded / seconds),
               "padding_share": round(1 - real / padded, 3),
               "model_tflops": round(flops / seconds / 1e12, 1),
               "mfu": round(flops / seconds / H100_BF16_PEAK, 3),
               "awp_active": cfg.awp.enabled, "peak_gib": round(peak / 2**30, 2),
               "left_over_gib": round(left_over / 2**30, 2) if torch.cuda.is_available() else 0.0}
        if profile and torch.cuda.is_available():
            row["top_kernels"] = profile_step(trainer, batches[-1])
            row["attention_forward_share"] = attention_share(trainer, batches[-1])
        print(json.dumps(row), flush=True)
        del trainer, batches, step
        # The trainer's hooks hold it in reference cycles: collect them now, or this row's
        # model and optimizer state would count in the next row's peak memory.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return row


def profile_step(trainer, batch) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        for _ in range(3):
            trainer.training_step.forward_backward(batch)
            trainer._optimizer_step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events if e.device_time_total > 0 and e.device_type.name == "CUDA")
    return [{"kernel": e.key[:90], "share": round(e.device_time_total / total, 3)} for e in events[:12]]


def attention_share(trainer, batch) -> float:
    """Share of the forward pass spent inside the self-attention modules (DeBERTa's
    disentangled ones under any attention path, BERT's)."""
    spans = []
    hooks = []
    for module in trainer.model.modules():
        if type(module).__name__.endswith("SelfAttention"):
            def pre(mod, args, kwargs=None):
                mod._start = torch.cuda.Event(enable_timing=True)
                mod._start.record()

            def post(mod, args, out):
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                spans.append((mod._start, end))

            hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    trainer.model.eval()
    with torch.no_grad(), trainer.precision.autocast():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        trainer.model(batch["input_ids"], batch["attention_mask"])
        end.record()
    torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    trainer.model.train()
    return round(sum(a.elapsed_time(b) for a, b in spans) / start.elapsed_time(end), 3)


PLAIN = ["model.reinit_layers=0", "model.freeze_embeddings=false", "model.freeze_layers=0",
         "model.gradient_checkpointing=false", "awp.enabled=false", "averaging.method=none", "data.max_len=1024",
         "model.attention=eager", "model.backbone_dropout=null"]
# The recipe as it was before the fused attention: transformers' attention, checkpointing.
RECIPE = ["data.max_len=1024", "model.attention=eager", "model.gradient_checkpointing=true",
          "model.backbone_dropout=null"]
# The fused attention has no attention dropout: each flex row sits beside its eager twin
# without dropout, so the difference is the kernel alone.
FLEX = ["model.attention=flex", "model.backbone_dropout=0.0"]
DFLASH = ["model.attention=dflash", "model.backbone_dropout=0.0"]
NO_DROPOUT = ["model.backbone_dropout=0.0"]
NO_CKPT = ["model.gradient_checkpointing=false"]
CKPT = ["model.gradient_checkpointing=true"]
BUCKET = ["training.bucket_batches=true"]
SETTINGS = {
    # throughput at the essays' lengths (cut at 1024), batch 8, bf16
    "plain": PLAIN,
    "plain+bucket": PLAIN + BUCKET,
    "plain+ckpt": PLAIN + CKPT,
    "recipe": RECIPE,
    "recipe+bucket": RECIPE + BUCKET,
    "plain+nodrop": PLAIN + NO_DROPOUT,
    "plain+flex": PLAIN + FLEX,
    "plain+flex+bucket": PLAIN + BUCKET + FLEX,
    "plain+dflash": PLAIN + DFLASH,
    "plain+dflash+bucket": PLAIN + BUCKET + DFLASH,
    "recipe-ckpt+dflash": RECIPE + NO_CKPT + DFLASH,
    "plain+ckpt+flex": PLAIN + CKPT + FLEX,
    "recipe+nodrop": RECIPE + NO_DROPOUT,
    "recipe+flex": RECIPE + FLEX,
    "recipe+flex+bucket": RECIPE + BUCKET + FLEX,
    "recipe-ckpt+flex": RECIPE + NO_CKPT + FLEX,
    "recipe-ckpt+flex+bucket": RECIPE + BUCKET + NO_CKPT + FLEX,
    # configs/deberta_v3_base.yaml as committed (at max_len 1024 here)
    "committed recipe": ["data.max_len=1024"],
}
# Memory: batch 8, every row as long as the width given.
MEMORY = {
    "full fine-tune, no checkpointing": (PLAIN, 1024),
    "full fine-tune, checkpointing": (PLAIN + CKPT, 1024),
    "recipe without checkpointing": (RECIPE + NO_CKPT, 1024),
    "recipe (checkpointing, frozen bottom, AWP, SWA)": (RECIPE, 1024),
    "recipe + 8-bit AdamW": (RECIPE + ["training.optimizer=adamw_8bit"], 1024),
    "recipe, batch 4 x accumulation 2": (RECIPE + ["training.batch_size=4",
                                                   "training.gradient_accumulation_steps=2"], 1024),
    "full fine-tune, no checkpointing, flex": (PLAIN + FLEX, 1024),
    "recipe, flex": (RECIPE + FLEX, 1024),
    "recipe without checkpointing, flex": (RECIPE + NO_CKPT + FLEX, 1024),
    "recipe without checkpointing, dflash": (RECIPE + NO_CKPT + DFLASH, 1024),
    "committed recipe at its max_len 1536": (["data.max_len=1536"], 1536),
    "committed recipe at its max_len 1536, batch 4 x accumulation 2": (
        ["data.max_len=1536", "training.batch_size=4", "training.gradient_accumulation_steps=2"], 1536),
}
# DeBERTa-v3-large (--size large --config configs/deberta_v3_large.yaml): the committed config
# at the essays' lengths, then its memory with every row as long as the width given.
LARGE = {
    "large: committed config at the essays' lengths (cut at 1024)": (["data.max_len=1024"], None),
    "large: committed config at 1024": (["data.max_len=1024"], 1024),
    "large: committed config at 1536": (["data.max_len=1536"], 1536),
    "large: 8-bit AdamW at 1024": (["data.max_len=1024", "training.optimizer=adamw_8bit"], 1024),
    "large: 8-bit AdamW at 1536": (["data.max_len=1536", "training.optimizer=adamw_8bit"], 1536),
    "large: without checkpointing at 1024": (["data.max_len=1024", "model.gradient_checkpointing=false"], 1024),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", required=True, help="token lengths of the real texts, one per line")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default=None, help="setting names separated by commas (no space after them)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", default="plain,plain+flex,plain+dflash",
                        help="the settings whose step is also profiled (names separated by commas)")
    parser.add_argument("--architecture", default=None, help="JSON of DebertaV2Config changes (a smoke test)")
    parser.add_argument("--size", choices=sorted(SIZES), default="base", help="the DeBERTa-v3 model's size")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "deberta_v3_base.yaml",
                        help="the config the settings' overrides apply to")
    args = parser.parse_args()
    architecture = {**DEBERTA_V3_BASE, **SIZES[args.size], **json.loads(args.architecture or "{}")}
    lengths = np.loadtxt(args.lengths, dtype=np.int64)
    # names hold ", " themselves: only a comma without a space after it separates them
    only = re.split(r",(?! )", args.only) if args.only else None
    profiled = re.split(r",(?! )", args.profile)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"deberta-v3-{args.size}-random"
        tokenizer = build_backbone(folder, architecture)
        common = dict(config=args.config, architecture=architecture)
        for name, overrides in SETTINGS.items():
            if only and name not in only:
                continue
            rows.append(measure(name, overrides, lengths, folder, tokenizer, args.steps,
                                profile=name in profiled, **common))
        for name, (overrides, width) in MEMORY.items():
            if only and "memory" not in only and name not in only:
                continue
            with contextlib.suppress(ImportError, ConfigError):   # no bitsandbytes, or no CUDA
                rows.append({"memory": True, **measure(name, overrides, np.full(len(lengths), width), folder,
                                                           tokenizer, 6, **common)})
        for name, (overrides, width) in LARGE.items():
            if only and "large" not in only and name not in only:
                continue
            rows_lengths = lengths if width is None else np.full(len(lengths), width)
            with contextlib.suppress(ImportError, ConfigError):   # no bitsandbytes, or no CUDA
                rows.append({"memory": width is not None, **measure(name, overrides, rows_lengths, folder, tokenizer,
                                                                    args.steps if width is None else 6, **common)})
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
