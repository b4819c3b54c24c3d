"""Attention-head gates (`pruning.heads`) and the removal of the heads they close.

Each head h of encoder layer l gets a hard-concrete gate z (Louizos, Welling and Kingma,
"Learning Sparse Neural Networks through L0 Regularization", 2018) with a learned
log_alpha, a temperature beta and the stretch limits gamma = -0.1, zeta = 1.1. In
training a gate is drawn as

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
    z = clamp(s * (zeta - gamma) + gamma, 0, 1),

so it is exactly 0 or 1 with a probability of its own, and differentiable in log_alpha
in between. The probability that a gate is not 0, summed over the heads, is the
expected number of open heads (the expected L0 norm):

    P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta)).

In evaluation the gate is deterministic: clamp(sigmoid(log_alpha) * (zeta - gamma) +
gamma, 0, 1). Once fixed (the end of a fold), it is a 0/1 mask.

A gate multiplies its head's context (the attention's output for that head, before the
output projection mixes the heads): a forward pre-hook on each layer's
`attention.output.dense` sees [..., heads * head_size], reshapes it to [..., heads,
head_size] and scales each head. That module runs in BERT-family models and in
DeBERTa-v2/v3 under transformers' attention and under model.attention flex (which
swaps the self-attention only); dflash replaces the encoder, and is refused.

A head whose gate is fixed at 0 contributes nothing, so `prune_heads` removes its rows
from the query, key and value projections (and DeBERTa's position projections) and
its columns from the output projection: the same outputs from a smaller model.
transformers 5 has no prune_heads of its own. Each pruned self-attention module keeps
the original indices of its removed heads (`pruned_heads`), which a checkpoint records
(`pruned_heads_structure`) and loading repeats on the freshly built model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from foldtune.config import ConfigError, HeadPruningConfig
from foldtune.models.surgery import encoder_layers

GAMMA, ZETA = -0.1, 1.1
# log_alpha at the start: sigmoid(3) * 1.2 - 0.1 = 1.04, so the deterministic gate is
# exactly 1 (it is from log_alpha 2.4 up) and switching the gates on changes nothing in
# evaluation; P(z != 0) is 0.99 at temperature 2/3.
INITIAL_LOG_ALPHA = 3.0
# u is kept this far from 0 and 1: log u and log(1 - u) stay finite.
UNIFORM_EPS = 1e-6

# The per-head projections of a self-attention module, by the names families give them:
# BERT's (and RoBERTa's, ELECTRA's...) and DeBERTa-v2's, whose relative-position
# projections (absent with share_att_key) are per head too.
HEAD_PROJECTIONS = ("query", "key", "value", "query_proj", "key_proj", "value_proj", "pos_key_proj",
                    "pos_query_proj")


def expected_l0(log_alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """P(z != 0) of each gate: sigmoid(log_alpha - beta * log(-gamma / zeta))."""
    return torch.sigmoid(log_alpha - beta * math.log(-GAMMA / ZETA))


def sample_gates(log_alpha: torch.Tensor, beta: float, u: torch.Tensor) -> torch.Tensor:
    """Hard-concrete gates drawn with the uniform noise u (same shape as log_alpha)."""
    u = u.clamp(UNIFORM_EPS, 1 - UNIFORM_EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def deterministic_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """The evaluation gate: clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def kept_heads(log_alpha: torch.Tensor, n_keep: int | None) -> torch.Tensor:
    """The 0/1 mask gates are fixed to: the n_keep heads of the largest log_alpha across
    all layers (ties to the lower index), or, with no target (None), those whose
    deterministic gate is above 0.5."""
    if n_keep is None:
        return (deterministic_gates(log_alpha) > 0.5).to(log_alpha.dtype)
    flat = log_alpha.detach().flatten()
    order = torch.sort(-flat, stable=True).indices[:n_keep]
    mask = torch.zeros_like(flat)
    mask[order] = 1.0
    return mask.view_as(log_alpha)


