"""Make a trained regressor smaller: fewer encoder layers, or low-rank (SVD) factors of
its word embeddings and of the linear layers of its encoder.

Low rank. A weight W (out x in) with singular values s1 >= s2 >= ... is replaced by
the product of its best rank-r approximation's two factors (Eckart-Young: no rank-r
matrix is closer in Frobenius norm; the error is the norm of the discarded singular
values):

    Linear(in, out)          ->  Linear(in, r, bias=False), then Linear(r, out) with W's bias
    Embedding(vocab, hidden) ->  Embedding(vocab, r), then Linear(r, hidden, bias=False)

Each factor takes sqrt(s) of the singular values, so both have the same scale (what a
short fine-tune afterwards wants). A layer is factorised only where that is smaller:
r * (in + out) < in * out. The linear layers are found generically, as every
`nn.Linear` inside the encoder layers (the same layer map as surgery.py), so BERT,
MiniLM and DeBERTa-v2 need no names; the pooling and the head are left as they are.

Fewer layers. `keep_layers` keeps a chosen subset of the encoder layers, with their
trained weights, in their order, and sets config.num_hidden_layers to match, so the
smaller backbone is saved and built again from its config.json.

Saving and loading. A checkpoint's foldtune.json records the factorised modules and
their ranks (`low_rank_structure`, written by checkpoint.py); loading builds the
backbone from config.json, replaces those modules with empty factorised ones of the
same ranks (`restore_low_rank_structure`), then reads the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from foldtune.models.surgery import encoder_layers


class LowRankLinear(nn.Module):
    """y = up(down(x)): a linear layer of rank r, with r * (in + out) weights instead of in * out."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankEmbedding(nn.Module):
    """A lookup of r numbers per token, projected to the hidden size: r * (vocab + hidden)
    weights instead of vocab * hidden."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None):
        super().__init__()
        self.embed = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx)
        self.project = nn.Linear(rank, embedding_dim, bias=False)

    @property
    def num_embeddings(self) -> int:
        return self.embed.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.project.out_features

    @property
    def rank(self) -> int:
        return self.embed.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.embed.padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.project(self.embed(input_ids))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with left @ right the best rank-`rank` approximation of `weight`
    (rows x cols): left is rows x rank, right rank x cols, each holding sqrt of the kept
    singular values. Computed in float64, returned in the weight's dtype."""
    full = min(weight.shape)
    if not 1 <= rank <= full:
        raise ValueError(f"rank {rank} is outside 1..{full}, the full rank of a {tuple(weight.shape)} matrix")
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    left = u[:, :rank] * root
    right = root[:, None] * vh[:rank]
    return left.to(weight.dtype), right.to(weight.dtype)


@torch.no_grad()
def factorise_linear(linear: nn.Linear, rank: int) -> LowRankLinear:
    """The rank-`rank` SVD factors of a linear layer, its bias kept on the second factor."""
    left, right = svd_factors(linear.weight, rank)
    out = LowRankLinear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
    out.to(device=linear.weight.device, dtype=linear.weight.dtype)
    out.down.weight.copy_(right)
    out.up.weight.copy_(left)
    if linear.bias is not None:
        out.up.bias.copy_(linear.bias)
    return out


@torch.no_grad()
def factorise_embedding(embedding: nn.Embedding, rank: int) -> LowRankEmbedding:
    """The rank-`rank` SVD factors of an embedding table (vocab x hidden)."""
    left, right = svd_factors(embedding.weight, rank)
    out = LowRankEmbedding(embedding.num_embeddings, embedding.embedding_dim, rank, embedding.padding_idx)
    out.to(device=embedding.weight.device, dtype=embedding.weight.dtype)
    out.embed.weight.copy_(left)
    out.project.weight.copy_(right.T)
    return out


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _word_embedding_name(backbone: nn.Module) -> str:
    table = backbone.get_input_embeddings()
    for name, module in backbone.named_modules():
        if module is table:
            return name
    raise ValueError(f"cannot find the word embeddings of {type(backbone).__name__}")


def encoder_linear_names(backbone: nn.Module) -> list[str]:
    """The names (relative to the backbone) of every nn.Linear inside its encoder layers,
    the factors of already factorised layers left out."""
    inside = {id(m) for layer in encoder_layers(backbone) for m in layer.modules()}
    factors = {id(m) for m in backbone.modules() if isinstance(m, LowRankLinear) for m in (m.down, m.up)}
    return [name for name, m in backbone.named_modules()
            if isinstance(m, nn.Linear) and id(m) in inside and id(m) not in factors]


def _rank_for(shape: tuple[int, int], rank: int | None, rank_fraction: float | None, what: str) -> int:
    full = min(shape)
    if rank is None:
        return max(1, round(rank_fraction * full))
    if rank > full:
        raise ValueError(f"rank {rank} is larger than the full rank {full} of {what} {shape}: "
                         f"choose a rank of at most {full}")
    return rank


