"""One layer of DeBERTa-v3-base's disentangled attention, forward and backward, in several
formulations: where the time of `model.attention` goes and what a fused kernel could gain.

    python benchmarks/attention_kernels.py --batch 8 --length 1024

Inputs are random bf16 tensors of DeBERTa-v3-base's shapes (12 heads of 64, 256 position
buckets: 512 relative embeddings). Each formulation computes the same attention output;
the script prints its time and its largest difference from the first (eager) one.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F


def log_buckets(length: int, buckets: int = 256, max_position: int = 512) -> torch.Tensor:
    """DeBERTa's relative position of query i and key j, as a table over i - j + L - 1."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    distance = torch.arange(-(length - 1), length)
    return make_log_bucket_position(distance, buckets, max_position).long()


def expand(table: torch.Tensor, length: int, span: int) -> torch.Tensor:
    i = torch.arange(length)
    return (table[(i[:, None] - i[None, :]) + length - 1] + span).clamp(0, 2 * span - 1)


def eager(q, k, v, pk, pq, idx, scale):
    # transformers' arithmetic: scores, two gathers of the position terms, mask-free softmax
    b, h, length, _ = q.shape
    scores = q @ k.transpose(-1, -2) * scale
    c2p = torch.gather(q @ pk.transpose(-1, -2) * scale, -1, idx.expand(b, h, length, length))
    # key j's position-to-content term for query i sits in row j at the bucket of i - j
    p2c = torch.gather(k @ pq.transpose(-1, -2) * scale, -1, idx.mT.expand(b, h, length, length)).transpose(-1, -2)
    return torch.softmax(scores + c2p + p2c, dim=-1) @ v


def dense_bias(q, k, pk, pq, idx, scale):
    b, h, length, _ = q.shape
    c2p = torch.gather(q @ pk.transpose(-1, -2) * scale, -1, idx.expand(b, h, length, length))
    p2c = torch.gather(k @ pq.transpose(-1, -2) * scale, -1, idx.mT.expand(b, h, length, length)).transpose(-1, -2)
    return c2p + p2c


def sdpa_bias(q, k, v, pk, pq, idx, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_bias(q, k, pk, pq, idx, scale), scale=scale)


def make_flex(compiled, kernel_options=None, detach=False, fp32_terms=False):
    def run(q, k, v, pk, pq, idx_row, scale):
        length = q.shape[2]
        c2p = q @ pk.transpose(-1, -2) * scale
        p2c = k @ pq.transpose(-1, -2) * scale
        if fp32_terms:      # the backward adds into these atomically: fp32 atomics are native
            c2p, p2c = c2p.float(), p2c.float()
        if detach:
            c2p, p2c = c2p.detach(), p2c.detach()
        offset = length - 1

        def score_mod(score, b, h, i, j):
            r = idx_row[i - j + offset]
            return score + c2p[b, h, i, r] + p2c[b, h, j, r]

        return compiled(q, k, v, score_mod=score_mod, scale=scale, kernel_options=kernel_options)
    return run


def make_flex_dense(compiled):
    def run(q, k, v, pk, pq, idx, scale):
        bias = dense_bias(q, k, pk, pq, idx, scale)

        def score_mod(score, b, h, i, j):
            return score + bias[b, h, i, j]

        return compiled(q, k, v, score_mod=score_mod, scale=scale)
    return run


def flash_no_bias(q, k, v, pk, pq, idx, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def timed(fn, args, grads, repeats):
    outs = []
    for phase in ("warm", "time"):
        torch.cuda.synchronize()
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        n = 2 if phase == "warm" else repeats
        fwd = bwd = 0.0
        for _ in range(n):
            for t in grads:
                t.grad = None
            start.record()
            out = fn(*args)
            mid.record()
            out.float().pow(2).sum().backward()
            end.record()
            torch.cuda.synchronize()
            fwd += start.elapsed_time(mid)
            bwd += mid.elapsed_time(end)
        outs = (out.detach().float(), fwd / n, bwd / n)
    return outs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--autotune", action="store_true", help="add flex compiled with max-autotune (slow)")
    args = parser.parse_args()
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    b, h, d, span, length = args.batch, 12, 64, 256, args.length
    dev = dict(device="cuda", dtype=torch.bfloat16)
    q, k, v = (torch.randn(b, h, length, d, **dev, requires_grad=True) for _ in range(3))
    pk, pq = (torch.randn(h, 2 * span, d, **dev, requires_grad=True) for _ in range(2))
    table = log_buckets(length)
    idx = expand(table, length, span).cuda()
    idx_row = (table + span).clamp(0, 2 * span - 1).cuda()
    scale = 1 / math.sqrt(3 * d)
    compiled = torch.compile(flex_attention, dynamic=False)
    variants = {
        "eager (transformers' arithmetic)": (eager, idx),
        "flex, position terms gathered in the kernel": (make_flex(compiled), idx_row),
        "flex, gathered in the kernel, BLOCK 64x64": (make_flex(compiled, {"BLOCK_M": 64, "BLOCK_N": 64}), idx_row),
        "flex, gathered, forward 64x64, backward 32x64/64x32": (make_flex(compiled, {
            "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}), idx_row),
        "flex, gathered, forward 64x64, backward 64x64": (make_flex(compiled, {
            "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64}), idx_row),
        "flex, gathered, forward 128x32": (make_flex(compiled, {"BLOCK_M": 128, "BLOCK_N": 32}), idx_row),
        "flex, fp32 position terms, forward 64x64": (make_flex(compiled, {"BLOCK_M": 64, "BLOCK_N": 64},
                                                               fp32_terms=True), idx_row),
        "flex, gathered, no gradient to position terms": (make_flex(compiled, detach=True), idx_row),
        "flex, dense bias read by the kernel": (make_flex_dense(compiled), idx),
        "sdpa (memory-efficient) + dense bias": (sdpa_bias, idx),
        "sdpa flash, no position terms (lower bound)": (flash_no_bias, idx),
    }
    if args.autotune:
        tuned = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
        variants["flex, gathered, max-autotune"] = (make_flex(tuned), idx_row)
    ref = None
    flops = 4 * b * h * length * length * d * 3      # QK^T and PV, forward + backward
    for name, (fn, index) in variants.items():
        try:
            out, fwd, bwd = timed(fn, (q, k, v, pk, pq, index, scale), (q, k, v, pk, pq), args.repeats)
        except Exception as err:                      # a formulation a torch build cannot run
            print(json.dumps({"variant": name, "error": str(err)[:300]}), flush=True)
            continue
        ref = out if ref is None else ref
        print(json.dumps({"variant": name, "forward_ms": round(fwd, 2), "backward_ms": round(bwd, 2),
                          "total_ms": round(fwd + bwd, 2),
                          "attention_tflops": round(flops / ((fwd + bwd) / 1e3) / 1e12, 1),
                          "max_diff_vs_eager": round(float((out - ref).abs().max()), 4),
                          "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)
        torch.cuda.reset_peak_memory_stats()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
