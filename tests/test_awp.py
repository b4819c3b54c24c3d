"""AWP: steps uphill by adv_lr of the weight norm within adv_eps, restores the weights bitwise,
changes the step, waits for its start epoch."""

import pytest
import torch

from foldtune.config import AWPConfig, ModelConfig, TrainingConfig
from foldtune.models.regressor import TextRegressor
from foldtune.optim.factory import build_optimizer
from foldtune.training.awp import AWP

IDS = torch.tensor([[2, 10, 11, 12, 13, 3], [2, 14, 15, 3, 0, 0]])
MASK = (IDS != 0).long()
TARGET = torch.tensor([[3.0, 2.0, 4.0], [1.0, 1.5, 2.0]])
CFG = AWPConfig(enabled=True, adv_lr=1e-2, adv_eps=1e-2, start_epoch=2)


def _setup(folder):
    torch.manual_seed(0)
    model = TextRegressor.from_pretrained(ModelConfig(name=str(folder), backbone_dropout=0.0), 3).train()
    opt = build_optimizer(model, TrainingConfig(lr=1e-3, weight_decay=0.0), torch.device("cpu"))
    return model, opt


def _loss_backward(model):
    loss = torch.nn.functional.mse_loss(model(IDS, MASK), TARGET)
    loss.backward()
    return loss


def test_attack_perturbs_within_eps_and_restore_is_bitwise(tiny_bert):
    model, opt = _setup(tiny_bert)
    _loss_backward(model)
    awp = AWP(model, opt, CFG)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    backup = awp.attack()
    moved = 0
    for name, param in model.named_parameters():
        bound = CFG.adv_eps * originals[name].abs()
        if "weight" in name:
            assert torch.all((param <= originals[name] + bound) & (param >= originals[name] - bound)), name
            moved += not torch.equal(param, originals[name])
        else:
            assert torch.equal(param, originals[name]), name     # only names containing 'weight'
    assert moved >= 10
    awp.restore(backup)
    for name, param in model.named_parameters():
        assert torch.equal(param, originals[name]), name


def test_a_step_with_awp_differs_from_one_without(tiny_bert):
    results = []
    for enabled in (False, True):
        model, opt = _setup(tiny_bert)
        calls = []
        _loss_backward(model)
        if enabled:                         # switched off, the step has no AWP hook
            awp = AWP(model, opt, AWPConfig(enabled=True, adv_lr=1e-2, adv_eps=1e-2, start_epoch=1))
            awp.start_epoch(0)
            awp.after_backward(lambda: calls.append(_loss_backward(model)))
        assert len(calls) == enabled
        opt.step()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    plain, adversarial = results
    assert any(not torch.equal(plain[n], adversarial[n]) for n in plain)


def test_nothing_happens_before_the_start_epoch(tiny_bert):
    model, opt = _setup(tiny_bert)
    _loss_backward(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    awp = AWP(model, opt, CFG)            # start_epoch 2: the loop's epochs 0 (off) and 1 (on)
    calls = []
    awp.start_epoch(0)
    assert not awp.acting
    awp.after_backward(lambda: calls.append(1))
    assert calls == []
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    awp.start_epoch(1)
    assert awp.acting
    awp.after_backward(lambda: calls.append(1))
    assert calls == [1]


def test_adam_direction_needs_the_optimizer_state(tiny_bert):
    model, opt = _setup(tiny_bert)
    awp = AWP(model, opt, AWPConfig(enabled=True, adv_lr=1e-2, adv_eps=1e-2, direction="adam"))
    _loss_backward(model)
    assert awp.attack() == {}                   # no first moment before the first step
    opt.step()
    backup = awp.attack()
    assert len(backup) > 0
    awp.restore(backup)


def test_unmatched_parameter_filter_is_an_error(tiny_bert):
    model, opt = _setup(tiny_bert)
    with pytest.raises(ValueError, match="awp.params='nothing_like_this' matches no trainable parameter"):
        AWP(model, opt, AWPConfig(enabled=True, params="nothing_like_this"))


# One weight row w = (3, 4) (norm 5), input x = (1, 1), target 0: loss (w.x)^2 = 49 and its
# gradient 2 (w.x) x = (14, 14). The grad direction's step is adv_lr * |w| / |g| * g =
# adv_lr * 5 / sqrt(2) * (1, 1), each weight held within adv_eps of its own size.
X = torch.tensor([[1.0, 1.0]])


def _one_row(adv_lr: float, adv_eps: float):
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    awp = AWP(model, opt, AWPConfig(enabled=True, adv_lr=adv_lr, adv_eps=adv_eps, start_epoch=1))
    return model, opt, awp


def _squared_loss(model):
    loss = model(X).pow(2).sum()
    loss.backward()
    return loss.item()


def test_the_attack_steps_uphill_by_adv_lr_of_the_weight_norm_within_adv_eps():
    model, _, awp = _one_row(adv_lr=0.01, adv_eps=0.01)
    assert _squared_loss(model) == 49.0
    assert model.weight.grad.tolist() == [[14.0, 14.0]]
    awp.attack()
    step = 0.01 * 5 / 2 ** 0.5                                  # 0.0354 along (1, 1)
    # the first weight may move 0.01 * 3 = 0.03 only; the second its whole step (< 0.04)
    assert model.weight.tolist()[0] == pytest.approx([3.0 + 0.03, 4.0 + step], abs=1e-6)
    with torch.no_grad():
        assert model(X).pow(2).item() == pytest.approx((7.0 + 0.03 + step) ** 2, abs=1e-4)   # > 49: uphill


def test_the_adversarial_step_adds_the_perturbed_gradient_and_puts_the_weights_back():
    model, opt, awp = _one_row(adv_lr=0.01, adv_eps=0.01)
    _squared_loss(model)
    losses = []
    awp.start_epoch(0)
    awp.after_backward(lambda: losses.append(_squared_loss(model)))
    perturbed_sum = 7.0 + 0.03 + 0.01 * 5 / 2 ** 0.5
    assert losses == [pytest.approx(perturbed_sum ** 2, abs=1e-4)]
    assert model.weight.tolist() == [[3.0, 4.0]]                 # exactly the weights before the attack
    total = 14.0 + 2 * perturbed_sum                             # both gradients, for the optimizer
    assert model.weight.grad.tolist()[0] == pytest.approx([total, total], abs=1e-4)
    opt.step()
    assert model.weight.tolist()[0] == pytest.approx([3.0 - 0.1 * total, 4.0 - 0.1 * total], abs=1e-5)
