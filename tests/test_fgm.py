"""FGM: the step's gradient is the clean gradient plus the gradient at the embeddings pushed
epsilon along their normalised gradient; the embeddings come back bitwise; a zero gradient
pushes nothing; it waits for its start epoch; bad settings fail with their key."""

import pytest
import torch

from foldtune.config import ConfigError, FGMConfig, ModelConfig, TrainingConfig, load_config
from foldtune.losses import build_loss
from foldtune.models.regressor import TextRegressor
from foldtune.training.fgm import FGM
from foldtune.runtime.precision import resolve_precision
from foldtune.training.step import TrainingStep, refuse_ungraphable

IDS = torch.tensor([[2, 10, 11, 12, 13, 3], [2, 14, 15, 3, 0, 0]])
BATCH = {"input_ids": IDS, "attention_mask": (IDS != 0).long(),
         "labels": torch.tensor([[3.0, 2.0, 4.0], [1.0, 1.5, 2.0]])}
EMBEDDINGS = "backbone.embeddings.word_embeddings.weight"
CFG = FGMConfig(enabled=True, epsilon=0.5)
CPU = torch.device("cpu")


def _model(folder):
    torch.manual_seed(0)
    return TextRegressor.from_pretrained(ModelConfig(name=str(folder), backbone_dropout=0.0), 3).train()


def _step(model, hooks):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return TrainingStep(model, build_loss(TrainingConfig(), 3), opt, resolve_precision("fp32", CPU), hooks, CPU)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _plain_grads(model):
    model.zero_grad(set_to_none=True)
    build_loss(TrainingConfig(), 3)(model(IDS, BATCH["attention_mask"]), BATCH["labels"]).backward()
    return _grads(model)


def test_the_gradient_is_the_clean_one_plus_the_one_at_the_pushed_embeddings(tiny_bert):
    # by hand: the clean gradient, then the embeddings moved by r = eps * g / ||g|| and the gradient there
    reference = _model(tiny_bert)
    clean = _plain_grads(reference)
    g = clean[EMBEDDINGS]
    with torch.no_grad():
        reference.get_parameter(EMBEDDINGS).add_(CFG.epsilon * g / g.norm())
    pushed = _plain_grads(reference)
    expected = {n: clean[n] + pushed[n] for n in clean}

    model = _model(tiny_bert)
    before = model.get_parameter(EMBEDDINGS).detach().clone()
    step = _step(model, [FGM(model, CFG)])
    step.start_epoch(0)
    step.forward_backward(BATCH)
    got = _grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert torch.equal(model.get_parameter(EMBEDDINGS), before)        # put back bitwise
    # and the switch does something: the plain step's gradients are not these
    plain = _plain_grads(_model(tiny_bert))
    assert not torch.allclose(plain["head.linear.weight"], got["head.linear.weight"], rtol=1e-4, atol=0)


def test_a_zero_gradient_pushes_nothing(tiny_bert):
    model = _model(tiny_bert)
    fgm = FGM(model, CFG)
    param = model.get_parameter(EMBEDDINGS)
    param.grad = torch.zeros_like(param)
    before = param.detach().clone()
    fgm.attack()
    assert torch.equal(param, before)                   # not NaN: a zero step
    fgm.restore()
    assert torch.equal(param, before)


def test_nothing_happens_before_the_start_epoch(tiny_bert):
    model = _model(tiny_bert)
    step = _step(model, [FGM(model, FGMConfig(enabled=True, start_epoch=2))])
    calls = []
    step.start_epoch(0)
    step.hooks[0].after_backward(lambda: calls.append(1))
    assert calls == [] and step.variant == (False,)
    step.start_epoch(1)
    model.zero_grad()
    step.forward_backward(BATCH)                        # gradients exist: the push has a direction
    step.hooks[0].after_backward(lambda: calls.append(1))
    assert calls == [1] and step.variant == (True,)


@pytest.mark.parametrize("override, message", [
    ("fgm.epsilon=0", "config key 'fgm.epsilon' set on the command line: expected a positive number, got 0.0"),
    ("fgm.start_epoch=0", "config key 'fgm.start_epoch' set on the command line: expected an integer >= 1, got 0"),
    ("fgm.params=", "config key 'fgm.params' set on the command line: expected a non-empty part of a parameter "
                    "name, got ''"),
])
def test_bad_settings_fail_with_their_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_params_that_match_nothing_are_refused(tiny_bert):
    with pytest.raises(ConfigError, match="fgm.params: 'nothing_like_this' matches no trainable parameter name"):
        FGM(_model(tiny_bert), FGMConfig(enabled=True, params="nothing_like_this"))


def test_cuda_graphs_refuse_a_technique_by_its_declaration(monkeypatch):
    cfg = load_config(None, ["training.cuda_graphs=true", "fgm.enabled=true", "rdrop.enabled=true"])
    refuse_ungraphable(cfg)                             # both declare they can be captured
    monkeypatch.setattr(FGM, "graph_safe", False)
    with pytest.raises(ConfigError, match="^training.cuda_graphs: true cannot be combined with fgm.enabled: true: "
                                          "switch those off or set training.cuda_graphs: false$"):
        refuse_ungraphable(cfg)


def test_frozen_embeddings_are_refused_before_the_model_loads():
    from foldtune.training.checks import check_config_against_device
    cfg = load_config(None, ["fgm.enabled=true", "model.freeze_embeddings=true"])
    with pytest.raises(ConfigError) as err:
        check_config_against_device(cfg, torch.device("cpu"))
    assert str(err.value) == ("fgm.params: 'word_embeddings' names embeddings that model.freeze_embeddings: true "
                              "freezes: set model.freeze_embeddings=false or fgm.enabled=false")
    check_config_against_device(load_config(None, ["fgm.enabled=true"]), torch.device("cpu"))   # trainable: fine
