"""Prediction time against the attention heads kept, side by side in one process.

The same backbone shape (default all-MiniLM-L6-v2's: 6 layers x 12 heads) with a share of
each layer's heads removed (`prune_heads`, as a pruned checkpoint loads: its query, key
and value rows and its output-projection columns gone), predicting the same essays the
way infer.py does (foldtune's `predict`: batches sorted by length, dynamic padding, the
pooling head). Random weights: the time depends on the shapes only. Each repeat times
every share once, in turn, so that a slow moment of the machine hits them all; the
table shows each share's median over the repeats.

What it does not measure: loading a checkpoint and tokenizing (infer.py's whole process:
benchmarks/pruning_curve.py), and the heads a training run keeps, which need not be
spread evenly over the layers (the arithmetic is the same for the same number).

    python benchmarks/pruned_speed.py --model MINILM_FOLDER --test ../shared/data/ellipse/test.csv \\
        --shares 1.0,0.75,0.5,0.25 --repeats 3 --out pruned_speed.json

On a CPU the test runs it on a tiny random BERT with --tiny.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pruning_curve import TINY_ARCHITECTURE  # noqa: E402
from rows import Rows, parse_shares, tiny_defaults  # noqa: E402

TINY_JOB = dict(rows=12, max_len=64)


def pruned_model(backbone: Path, share: float, targets: int):
    """A TextRegressor of the backbone's shape in random weights, each layer keeping
    round(share x heads) heads (at least one): the first ones, the others removed."""
    from transformers import AutoConfig

    from foldtune.config import load_config
    from foldtune.models.head_gates import prune_heads
    from foldtune.models.regressor import TextRegressor

    config = AutoConfig.from_pretrained(str(backbone))
    cfg = load_config(None, [f"model.name={backbone}", "model.attention=eager"])
    torch.manual_seed(0)
    model = TextRegressor.from_backbone_config(config, cfg.model, targets, torch.device("cpu"))
    heads = config.num_attention_heads
    keep = max(1, round(share * heads))
    if keep < heads:
        prune_heads(model.backbone, {layer: list(range(keep, heads)) for layer in range(config.num_hidden_layers)})
    return model.eval(), keep * config.num_hidden_layers, config.num_hidden_layers * heads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path,
                        help="the backbone folder (its config and tokenizer; with --tiny, its tokenizer only)")
    parser.add_argument("--test", required=True, type=Path, help="the essays to predict (a CSV with full_text)")
    parser.add_argument("--shares", default="1.0,0.75,0.5,0.25", help="shares of each layer's heads kept")
    parser.add_argument("--rows", type=int, default=None, help="the first N essays (default all; --tiny 12)")
    parser.add_argument("--max-len", type=int, default=None, help="tokens per essay (default 512; --tiny 64)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny random BERT: a CPU smoke test")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    tiny_defaults(args, TINY_JOB)
    shares = parse_shares(args.shares, "--shares")

    import tempfile

    from transformers import AutoTokenizer, BertConfig

    from foldtune.data.dataset import TextDataset, encode_texts
    from foldtune.runtime.precision import resolve_precision
    from foldtune.runtime.predict import predict

    device = torch.device(args.device)
    precision = resolve_precision("auto", device)
    texts = pd.read_csv(args.test, dtype=str, keep_default_na=False)["full_text"].iloc[:args.rows].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        backbone = args.model
        tokenizer = AutoTokenizer.from_pretrained(str(args.model))
        if args.tiny:
            backbone = Path(tmp) / "tiny-bert"
            BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512,
                       **TINY_ARCHITECTURE).save_pretrained(backbone)
        dataset = TextDataset(encode_texts(tokenizer, texts, args.max_len or 512).input_ids)
        models = {share: pruned_model(backbone, share, 6) for share in shares}
    for model, _, _ in models.values():
        model.to(device)
    timings: dict[float, list[float]] = {share: [] for share in shares}
    for repeat in range(args.repeats + 1):          # the first round warms up, untimed
        for share, (model, _, _) in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            with torch.inference_mode():
                predict(model, dataset, args.batch_size, tokenizer.pad_token_id, device, precision)
            if repeat:
                timings[share].append(time.perf_counter() - started)
    results = Rows(args.out)
    base = statistics.median(timings[shares[0]])
    for share, (model, kept, total) in models.items():
        seconds = statistics.median(timings[share])
        results.keep({"share": share, "heads": kept, "of": total,
                      "parameters": sum(p.numel() for p in model.parameters()), "essays": len(dataset),
                      "seconds": timings[share], "median_s": seconds, "s_per_1000": 1000 * seconds / len(dataset),
                      f"vs_{shares[0]:g}": base / seconds})
    print(f"\n{args.device}, {torch.get_num_threads()} threads, batch {args.batch_size}, max_len "
          f"{args.max_len or 512}, {len(dataset)} essays, median of {args.repeats}")
    print(f"| heads kept | parameters | s per 1,000 essays | speed vs {shares[0]:g} |\n| --- | --- | --- | --- |")
    for row in results:
        print(f"| {row['heads']} of {row['of']} ({100 * row['share']:g}%) | {row['parameters']:,} | "
              f"{row['s_per_1000']:.2f} | {row[f'vs_{shares[0]:g}']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
