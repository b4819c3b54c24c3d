import pytest
import torch

from foldtune.config import ConfigError
from foldtune.models.pooling import MeanPooling, build_pooling


def test_mean_pooling_ignores_padding_and_survives_an_empty_row():
    hidden = torch.tensor([
        [[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],   # last position is padding
        [[5.0, 7.0], [-5.0, 1.0], [3.0, 1.0]],      # no padding
        [[9.0, 9.0], [9.0, 9.0], [9.0, 9.0]],       # fully padded
    ])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    pooled = MeanPooling(2)(hidden, mask)
    assert torch.equal(pooled, torch.tensor([[2.0, 3.0], [1.0, 3.0], [0.0, 0.0]]))


def test_mean_pooling_reads_no_padded_position():
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    changed = hidden.clone()
    changed[mask == 0] = 1e6
    pool = MeanPooling(4)
    assert torch.equal(pool(hidden, mask), pool(changed, mask))


def test_mean_pooling_returns_float32_under_bf16_states():
    hidden = torch.randn(2, 3, 4).to(torch.bfloat16)
    assert MeanPooling(4)(hidden, torch.ones(2, 3, dtype=torch.long)).dtype == torch.float32


def test_unknown_pooling_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown pooling 'maen' in 'model.pooling' \(did you mean 'mean'\?\); valid: mean"):
        build_pooling("maen", 8)
