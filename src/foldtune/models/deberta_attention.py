"""DeBERTa-v2/v3's disentangled self-attention as one fused kernel (`model.attention: flex`).

transformers computes DeBERTa's attention scores unfused: the content-to-content
product, then two products against the relative-position embeddings (content-to-position
and position-to-content, B x H x L x 2k each), two `torch.gather`s that spread them to
B x H x L x L, sums, a mask, a softmax and a product with the values, each a kernel that
reads and writes an L x L tensor per head. At essay lengths that is most of a step.

Here the two position products stay B x H x L x 2k (2k = 512 buckets, not L) and the
lookup happens inside FlexAttention's kernel: the score of query i and key j is

    q_i.k_j / s  +  c2p[i, r(i-j)]  +  p2c[j, r(i-j)]

where r maps the distance i - j to its log bucket (DeBERTa's `relative_pos`, which only
depends on i - j, so a 1-D table of 2L - 1 entries holds it) and s = sqrt(d * 3). The
scores, the softmax and the value product never leave the chip; the backward pass
scatters into c2p and p2c the same way. The weights are DeBERTa's own: the switch swaps
the attention modules' class, and a checkpoint loads either way.

Padding costs no attention work: a block mask built from the padding mask (on the
device, once per forward pass, no host sync, so a CUDA graph can capture it) tells the
kernel which 128 x 128 tiles hold real queries and real keys, and it skips the rest,
forward and backward. At the essays' lengths, batches of 8 padded to a multiple of 64
hold about 40% padding, and about half of their tiles are skipped.

What it does not do: dropout on the attention probabilities (FlexAttention has none: the
switch needs `attention_probs_dropout_prob` 0) and returning attention maps. Padding
keys are masked; padding queries attend to the real tokens of one tile instead of
uniformly to all, which changes only the hidden states of padding positions, which
nothing reads.
"""

from __future__ import annotations

import functools
import math
import threading
import weakref

import torch
from torch import nn

# Compiled once per process (seconds of Triton compilation), shared by every model in it.
_compiled_flex = None

# On CPU FlexAttention has no fused kernel and no backward pass, so the swapped modules
# run transformers' own forward there (same weights, same result); tests set this to
# check the fused path's arithmetic on CPU.
FLEX_ON_CPU = False

# Triton compiles for compute capability 7.0 and newer. Training on an older GPU is
# refused at start-up; predicting there (a Kaggle P100 scoring a run trained elsewhere)
# takes transformers' forward instead.
MIN_CAPABILITY = (7, 0)


def fused_on(device: torch.device) -> bool:
    """Whether the swapped attention runs the fused kernel on this device."""
    if device.type != "cuda":
        return FLEX_ON_CPU
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


# Forward tiles of 64 queries x 64 keys: at 1,024 tokens the forward kernel takes 1.2 ms
# a layer instead of 2.7 ms with FlexAttention's default tiles (benchmarks/
# attention_kernels.py on an H100, and max-autotune picks the same); the backward keeps
# its defaults.
KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64}

# One compiled kernel per batch width (widths are rounded up to multiples of 64, so up
# to 24 of them at max_len 1536), so that no kernel has to mask partial tiles of a
# symbolic length.
MAX_WIDTHS = 64


def _flex_attention(device: torch.device):
    # FlexAttention without torch.compile runs a slow reference implementation that
    # materialises the scores (fine for the CPU tests, not for speed).
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        import torch._dynamo.config as dynamo_config

        for key in ("recompile_limit", "cache_size_limit"):     # renamed across torch versions
            if hasattr(dynamo_config, key):
                setattr(dynamo_config, key, max(getattr(dynamo_config, key), MAX_WIDTHS))
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


# The block mask's tile, queries x keys: a multiple of the kernels' own tiles (64 forward).
SPARSE_BLOCK = 128