@dataclass
class AttentionParts:
    """One layer's self-attention module and its output projection."""

    attention: nn.Module
    output: nn.Linear

    @property
    def projections(self) -> list[str]:
        return [name for name in HEAD_PROJECTIONS if isinstance(getattr(self.attention, name, None), nn.Linear)]


def attention_parts(backbone: nn.Module) -> list[AttentionParts]:
    """Each encoder layer's (attention.self, attention.output.dense), bottom first; a
    backbone without them (not BERT-family, not DeBERTa-v2) is refused naming the fix."""
    parts = []
    for i, layer in enumerate(encoder_layers(backbone)):
        attention = getattr(getattr(layer, "attention", None), "self", None)
        output = getattr(getattr(getattr(layer, "attention", None), "output", None), "dense", None)
        if attention is None or not isinstance(output, nn.Linear) or not hasattr(attention, "num_attention_heads"):
            raise ConfigError(f"pruning.heads: layer {i} of {type(backbone).__name__} has no attention.self with "
                              "attention.output.dense (BERT-family and DeBERTa-v2/v3 have): set "
                              "pruning.heads.enabled=false", "pruning.heads.enabled")
        parts.append(AttentionParts(attention, output))
    return parts


class HeadGates(nn.Module):
    """One hard-concrete gate per head and layer, applied by hooks on the backbone.

    mode: "open" (no gates: before pruning.heads.start_epoch), "learn" (drawn in training,
    deterministic in evaluation) or "fixed" (the 0/1 `mask`). The gates of a forward pass
    are computed once, as the backbone starts (`_draw`): every layer, and a layer
    recomputed under gradient checkpointing, reads the same draw. `own_lr` puts log_alpha
    in an optimizer group of its own, without weight decay (optim/param_groups.py).
    """

    def __init__(self, n_layers: int, n_heads: int, temperature: float, lr: float):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((n_layers, n_heads), INITIAL_LOG_ALPHA))
        self.register_buffer("mask", torch.ones(n_layers, n_heads), persistent=False)
        self.beta = temperature
        self.own_lr = lr
        self.mode = "open"
        self._current: torch.Tensor | None = None
        self._handles: list = []

    @property
    def n_heads(self) -> int:
        return self.log_alpha.shape[1]

    def install(self, backbone: nn.Module) -> "HeadGates":
        parts = attention_parts(backbone)
        self._handles.append(backbone.register_forward_pre_hook(self._draw))
        for layer, part in enumerate(parts):
            self._handles.append(part.output.register_forward_pre_hook(self._gate_hook(layer)))
        return self

    def remove(self) -> None:
        """Take the hooks off the backbone (the gates act no more)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._current = None

    def gates(self) -> torch.Tensor | None:
        """The gates of the next forward pass as the mode and train/eval say; None: open."""
        if self.mode == "open":
            return None
        if self.mode == "fixed":
            return self.mask
        if self.training:
            return sample_gates(self.log_alpha, self.beta, torch.rand_like(self.log_alpha))
        return deterministic_gates(self.log_alpha)

    def expected_open(self) -> torch.Tensor:
        """The expected number of open heads (a differentiable scalar)."""
        return expected_l0(self.log_alpha, self.beta).sum()

    def fix(self, mask: torch.Tensor) -> None:
        with torch.no_grad():
            self.mask.copy_(mask)
        self.mode = "fixed"

    def _draw(self, module, args) -> None:
        self._current = self.gates()

    def _gate_hook(self, layer: int):
        def gate(module, args):
            gates = self._current
            if gates is None:
                return None
            x, *rest = args
            heads = x.unflatten(-1, (self.n_heads, -1)) * gates[layer].to(x.dtype).unsqueeze(-1)
            return (heads.flatten(-2), *rest)
        return gate


def attach_head_gates(model: nn.Module, cfg: HeadPruningConfig) -> HeadGates | None:
    """Install gates on model.backbone as `model.head_gates` (None, nothing done, when
    pruning.heads is off). Before the optimizer is built: log_alpha needs its group."""
    if not cfg.enabled:
        return None
    config = model.backbone.config
    n_layers, n_heads = len(encoder_layers(model.backbone)), config.num_attention_heads
    total = n_layers * n_heads
    if cfg.target_heads is not None and cfg.target_heads > total:
        raise ConfigError(f"pruning.heads.target_heads: {cfg.target_heads} is more heads than the backbone has "
                          f"({n_layers} layers x {n_heads} heads = {total})", "pruning.heads.target_heads")
    gates = HeadGates(n_layers, n_heads, cfg.temperature, cfg.lr)
    model.head_gates = gates.install(model.backbone)
    return gates


def target_heads(cfg: HeadPruningConfig, total: int) -> int | None:
    """How many heads a target keeps (None: no target). target_sparsity is the share
    removed; at least one head stays."""
    if cfg.target_heads is not None:
        return cfg.target_heads
    if cfg.target_sparsity is not None:
        return max(1, round((1 - cfg.target_sparsity) * total))
    return None


# --- removing heads ---------------------------------------------------------------


def _kept(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of `linear` keeping the `index` entries of its outputs (dim 0: weight rows and
    bias) or of its inputs (dim 1: weight columns, the whole bias)."""
    weight = linear.weight.index_select(dim, index)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias[index] if dim == 0 else linear.bias)
    return new


