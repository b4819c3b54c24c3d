"""Parameter groups: weight decay only on matrices; layer-wise LR decay by depth."""

import pytest
import torch

from foldtune.config import ConfigError, ModelConfig, TrainingConfig
from foldtune.models.regressor import TextRegressor
from foldtune.optim.factory import build_optimizer
from foldtune.optim.param_groups import parameter_groups


def _model(folder, **kw):
    return TextRegressor.from_pretrained(ModelConfig(name=str(folder), **kw), 3)


def _names(model, group):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in group["params"]}


def test_without_llrd_backbone_and_head_each_split_by_decay(tiny_bert):
    model = _model(tiny_bert)
    groups = parameter_groups(model, TrainingConfig(lr=2e-5, head_lr=1e-3, weight_decay=0.01))
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("backbone", 2e-5, 0.01), ("backbone_no_decay", 2e-5, 0.0), ("head", 1e-3, 0.01), ("head_no_decay", 1e-3, 0.0)]
    no_decay = _names(model, groups[1])
    assert "backbone.embeddings.LayerNorm.weight" in no_decay
    assert "backbone.encoder.layer.0.attention.self.query.bias" in no_decay
    assert all(n.endswith("bias") or "LayerNorm" in n for n in no_decay)
    assert "backbone.encoder.layer.1.intermediate.dense.weight" in _names(model, groups[0])
    assert _names(model, groups[2]) == {"head.linear.weight"}
    assert _names(model, groups[3]) == {"head.linear.bias"}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# (group name, lr, weight decay) with lr 1e-4, decay 0.5, head lr 1e-3, weight decay 0.01, two layers
LLRD_GROUPS = [
    ("embeddings", 2.5e-5, 0.01), ("embeddings_no_decay", 2.5e-5, 0.0),
    ("layer_0", 5e-5, 0.01), ("layer_0_no_decay", 5e-5, 0.0),
    ("layer_1", 1e-4, 0.01), ("layer_1_no_decay", 1e-4, 0.0),
    ("head", 1e-3, 0.01), ("head_no_decay", 1e-3, 0.0),
]
LLRD = TrainingConfig(lr=1e-4, head_lr=1e-3, layerwise_lr_decay=0.5, weight_decay=0.01)


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_deberta"])
def test_layerwise_lr_decay_groups_exact(backbone, request):
    model = _model(request.getfixturevalue(backbone), pooling="attention")
    groups = parameter_groups(model, LLRD)
    assert [(g["name"], pytest.approx(g["lr"]), g["weight_decay"]) for g in groups] == LLRD_GROUPS
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    by_name = {g["name"]: _names(model, g) for g in groups}
    assert all(".layer.0." in n for n in by_name["layer_0"] | by_name["layer_0_no_decay"])
    assert all(".layer.1." in n for n in by_name["layer_1"] | by_name["layer_1_no_decay"])
    assert "backbone.embeddings.word_embeddings.weight" in by_name["embeddings"]
    # the pooling's weights learn with the head
    assert by_name["head"] == {"head.linear.weight", "pooling.score.0.weight", "pooling.score.2.weight"}
    if backbone == "tiny_deberta":
        # DeBERTa's relative position embeddings sit outside the layers: they go with the embeddings
        assert "backbone.encoder.rel_embeddings.weight" in by_name["embeddings"]
        assert "backbone.encoder.LayerNorm.weight" in by_name["embeddings_no_decay"]


def test_frozen_parameters_are_left_out(tiny_deberta):
    model = _model(tiny_deberta, freeze_embeddings=True, freeze_layers=1)
    names = [g["name"] for g in parameter_groups(model, LLRD)]
    assert names == ["layer_1", "layer_1_no_decay", "head", "head_no_decay"]


def test_optimizer_receives_the_groups(tiny_bert):
    model = _model(tiny_bert)
    opt = build_optimizer(model, TrainingConfig(lr=3e-5, layerwise_lr_decay=0.9, adam_eps=1e-6),
                          torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups if g["name"] == "layer_0"] == [pytest.approx(2.7e-5)]
    assert opt.defaults["eps"] == 1e-6


def test_madgrad_and_the_8bit_optimizer_on_cpu(tiny_bert):
    model = _model(tiny_bert)
    opt = build_optimizer(model, TrainingConfig(optimizer="madgrad", lr=1e-3), torch.device("cpu"))
    assert type(opt).__name__ == "MADGRAD"
    with pytest.raises(ConfigError, match="training.optimizer 'adamw_8bit' runs on a CUDA GPU only"):
        build_optimizer(model, TrainingConfig(optimizer="adamw_8bit"), torch.device("cpu"))
