import hashlib

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from foldtune.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from foldtune.config import Config, ModelConfig, TrainingConfig
from foldtune.data.collate import DynamicPadding
from foldtune.models.regressor import TextRegressor
from foldtune.optim.factory import build_optimizer

MEANS = np.array([3.0, 2.5, 3.5])


def _batch(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer("the students play on a team")["input_ids"], tokenizer("reading books")["input_ids"]]
    return DynamicPadding(tokenizer.pad_token_id)([{"input_ids": i} for i in ids]), tokenizer


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_deberta"])
def test_head_starts_at_the_target_means_and_outputs_one_value_per_target(backbone, request):
    folder = request.getfixturevalue(backbone)
    torch.manual_seed(0)
    model = TextRegressor.from_pretrained(ModelConfig(name=str(folder)), 3, MEANS)
    assert model.head.linear.bias.tolist() == MEANS.tolist()
    with torch.no_grad():
        model.head.linear.weight.zero_()
    batch, _ = _batch(folder)
    out = model(batch["input_ids"], batch["attention_mask"])
    assert out.shape == (2, 3) and out.dtype == torch.float32
    assert torch.equal(out, torch.tensor(np.stack([MEANS, MEANS]), dtype=torch.float32))


def test_bert_pooler_is_dropped(tiny_bert):
    model = TextRegressor.from_pretrained(ModelConfig(name=str(tiny_bert)), 3)
    assert model.backbone.pooler is None
    assert not any(name.startswith("backbone.pooler") for name, _ in model.named_parameters())


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_deberta"])
def test_checkpoint_round_trip_gives_identical_predictions(backbone, request, tmp_path):
    folder = request.getfixturevalue(backbone)
    torch.manual_seed(1)
    model = TextRegressor.from_pretrained(ModelConfig(name=str(folder)), 3, MEANS).eval()
    batch, tokenizer = _batch(folder)
    meta = {"pooling": "mean", "target_columns": ["a", "b", "c"], "fold": 0}
    save_checkpoint(tmp_path / "best", model, tokenizer, Config(), meta)
    assert {p.name for p in (tmp_path / "best").iterdir()} >= {
        "model.safetensors", "config.json", "tokenizer.json", "foldtune.yaml", "foldtune.json"}
    loaded, loaded_meta = load_checkpoint(tmp_path / "best")
    weights = tmp_path / "best" / "model.safetensors"
    assert loaded_meta == {**meta, "files": {"model.safetensors": {
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "bytes": weights.stat().st_size}}}
    with torch.no_grad():
        assert torch.equal(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}),
                           loaded(**{k: batch[k] for k in ("input_ids", "attention_mask")}))


def test_damaged_weights_name_the_file(tiny_bert, tmp_path):
    model = TextRegressor.from_pretrained(ModelConfig(name=str(tiny_bert)), 2)
    _, tokenizer = _batch(tiny_bert)
    save_checkpoint(tmp_path / "best", model, tokenizer, Config(), {"pooling": "mean", "target_columns": ["a", "b"]})
    weights = tmp_path / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors cannot be read .* retrain this fold"):
        load_checkpoint(tmp_path / "best")


def test_optimizer_uses_the_groups(tiny_bert):
    model = TextRegressor.from_pretrained(ModelConfig(name=str(tiny_bert)), 3)
    opt = build_optimizer(model, TrainingConfig(lr=3e-5, head_lr=None, adam_eps=1e-6), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["lr"] for g in opt.param_groups} == {3e-5}
    assert opt.defaults["eps"] == 1e-6