def low_rank(model: nn.Module, rank: int | None = None, rank_fraction: float | None = None,
             embedding: bool = True, linear: bool = True, only_if_smaller: bool = True) -> dict:
    """Factorise, in place, the word embeddings and the encoder's linear layers of
    `model.backbone` at `rank` (or at `rank_fraction` of each matrix's full rank).

    only_if_smaller (the default) leaves a matrix whole where its factors would hold as
    many weights or more. Returns what happened: {"embedding": rank or None,
    "linear": {name: rank}, "skipped": [names left whole]}.
    """
    if (rank is None) == (rank_fraction is None):
        raise ValueError("give either a rank or a rank fraction, not both or neither")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank_fraction is not None and not 0 < rank_fraction <= 1:
        raise ValueError(f"rank fraction must be in (0, 1], got {rank_fraction!r}")
    if not embedding and not linear:
        raise ValueError("nothing to factorise: both the embeddings and the linear layers are left out")
    backbone = model.backbone
    done = {"embedding": None, "linear": {}, "skipped": []}
    candidates = []
    if embedding:
        name = _word_embedding_name(backbone)
        table = backbone.get_submodule(name)
        if not isinstance(table, nn.Embedding):
            raise ValueError(f"the word embeddings {name} are a {type(table).__name__}, already factorised or "
                             "not an nn.Embedding")
        candidates.append((name, table, tuple(table.weight.shape)))
    if linear:
        candidates += [(n, backbone.get_submodule(n), tuple(backbone.get_submodule(n).weight.shape))
                       for n in encoder_linear_names(backbone)]
    # every rank is checked before any module changes: a bad rank leaves the model whole
    ranks = [_rank_for(shape, rank, rank_fraction, name) for name, _, shape in candidates]
    for (name, module, (rows, cols)), r in zip(candidates, ranks):
        if only_if_smaller and r * (rows + cols) >= rows * cols:
            done["skipped"].append(name)
            continue
        if isinstance(module, nn.Embedding):
            _set_submodule(backbone, name, factorise_embedding(module, r))
            done["embedding"] = r
        else:
            _set_submodule(backbone, name, factorise_linear(module, r))
            done["linear"][name] = r
    return done


def low_rank_structure(backbone: nn.Module) -> dict:
    """{module name: [kind, rank]} of the factorised modules of a backbone ({} if none):
    what a checkpoint records so that loading can rebuild the same modules."""
    found = {}
    for name, module in backbone.named_modules():
        if isinstance(module, LowRankLinear):
            found[name] = ["linear", module.rank]
        elif isinstance(module, LowRankEmbedding):
            found[name] = ["embedding", module.rank]
    return found


def restore_low_rank_structure(backbone: nn.Module, structure: dict | None) -> None:
    """Replace the modules named in `structure` (see low_rank_structure) with empty
    factorised modules of the recorded ranks, ready for the checkpoint's weights."""
    for name, (kind, rank) in (structure or {}).items():
        try:
            module = backbone.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint factorises {name}, which this backbone does not have") from None
        if kind == "linear" and isinstance(module, nn.Linear):
            new = LowRankLinear(module.in_features, module.out_features, rank, bias=module.bias is not None)
        elif kind == "embedding" and isinstance(module, nn.Embedding):
            new = LowRankEmbedding(module.num_embeddings, module.embedding_dim, rank, module.padding_idx)
        else:
            raise ValueError(f"the checkpoint factorises {name} as a {kind}, the backbone has a "
                             f"{type(module).__name__} there")
        _set_submodule(backbone, name, new.to(next(module.parameters()).device))


def parse_layers(text: str) -> list[int]:
    """'0,2,4' -> [0, 2, 4]; anything else fails saying what was expected."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"layers '{text}': expected layer indices separated by commas, e.g. 0,2,4") from None


def keep_layers(model: nn.Module, indices) -> list[int]:
    """Keep only the encoder layers `indices` (0 is the bottom) of `model.backbone`, in
    place, in their order, with their weights; config.num_hidden_layers follows.
    Returns the kept indices, sorted."""
    backbone = model.backbone
    layers = encoder_layers(backbone)
    n = len(layers)
    indices = list(indices)
    if not indices:
        raise ValueError(f"keep at least one layer (the backbone has {n}: 0..{n - 1})")
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} are out of range: the backbone has {n} layers, 0..{n - 1}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"layer indices {indices} repeat a layer; give each at most once")
    kept = sorted(indices)
    pooling = getattr(model, "pooling", None)
    if getattr(pooling, "needs_all_hidden_states", False) and getattr(pooling, "k", 0) > len(kept):
        raise ValueError(f"the pooling reads the last {pooling.k} layers (model.pooling_layers); "
                         f"keep at least {pooling.k}, not {len(kept)}")
    new = nn.ModuleList([layers[i] for i in kept])
    for position, layer in enumerate(new):
        # BERT's attention keeps its index for a key/value cache; give it the new position
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    parent = next(name for name, m in backbone.named_modules() if m is layers)
    _set_submodule(backbone, parent, new)
    backbone.config.num_hidden_layers = len(kept)
    return kept



def compress(model: nn.Module, keep: list[int] | None = None, rank: int | None = None,
             rank_fraction: float | None = None, embedding: bool = True, linear: bool = True) -> dict:
    """Keep the layers `keep` (None: all), then factorise at `rank` or `rank_fraction`
    (neither: no factorisation); in place. Returns what was done, for foldtune.json."""
    if keep is None and rank is None and rank_fraction is None:
        raise ValueError("nothing to compress: give layers to keep, a rank or a rank fraction")
    n_layers = len(encoder_layers(model.backbone))
    before = count_parameters(model)
    kept = keep_layers(model, keep) if keep is not None else list(range(n_layers))
    factorised = {"embedding": None, "linear": {}, "skipped": []}
    if rank is not None or rank_fraction is not None:
        factorised = low_rank(model, rank, rank_fraction, embedding, linear)
    return {"kept_layers": kept, "of_layers": n_layers, "rank": rank, "rank_fraction": rank_fraction,
            "embedding_rank": factorised["embedding"], "linear_factorised": len(factorised["linear"]),
            "left_whole": factorised["skipped"], "parameters_before": before,
            "parameters_after": count_parameters(model)}
