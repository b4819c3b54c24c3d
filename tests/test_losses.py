import math

import pytest
import torch

from foldtune.config import ConfigError, TrainingConfig
from foldtune.losses import LOSSES, build_loss

PRED = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
TRUE = torch.tensor([[1.5, 2.0], [1.0, 4.0]])
# errors: target 0: 0.5, 2.0 ; target 1: 0.0, 1.0


def _loss(name, **kw):
    return build_loss(TrainingConfig(loss=name, **kw), n_targets=2)(PRED, TRUE).item()


def test_every_loss_is_tested():
    assert LOSSES.names() == ["mcrmse", "mse", "rmse", "smooth_l1"]


def test_mse():
    # target 0: (0.25 + 4) / 2 = 2.125 ; target 1: (0 + 1) / 2 = 0.5 ; mean 1.3125
    assert _loss("mse") == pytest.approx(1.3125)


def test_smooth_l1_with_beta():
    # beta 1: |e| < 1 -> 0.5 e^2, else |e| - 0.5.  t0: 0.125, 1.5 -> 0.8125 ; t1: 0, 0.5 -> 0.25
    assert _loss("smooth_l1") == pytest.approx((0.8125 + 0.25) / 2)
    # beta 0.25: 0.5 -> 0.5 - 0.125 = 0.375 ; 2 -> 1.875 ; 1 -> 0.875 ; 0 -> 0
    assert _loss("smooth_l1", loss_beta=0.25) == pytest.approx(((0.375 + 1.875) / 2 + 0.875 / 2) / 2)


def test_rmse_and_mcrmse():
    assert _loss("rmse") == pytest.approx(math.sqrt(1.3125), rel=1e-6)
    assert _loss("mcrmse") == pytest.approx((math.sqrt(2.125) + math.sqrt(0.5)) / 2, rel=1e-6)


def test_target_weights_are_normalised():
    # weights 3:1 -> 0.75 * 2.125 + 0.25 * 0.5
    assert _loss("mse", target_weights=(3.0, 1.0)) == pytest.approx(0.75 * 2.125 + 0.25 * 0.5)
    assert _loss("mcrmse", target_weights=(0.0, 2.0)) == pytest.approx(math.sqrt(0.5), rel=1e-6)
    with pytest.raises(ConfigError, match="training.target_weights has 3 values for 2 targets"):
        build_loss(TrainingConfig(target_weights=(1.0, 1.0, 1.0)), n_targets=2)


def test_mcrmse_gradient_is_finite_at_a_perfect_prediction():
    pred = TRUE.clone().requires_grad_(True)
    build_loss(TrainingConfig(loss="mcrmse"), 2)(pred, TRUE).backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))     # zero error, zero slope: no NaN from sqrt(0)


@pytest.mark.parametrize("name,expected", [("mse", 1.3125), ("smooth_l1", (0.8125 + 0.25) / 2),
                                           ("rmse", math.sqrt(1.3125)),
                                           ("mcrmse", (math.sqrt(2.125) + math.sqrt(0.5)) / 2)])
def test_rows_weighed_zero_count_for_nothing(name, expected):
    # the two rows above, and two stand-ins far off (as a CUDA graph fills up a short batch)
    pred = torch.cat([PRED, torch.tensor([[9.0, -9.0], [1.0, 2.0]])]).requires_grad_(True)
    true = torch.cat([TRUE, torch.tensor([[1.0, 1.0], [5.0, 5.0]])])
    loss = build_loss(TrainingConfig(loss=name), 2)(pred, true, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert pred.grad[2:].abs().sum().item() == 0.0 and pred.grad[:2].abs().sum().item() > 0