def padding_block_mask(keep: torch.Tensor):
    """FlexAttention's BlockMask for a padding mask (keep: B x L, True on real tokens;
    foldtune pads at the end, but any pattern works): a query tile holding a real token
    visits the key tiles holding real tokens, those of real tokens only without evaluating
    the mask; a tile of padding queries visits only the first key tile with a real token
    (a finite output for positions nothing reads). Built with tensor operations alone: no
    host sync."""
    from torch.nn.attention.flex_attention import BlockMask

    batch, length = keep.shape
    tiles = -(-length // SPARSE_BLOCK)
    padded = torch.nn.functional.pad(keep, (0, tiles * SPARSE_BLOCK - length)).view(batch, tiles, SPARSE_BLOCK)
    some, only = padded.any(-1), padded.all(-1)                         # B x T: a real token; real tokens only
    real_query = some[:, :, None]                                       # B x T (queries) x 1
    whole = real_query & only[:, None, :]                               # B x T x T (keys)
    first = torch.arange(tiles, device=keep.device) == some.int().argmax(-1)[:, None]    # B x T
    part = (real_query & (some & ~only)[:, None, :]) | (~real_query & first[:, None, :])

    def listed(visit):          # counts and key-tile indices, the visited tiles first, in order
        order = torch.argsort((~visit).int(), dim=-1, stable=True)
        return visit.sum(-1, dtype=torch.int32)[:, None].contiguous(), order.int()[:, None].contiguous()

    def mask_mod(b, h, q, k):
        return keep[b, k]

    part_count, part_index = listed(part)
    whole_count, whole_index = listed(whole)
    return BlockMask.from_kv_blocks(part_count, part_index, whole_count, whole_index, BLOCK_SIZE=SPARSE_BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(length, length))


# The block mask of the forward pass under way, per thread (folds train in threads): every
# layer of a forward pass gets the same attention_mask tensor, and builds it once. DeBERTa's
# encoder makes that tensor anew in every forward pass, so a pass captured in a CUDA graph
# builds its block mask inside the capture, and each replay builds it again from its batch.
_last_mask = threading.local()


def _block_mask_for(attention_mask: torch.Tensor):
    source = getattr(_last_mask, "source", None)
    if source is None or source() is not attention_mask:
        # DeBERTa passes B x 1 x L x L (mask_i * mask_j), whose diagonal is the padding mask itself.
        batch, length = attention_mask.shape[0], attention_mask.shape[-1]
        keep = attention_mask.reshape(batch, -1, length, length)[:, 0].diagonal(dim1=-2, dim2=-1).bool()
        # a weak reference: the cache keeps no mask alive, a captured graph's memory neither
        _last_mask.source, _last_mask.block_mask = weakref.ref(attention_mask), padding_block_mask(keep)
    return _last_mask.block_mask


def forget_block_mask() -> None:
    """Drop this thread's cached block mask: after a CUDA graph's capture, whose memory pool
    holds it (the pool goes back to the device only once nothing holds its tensors)."""
    _last_mask.source = _last_mask.block_mask = None


def _distance_buckets(relative_pos: torch.Tensor, length: int) -> torch.Tensor:
    """DeBERTa's relative positions (1 x L x L, a function of i - j) as a table over
    i - j + L - 1, from -(L - 1) to L - 1."""
    rel = relative_pos.reshape(-1, length, length)[0]
    return torch.cat([rel[0, 1:].flip(0), rel[:, 0]])


@functools.cache
def _disentangled_class():
    # One subclass per process, built on first use (transformers' DeBERTa module is not
    # imported by runs that never ask for it).
    from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention

    class FlexDisentangledSelfAttention(DisentangledSelfAttention):
        """DisentangledSelfAttention whose forward is one FlexAttention call."""

        def forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
                    relative_pos=None, rel_embeddings=None):
            if output_attentions:
                raise ValueError("model.attention=flex does not return attention maps; "
                                 "use model.attention=eager to read them")
            if not fused_on(hidden_states.device):
                return super().forward(hidden_states, attention_mask, output_attentions, query_states,
                                       relative_pos, rel_embeddings)
            if query_states is None:
                query_states = hidden_states
            batch, length, _ = hidden_states.shape
            heads, width = self.num_attention_heads, self.attention_head_size

            def split(x):  # B x L x H*d -> B x H x L x d
                return x.view(batch, -1, heads, width).transpose(1, 2)

            query = split(self.query_proj(query_states))
            key = split(self.key_proj(hidden_states))
            value = split(self.value_proj(hidden_states))
            terms = 1 + ("c2p" in self.pos_att_type) + ("p2c" in self.pos_att_type)
            scale = 1.0 / math.sqrt(width * terms)
            # Padding keys get no attention: the block mask's tiles and mask say which are real.
            block_mask = _block_mask_for(attention_mask)
            if not self.relative_attention:
                score_mod = None
            else:
                if relative_pos is None:
                    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position
                    relative_pos = build_relative_position(query, key, bucket_size=self.position_buckets,
                                                           max_position=self.max_relative_positions)
                span = self.pos_ebd_size
                buckets = (_distance_buckets(relative_pos.to(query.device), length) + span).clamp(0, 2 * span - 1)
                rel = self.pos_dropout(rel_embeddings)[: 2 * span]
                # B x H x L x 2k: each query (key) against every relative-position embedding.
                zero = query.new_zeros(())
                c2p = p2c = None
                if "c2p" in self.pos_att_type:
                    pos_key = (self.key_proj if self.share_att_key else self.pos_key_proj)(rel)
                    c2p = query @ (pos_key.view(-1, heads, width).permute(1, 2, 0) * scale)
                if "p2c" in self.pos_att_type:
                    pos_query = (self.query_proj if self.share_att_key else self.pos_query_proj)(rel)
                    p2c = key @ (pos_query.view(-1, heads, width).permute(1, 2, 0) * scale)
                offset = length - 1

                def score_mod(score, b, h, i, j):
                    r = buckets[i - j + offset]
                    score = score + (c2p[b, h, i, r] if c2p is not None else zero)
                    return score + (p2c[b, h, j, r] if p2c is not None else zero)

            options = KERNEL_OPTIONS if query.is_cuda else None
            context = _flex_attention(query.device)(query, key, value, score_mod=score_mod, block_mask=block_mask,
                                                    scale=scale, kernel_options=options)
            return context.transpose(1, 2).reshape(batch, length, heads * width), None

    return DisentangledSelfAttention, FlexDisentangledSelfAttention


def use_flex(backbone: nn.Module) -> int:
    """Swap a DeBERTa-v2/v3 backbone's attention modules for the fused class; returns how
    many changed. Refuses any other backbone, and one with attention dropout, with a
    message that says what to set."""
    original, fused = _disentangled_class()
    modules = [m for m in backbone.modules() if type(m) in (original, fused)]     # twice: a no-op
    if not modules:
        raise ValueError(f"model.attention=flex fuses DeBERTa-v2/v3's disentangled attention, but "
                         f"{type(backbone).__name__} has none; use model.attention=eager")
    dropout = getattr(backbone.config, "attention_probs_dropout_prob", 0.0) or 0.0
    if dropout > 0:
        raise ValueError(f"model.attention=flex has no dropout on attention probabilities, but the backbone's "
                         f"attention_probs_dropout_prob is {dropout}; set model.backbone_dropout=0.0")
    for module in modules:
        module.__class__ = fused
    return len(modules)
