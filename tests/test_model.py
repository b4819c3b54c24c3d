import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from foldtune.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from foldtune.config import Config, TrainingConfig
from foldtune.data.collate import DynamicPadding
from foldtune.models.regressor import TextRegressor
from foldtune.optim.factory import build_optimizer
from foldtune.optim.param_groups import decay_groups

MEANS = np.array([3.0, 2.5, 3.5])


def _batch(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer("the students play on a team")["input_ids"], tokenizer("reading books")["input_ids"]]
    return DynamicPadding(tokenizer.pad_token_id)([{"input_ids": i} for i in ids]), tokenizer


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_deberta"])
def test_head_starts_at_the_target_means_and_outputs_one_value_per_target(backbone, request):
    folder = request.getfixturevalue(backbone)
    torch.manual_seed(0)
    model = TextRegressor.from_pretrained(str(folder), "mean", 3, MEANS)
    assert model.head.bias.tolist() == MEANS.tolist()
    with torch.no_grad():
        model.head.weight.zero_()
    batch, _ = _batch(folder)
    out = model(batch["input_ids"], batch["attention_mask"])
    assert out.shape == (2, 3) and out.dtype == torch.float32
    assert torch.equal(out, torch.tensor(np.stack([MEANS, MEANS]), dtype=torch.float32))


def test_bert_pooler_is_dropped(tiny_bert):
    model = TextRegressor.from_pretrained(str(tiny_bert), "mean", 3)
    assert model.backbone.pooler is None
    assert not any(name.startswith("backbone.pooler") for name, _ in model.named_parameters())


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_deberta"])
def test_checkpoint_round_trip_gives_identical_predictions(backbone, request, tmp_path):
    folder = request.getfixturevalue(backbone)
    torch.manual_seed(1)
    model = TextRegressor.from_pretrained(str(folder), "mean", 3, MEANS).eval()
    batch, tokenizer = _batch(folder)
    meta = {"pooling": "mean", "target_columns": ["a", "b", "c"], "fold": 0}
    save_checkpoint(tmp_path / "best", model, tokenizer, Config(), meta)
    assert {p.name for p in (tmp_path / "best").iterdir()} >= {
        "model.safetensors", "config.json", "tokenizer.json", "foldtune.yaml", "foldtune.json"}
    loaded, loaded_meta = load_checkpoint(tmp_path / "best")
    assert loaded_meta == meta
    with torch.no_grad():
        assert torch.equal(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}),
                           loaded(**{k: batch[k] for k in ("input_ids", "attention_mask")}))


def test_damaged_weights_name_the_file(tiny_bert, tmp_path):
    model = TextRegressor.from_pretrained(str(tiny_bert), "mean", 2)
    _, tokenizer = _batch(tiny_bert)
    save_checkpoint(tmp_path / "best", model, tokenizer, Config(), {"pooling": "mean", "target_columns": ["a", "b"]})
    weights = tmp_path / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors cannot be read .* retrain this fold"):
        load_checkpoint(tmp_path / "best")


def test_parameter_groups_decay_only_matrices_and_give_the_head_its_lr(tiny_bert):
    model = TextRegressor.from_pretrained(str(tiny_bert), "mean", 3)
    groups = decay_groups(model, lr=2e-5, head_lr=1e-3, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("backbone", 2e-5, 0.01), ("backbone_no_decay", 2e-5, 0.0), ("head", 1e-3, 0.01), ("head_no_decay", 1e-3, 0.0)]
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in by_name["backbone_no_decay"]["params"]}
    assert "backbone.embeddings.LayerNorm.weight" in no_decay
    assert "backbone.encoder.layer.0.attention.self.query.bias" in no_decay
    assert all(n.endswith("bias") or "LayerNorm" in n for n in no_decay)
    decay = {names[id(p)] for p in by_name["backbone"]["params"]}
    assert "backbone.encoder.layer.1.intermediate.dense.weight" in decay
    assert {names[id(p)] for p in by_name["head"]["params"]} == {"head.weight"}
    assert {names[id(p)] for p in by_name["head_no_decay"]["params"]} == {"head.bias"}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_optimizer_uses_the_groups(tiny_bert):
    model = TextRegressor.from_pretrained(str(tiny_bert), "mean", 3)
    opt = build_optimizer(model, TrainingConfig(lr=3e-5, head_lr=None, adam_eps=1e-6), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["lr"] for g in opt.param_groups} == {3e-5}
    assert opt.defaults["eps"] == 1e-6