def prune_heads(backbone: nn.Module, pruned: dict[int, list[int]]) -> None:
    """Remove heads, in place: {layer index: original head indices to remove}.

    Every layer keeps at least one head: transformers' reshapes infer the head count and
    cannot take none. A layer asked to lose all of them keeps its first head, whose
    columns of the output projection are zeroed, so that the layer adds only the
    projection's bias, as with every gate at 0; that head is not in `pruned_heads`.
    """
    parts = attention_parts(backbone)
    for layer, heads in pruned.items():
        part = parts[int(layer)]
        attention = part.attention
        n_heads, size = attention.num_attention_heads, attention.attention_head_size
        original = list(getattr(attention, "original_heads", range(n_heads)))
        remove = {original.index(h) for h in heads if h in original}
        silence = len(remove) == n_heads
        if silence:
            remove.discard(0)
        keep = [i for i in range(n_heads) if i not in remove]
        if remove:
            rows = torch.cat([torch.arange(i * size, (i + 1) * size) for i in keep])
            for name in part.projections:
                setattr(attention, name, _kept(getattr(attention, name), rows, 0))
            part.output = _kept(part.output, rows, 1)
            encoder_layers(backbone)[int(layer)].attention.output.dense = part.output
            attention.num_attention_heads = len(keep)
            attention.all_head_size = len(keep) * size
            attention.original_heads = [original[i] for i in keep]
            attention.pruned_heads = sorted(set(getattr(attention, "pruned_heads", [])) |
                                            {original[i] for i in remove})
        if silence:
            with torch.no_grad():
                part.output.weight[:, :size].zero_()


def pruned_heads_structure(backbone: nn.Module) -> dict[str, list[int]]:
    """{layer index: removed original heads} of a backbone ({} if none): what a checkpoint
    records so that loading removes the same heads. Read from the modules, so a layer
    dropped or moved later (compress's keep_layers) is recorded where it is now."""
    try:
        layers = encoder_layers(backbone)
    except ValueError:
        return {}
    found = {}
    for i, layer in enumerate(layers):
        # read from the module itself: a compressed model's projections are factorised
        heads = getattr(getattr(getattr(layer, "attention", None), "self", None), "pruned_heads", None)
        if heads:
            found[str(i)] = list(heads)
    return found


def restore_pruned_heads(backbone: nn.Module, structure: dict | None) -> None:
    """Remove the heads a checkpoint records (pruned_heads_structure) from a fresh backbone."""
    if structure:
        prune_heads(backbone, {int(layer): heads for layer, heads in structure.items()})
