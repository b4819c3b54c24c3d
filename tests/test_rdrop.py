"""R-Drop: the loss is the mean of two dropout passes' task losses plus alpha times the
(row-weighted) mean squared difference of their predictions; stand-in rows count for
nothing; a bad alpha fails with its key."""

import pytest
import torch

from foldtune.config import ConfigError, ModelConfig, RDropConfig, TrainingConfig, load_config
from foldtune.losses import build_loss
from foldtune.models.regressor import TextRegressor
from foldtune.runtime.precision import resolve_precision
from foldtune.training.rdrop import RDrop, consistency
from foldtune.training.step import TrainingStep

IDS = torch.tensor([[2, 10, 11, 12, 13, 3], [2, 14, 15, 3, 0, 0], [2, 16, 17, 18, 3, 0]])
BATCH = {"input_ids": IDS, "attention_mask": (IDS != 0).long(),
         "labels": torch.tensor([[3.0, 2.0, 4.0], [1.0, 1.5, 2.0], [2.5, 3.5, 3.0]])}
CPU = torch.device("cpu")
ALPHA = 2.0


def _model(folder):
    torch.manual_seed(0)
    # dropout on: the two passes differ
    return TextRegressor.from_pretrained(ModelConfig(name=str(folder), backbone_dropout=0.2, head_dropout=0.2),
                                         3).train()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step_grads(folder, hooks, batch=BATCH):
    model = _model(folder)
    step = TrainingStep(model, build_loss(TrainingConfig(), 3), torch.optim.SGD(model.parameters(), lr=0.1),
                        resolve_precision("fp32", CPU), [hook(model) for hook in hooks], CPU)
    torch.manual_seed(7)
    loss = step.forward_backward(batch)
    return loss, _grads(model)


def test_the_gradient_is_that_of_the_two_pass_loss_with_the_same_masks(tiny_bert):
    # by hand, the dropout generator seeded as the step's is: the same two masks
    model = _model(tiny_bert)
    task = build_loss(TrainingConfig(), 3)
    torch.manual_seed(7)
    p1 = model(IDS, BATCH["attention_mask"])
    p2 = model(IDS, BATCH["attention_mask"])
    expected_loss = (task(p1, BATCH["labels"]) + task(p2, BATCH["labels"])) / 2 + ALPHA * ((p1 - p2) ** 2).mean()
    expected_loss.backward()
    expected = _grads(model)

    loss, got = _step_grads(tiny_bert, [lambda m: RDrop(RDropConfig(enabled=True, alpha=ALPHA))])
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    # and the switch does something: one pass alone gives another gradient
    _, plain = _step_grads(tiny_bert, [])
    assert not torch.allclose(plain["head.linear.weight"], got["head.linear.weight"], rtol=1e-3, atol=0)


def test_the_consistency_is_the_mean_squared_difference_and_ignores_stand_in_rows():
    p1 = torch.tensor([[1.0, 2.0], [3.0, 5.0], [100.0, -100.0]])
    p2 = torch.tensor([[2.0, 2.0], [3.0, 2.0], [0.0, 0.0]])
    assert consistency(p1[:2], p2[:2], None).item() == pytest.approx((1 + 0 + 0 + 9) / 4)
    # the third row is a stand-in (weight 0): its difference counts for nothing
    assert consistency(p1, p2, torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx((1 + 0 + 0 + 9) / 4)


def test_the_hook_weighs_a_filled_batch_s_stand_in_rows_zero_in_both_terms():
    # two passes as a fake forward: task losses 1.0 and 3.0, predictions that differ by 1
    # in the real rows and by 100 in the stand-in row (weight 0)
    p1 = torch.tensor([[1.0], [2.0], [0.0]])
    p2 = torch.tensor([[2.0], [1.0], [100.0]])
    passes = iter([(torch.tensor(1.0), p1), (torch.tensor(3.0), p2)])
    batch = {"row_weight": torch.tensor([1.0, 1.0, 0.0])}
    loss, preds = RDrop(RDropConfig(enabled=True, alpha=ALPHA)).around_forward(batch, lambda b: next(passes))
    assert loss.item() == pytest.approx((1.0 + 3.0) / 2 + ALPHA * 1.0)
    assert preds is p1


def test_a_bad_alpha_fails_with_its_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rdrop.alpha=0"])
    assert str(err.value) == "config key 'rdrop.alpha' set on the command line: expected a positive number, got 0.0"


def test_a_model_without_dropout_is_refused_before_training():
    from foldtune.training.checks import check_config_against_device
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError) as err:
        check_config_against_device(load_config(None, ["rdrop.enabled=true", "model.backbone_dropout=0.0"]), cpu)
    assert str(err.value) == ("rdrop.enabled: true needs dropout, and model.backbone_dropout and model.head_dropout "
                              "are both 0: set model.backbone_dropout=0.1 (for example) or rdrop.enabled=false")
    # either dropout is enough; the model's own (backbone_dropout null, the default) too
    for overrides in (["model.backbone_dropout=0.0", "model.head_dropout=0.1"], ["model.backbone_dropout=0.1"], []):
        check_config_against_device(load_config(None, ["rdrop.enabled=true", *overrides]), cpu)
