"""Re-initialising, freezing, dropout switches, multi-sample dropout, gradient checkpointing."""

import pytest
import torch

from foldtune.config import ModelConfig, TrainingConfig
from foldtune.models.regressor import TextRegressor
from foldtune.models.surgery import encoder_layers
from foldtune.optim.factory import build_optimizer

IDS = torch.tensor([[2, 10, 11, 12, 13, 3], [2, 14, 15, 3, 0, 0]])
MASK = (IDS != 0).long()


def _model(folder, seed=0, **kw):
    torch.manual_seed(seed)
    return TextRegressor.from_pretrained(ModelConfig(name=str(folder), **kw), 3)


def test_reinit_gives_the_top_layers_fresh_weights_in_the_models_own_init():
    # the real pretrained MiniLM: its trained LayerNorms are far from ones, its matrices from std 0.02
    plain = _model("all-MiniLM-L6-v2")
    fresh = _model("all-MiniLM-L6-v2", reinit_layers=2)
    plain_layers, fresh_layers = encoder_layers(plain.backbone), encoder_layers(fresh.backbone)
    assert len(fresh_layers) == 6
    for i in range(4):      # untouched below
        for (n, a), (_, b) in zip(plain_layers[i].named_parameters(), fresh_layers[i].named_parameters()):
            assert torch.equal(a, b), n
    std = fresh.backbone.config.initializer_range
    for i in (4, 5):
        for name, param in fresh_layers[i].named_parameters():
            assert not torch.equal(param, dict(plain_layers[i].named_parameters())[name]), name
            if "LayerNorm.weight" in name:
                assert torch.equal(param, torch.ones_like(param))
            elif name.endswith("bias"):
                assert torch.equal(param, torch.zeros_like(param))
            else:
                assert param.mean().abs().item() < 0.002
                assert param.std().item() == pytest.approx(std, rel=0.05), name


def test_frozen_parameters_are_unchanged_after_an_optimizer_step(tiny_deberta):
    model = _model(tiny_deberta, freeze_embeddings=True, freeze_layers=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, TrainingConfig(lr=1e-2, weight_decay=0.1), torch.device("cpu"))
    model(IDS, MASK).pow(2).mean().backward()
    opt.step()
    for name, param in model.named_parameters():
        frozen = ".layer.0." in name or name.startswith("backbone.embeddings") or "rel_embeddings" in name \
            or name.startswith("backbone.encoder.LayerNorm")
        assert param.requires_grad == (not frozen), name
        assert torch.equal(param, before[name]) == frozen, name


def test_backbone_dropout_off_makes_training_mode_deterministic(tiny_bert):
    default = _model(tiny_bert).train()
    assert not torch.equal(default(IDS, MASK), default(IDS, MASK))
    off = _model(tiny_bert, backbone_dropout=0.0).train()
    assert off.backbone.config.hidden_dropout_prob == 0.0
    assert off.backbone.config.attention_probs_dropout_prob == 0.0
    assert torch.equal(off(IDS, MASK), off(IDS, MASK))


def test_multi_sample_dropout_acts_in_training_and_is_the_plain_head_in_eval(tiny_bert):
    msd = _model(tiny_bert, head_dropout=0.5, head_dropout_samples=4, backbone_dropout=0.0)
    plain = _model(tiny_bert, backbone_dropout=0.0)
    plain.load_state_dict(msd.state_dict())
    msd.eval(), plain.eval()
    assert torch.equal(msd(IDS, MASK), plain(IDS, MASK))
    msd.train(), plain.train()
    assert torch.equal(plain(IDS, MASK), plain(IDS, MASK))          # nothing random left in the plain model
    assert not torch.equal(msd(IDS, MASK), plain(IDS, MASK))        # the head's dropout acts in training


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_deberta"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(backbone, request):
    folder = request.getfixturevalue(backbone)
    results = []
    for checkpointing in (False, True):
        model = _model(folder, backbone_dropout=0.0, gradient_checkpointing=checkpointing).train()
        calls = []
        inner = next(m for m in encoder_layers(model.backbone)[0].modules() if isinstance(m, torch.nn.Linear))
        inner.register_forward_hook(lambda *args: calls.append(1))
        loss = model(IDS, MASK).pow(2).mean()
        in_forward = len(calls)
        loss.backward()
        # with checkpointing the backward pass runs each layer's forward again
        assert len(calls) == (2 if checkpointing else 1) * in_forward
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7)
