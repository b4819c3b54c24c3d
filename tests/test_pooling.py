import pytest
import torch

from foldtune.config import ConfigError, ModelConfig
from foldtune.models.pooling import MeanPooling, build_pooling


def test_mean_pooling_ignores_padding_and_survives_an_empty_row():
    hidden = torch.tensor([
        [[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],   # last position is padding
        [[5.0, 7.0], [-5.0, 1.0], [3.0, 1.0]],      # no padding
        [[9.0, 9.0], [9.0, 9.0], [9.0, 9.0]],       # fully padded
    ])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    pooled = MeanPooling(2, ModelConfig())(hidden, mask)
    assert torch.equal(pooled, torch.tensor([[2.0, 3.0], [1.0, 3.0], [0.0, 0.0]]))


def test_mean_pooling_reads_no_padded_position():
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    changed = hidden.clone()
    changed[mask == 0] = 1e6
    pool = MeanPooling(4, ModelConfig())
    assert torch.equal(pool(hidden, mask), pool(changed, mask))


def test_mean_pooling_returns_float32_under_bf16_states():
    hidden = torch.randn(2, 3, 4).to(torch.bfloat16)
    assert MeanPooling(4, ModelConfig())(hidden, torch.ones(2, 3, dtype=torch.long)).dtype == torch.float32


def test_unknown_pooling_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown pooling 'maen' in 'model.pooling' \(did you mean 'mean'\?\); valid: attention, cls, concat_cls, gem, max, mean, weighted_layers"):
        build_pooling(ModelConfig(pooling="maen"), 8)


ALL = sorted(__import__("foldtune.models.pooling", fromlist=["POOLINGS"]).POOLINGS.names())


def _padded_batch(seed=0, layers=5, size=6):
    torch.manual_seed(seed)
    all_hidden = tuple(torch.randn(3, 4, size) for _ in range(layers))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    return all_hidden, mask


def test_every_registered_pooling_is_tested():
    assert ALL == ["attention", "cls", "concat_cls", "gem", "max", "mean", "weighted_layers"]


@pytest.mark.parametrize("name", ALL)
def test_no_pooling_reads_a_padded_position(name):
    cfg = ModelConfig(pooling=name, pooling_layers=3)
    torch.manual_seed(1)
    pool = build_pooling(cfg, 6)
    all_hidden, mask = _padded_batch()
    poisoned = tuple(h.masked_fill(mask.unsqueeze(-1) == 0, 1e4) for h in all_hidden)
    out = pool(all_hidden[-1], mask, all_hidden)
    assert out.shape == (3, pool.out_features) and out.dtype == torch.float32
    assert torch.equal(out, pool(poisoned[-1], mask, poisoned))
    assert torch.equal(out[2], torch.zeros(pool.out_features))          # fully padded row: zeros, no NaN


def test_max_cls_and_gem_values_by_hand():
    hidden = torch.tensor([[[1.0, -2.0], [3.0, -1.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert build_pooling(ModelConfig(pooling="max"), 2)(hidden, mask).tolist() == [[3.0, -1.0]]
    assert build_pooling(ModelConfig(pooling="cls"), 2)(hidden, mask).tolist() == [[1.0, -2.0]]
    gem = build_pooling(ModelConfig(pooling="gem", gem_p=2.0), 2)(hidden, mask)
    # feature 0: sqrt((1 + 9) / 2); feature 1: negatives clamp to 1e-6 before the power
    assert gem[0, 0].item() == pytest.approx(5 ** 0.5)
    assert gem[0, 1].item() == pytest.approx(1e-6, rel=1e-3)


def test_weighted_layers_start_as_the_mean_of_the_last_k_layers_and_learn_weights():
    all_hidden, mask = _padded_batch(layers=5)
    pool = build_pooling(ModelConfig(pooling="weighted_layers", pooling_layers=3), 6)
    expected = MeanPooling(6, ModelConfig())(sum(all_hidden[-3:]) / 3, mask)
    assert torch.allclose(pool(all_hidden[-1], mask, all_hidden), expected, atol=1e-6)
    assert [n for n, _ in pool.named_parameters()] == ["layer_logits"]
    with pytest.raises(ConfigError, match="model.pooling_layers=3 needs 3 encoder layers; the backbone gave 1"):
        pool(all_hidden[-1], mask, all_hidden[:2])


def test_concat_cls_puts_the_last_k_first_tokens_side_by_side():
    all_hidden, mask = _padded_batch(layers=5, size=6)
    pool = build_pooling(ModelConfig(pooling="concat_cls", pooling_layers=4), 6)
    assert pool.out_features == 24
    out = pool(all_hidden[-1], mask, all_hidden)
    assert torch.equal(out[0], torch.cat([h[0, 0] for h in all_hidden[-4:]]))


def test_attention_pooling_weights_sum_to_one_over_real_tokens():
    torch.manual_seed(0)
    pool = build_pooling(ModelConfig(pooling="attention"), 6)
    hidden = torch.ones(1, 4, 6) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1)
    out = pool(hidden, torch.tensor([[1, 1, 0, 0]]))
    # a convex combination of the two real rows (values 1 and 2): between them
    assert torch.all(out >= 1.0) and torch.all(out <= 2.0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_deberta"])
def test_every_pooling_runs_on_real_backbones(name, backbone, request):
    from foldtune.models.regressor import TextRegressor

    folder = request.getfixturevalue(backbone)
    model = TextRegressor.from_pretrained(ModelConfig(name=str(folder), pooling=name, pooling_layers=2), 3).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 13, 3, 0, 0]])
    out = model(ids, (ids != 0).long())
    assert out.shape == (2, 3) and torch.isfinite(out).all()
