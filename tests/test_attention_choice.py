"""model.attention: auto, and dflash (disentangled-flash's kernels swapped into DeBERTa).

On a CPU the package's Triton kernels cannot run; its PyTorch implementation of the same
modules (DFLASH_BACKEND "torch") checks the swap's wiring: what is in place, the
checkpoint's names, the outputs and gradients against transformers' attention.
"""

from __future__ import annotations

import copy
import logging
import sys

import pytest
import torch
import yaml

from foldtune.config import ConfigError, load_config
from foldtune.models import attention
from foldtune.models.attention import choose_attention, use_attention
from foldtune.training.checks import resolve_attention

pytest.importorskip("disentangled_flash")


def _deberta_config(hidden=64, heads=2, attention_dropout=0.0):
    from transformers import DebertaV2Config

    return DebertaV2Config(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                           intermediate_size=64, max_position_embeddings=512, type_vocab_size=0,
                           position_biased_input=False, relative_attention=True, position_buckets=8,
                           max_relative_positions=-1, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                           share_att_key=True, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=attention_dropout)


@pytest.fixture
def torch_kernels(monkeypatch):
    monkeypatch.setattr(attention, "DFLASH_BACKEND", "torch")


@pytest.fixture
def no_dflash(monkeypatch):
    monkeypatch.setitem(sys.modules, "disentangled_flash", None)      # import fails, as when not installed


def test_dflash_puts_its_modules_in_place_and_keeps_outputs_gradients_and_checkpoint_names(torch_kernels):
    from disentangled_flash import DebertaV2OptimizedEncoder
    from transformers import AutoModel

    torch.manual_seed(0)
    # float64: the gradients below the last LayerNorm are small differences of large
    # numbers, whose float32 rounding differs between any two orders of summation
    eager = AutoModel.from_config(_deberta_config()).train().double()
    fast = copy.deepcopy(eager)
    assert use_attention(fast, "dflash", torch.device("cpu")) == "dflash"
    assert isinstance(fast.encoder, DebertaV2OptimizedEncoder)
    assert {type(layer.attention.self).__name__ for layer in fast.encoder.layer} == {
        "TorchTrainingDisentangledSelfAttention"}
    assert list(fast.state_dict()) == list(eager.state_dict())
    ids = torch.randint(1, 100, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, 10:] = 0
    real = mask.bool()
    outputs = [model(input_ids=ids, attention_mask=mask).last_hidden_state for model in (eager, fast)]
    torch.testing.assert_close(outputs[1][real], outputs[0][real], atol=1e-9, rtol=0)
    for out in outputs:
        out[real].square().sum().backward()
    grads = dict(fast.named_parameters())
    for name, param in eager.named_parameters():
        assert (grads[name].grad - param.grad).abs().max() <= 1e-6 * param.grad.abs().max(), name
    # a second switch changes nothing
    encoder = fast.encoder
    assert use_attention(fast, "dflash", torch.device("cpu")) == "dflash" and fast.encoder is encoder


def test_a_regressor_under_dflash_starts_from_the_weights_it_has_under_eager(torch_kernels, tiny_deberta_wide):
    """The swap draws no numbers from the run's generator: the head and the re-initialised
    layer are the same, so a run trains the same way under either attention."""
    from foldtune.config import ModelConfig
    from foldtune.models.regressor import TextRegressor

    weights = {}
    for name in ("eager", "dflash"):
        torch.manual_seed(3)
        model = TextRegressor.from_pretrained(ModelConfig(name=str(tiny_deberta_wide), attention=name,
                                                          reinit_layers=1), 3, device=torch.device("cpu"))
        weights[name] = model.state_dict()
    assert list(weights["dflash"]) == list(weights["eager"])
    for key, value in weights["eager"].items():
        assert torch.equal(weights["dflash"][key], value), key


def test_dflash_that_leaves_transformers_attention_in_place_is_refused(torch_kernels, monkeypatch):
    """The package keeps transformers' attention when it finds Triton unusable, silently."""
    import disentangled_flash
    from transformers import AutoModel

    monkeypatch.setattr(disentangled_flash, "enable_deberta_training", lambda model, **kw: model)
    with pytest.raises(ValueError, match="disentangled-flash left transformers' attention in place"):
        use_attention(AutoModel.from_config(_deberta_config()), "dflash", torch.device("cpu"))


def test_the_regressor_trains_under_dflash_with_the_recipe_surgery_and_checkpointing(torch_kernels):
    from transformers import AutoModel

    from foldtune.config import ModelConfig
    from foldtune.models.regressor import TextRegressor, enable_gradient_checkpointing
    from foldtune.models.surgery import freeze_bottom

    model = TextRegressor._assemble(AutoModel.from_config(_deberta_config()), ModelConfig(attention="dflash"), 3,
                                    torch.device("cpu"), for_training=True)
    freeze_bottom(model.backbone, True, 1)
    enable_gradient_checkpointing(model.backbone)
    assert model.backbone.encoder.gradient_checkpointing
    frozen = model.backbone.encoder.layer[0].attention.self.query_proj.weight
    trained = model.backbone.encoder.layer[1].attention.self.query_proj.weight
    assert not frozen.requires_grad and trained.requires_grad
    ids = torch.randint(1, 100, (2, 24))
    model.train()(ids, torch.ones_like(ids)).sum().backward()
    assert frozen.grad is None and trained.grad.abs().sum() > 0


def test_prediction_without_the_kernels_uses_transformers_attention(no_dflash, caplog):
    from transformers import AutoModel

    backbone = AutoModel.from_config(_deberta_config())
    with caplog.at_level(logging.INFO, logger="foldtune"):
        assert use_attention(backbone, "dflash", torch.device("cpu"), for_training=False) == "eager"
    assert "disentangled-flash is not installed (pip install disentangled-flash==1.1.1); predicting with " \
           "transformers' attention (the same weights)" in caplog.text
    assert type(backbone.encoder).__name__ == "DebertaV2Encoder"
    with pytest.raises(ValueError, match="model.attention=dflash: disentangled-flash is not installed"):
        use_attention(backbone, "dflash", torch.device("cpu"))


@pytest.mark.parametrize("triton_compiles, dropout, backbone_dropout, expected", [
    (True, 0.0, None, "flex"), (True, 0.1, 0.0, "flex"), (True, 0.1, None, "dflash"), (False, 0.0, None, "dflash")])
def test_auto_takes_flex_where_it_runs_and_dflash_where_flex_cannot(
        torch_kernels, monkeypatch, triton_compiles, dropout, backbone_dropout, expected):
    monkeypatch.setattr(attention, "fused_on", lambda device: triton_compiles)
    config = _deberta_config(attention_dropout=dropout)
    assert choose_attention(config, torch.device("cpu"), backbone_dropout)[0] == expected


def test_auto_without_dflash_falls_back_to_eager_and_says_why(no_dflash, monkeypatch):
    monkeypatch.setattr(attention, "fused_on", lambda device: True)
    choice, why = choose_attention(_deberta_config(attention_dropout=0.1), torch.device("cpu"), None)
    assert (choice, why) == ("eager", "flex has no attention dropout and the backbone's is 0.1; dflash cannot be "
                                      "used: disentangled-flash is not installed (pip install "
                                      "disentangled-flash==1.1.1)")
    # heads of 16 dimensions: neither fused path takes them
    choice, why = choose_attention(_deberta_config(hidden=32), torch.device("cpu"), None)
    assert choice == "eager" and why.startswith("flex is not tried on heads of 16")


def test_auto_on_a_cpu_or_another_family_is_transformers_attention(tiny_bert):
    from transformers import AutoConfig

    choice, why = choose_attention(_deberta_config(), torch.device("cpu"), None)
    assert (choice, why) == ("eager", "Triton does not compile for this device; dflash cannot be used: its Triton "
                                      "kernels run on CUDA, this run is on cpu")
    assert choose_attention(AutoConfig.from_pretrained(tiny_bert), torch.device("cuda"), None) == (
        "eager", "bert uses transformers' own attention")


def test_a_run_records_what_auto_chose_and_logs_why(tiny_bert, small_train_csv, tmp_path, monkeypatch):
    from foldtune.cli import train_main

    monkeypatch.chdir(tmp_path)
    args = ["--name", "auto", f"model.name={tiny_bert}", f"data.train_file={small_train_csv}", "data.test_file=null",
            "folds.n_splits=2", "training.epochs=1", "training.device=cpu", "training.cuda_graphs=false"]
    assert load_config(None, args[2:]).model.attention == "auto"
    assert train_main(args) == 0
    run = tmp_path / "runs" / "auto"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["attention"] == "eager"
    assert "model.attention auto: eager (bert uses transformers' own attention)" in (run / "train.log").read_text()


def test_resolving_leaves_a_chosen_attention_and_cuda_graphs_take_flex_not_dflash(tiny_deberta_wide, monkeypatch,
                                                                                    caplog):
    from foldtune.training import checks

    caplog.set_level("INFO", logger="foldtune")
    cfg = load_config(None, [f"model.name={tiny_deberta_wide}", "model.attention=flex"])
    assert resolve_attention(cfg, torch.device("cpu")) is cfg
    monkeypatch.setattr(attention, "fused_on", lambda device: True)    # as on a GPU Triton compiles for
    graphed = load_config(None, [f"model.name={tiny_deberta_wide}", "training.cuda_graphs=true",
                                 "model.backbone_dropout=0.0"])
    # flex's block mask is built inside the captured step: graphs take it as eager steps do
    assert resolve_attention(graphed, torch.device("cuda")).model.attention == "flex"
    # where only dflash could fuse (attention dropout on), graphs take transformers' attention
    monkeypatch.setattr(checks, "choose_attention", lambda *a: ("dflash", "disentangled-flash's kernels"))
    assert resolve_attention(graphed, torch.device("cuda")).model.attention == "eager"
    assert caplog.messages[-1] == ("model.attention auto: eager (training.cuda_graphs: true does not capture "
                                   "dflash's kernels (disentangled-flash's kernels))")


def test_dflash_on_a_cpu_is_refused_before_anything_loads():
    from foldtune.training.checks import check_config_against_device

    cfg = load_config(None, ["model.attention=dflash"])
    with pytest.raises(ConfigError, match="model.attention: dflash cannot train here: its Triton kernels run on "
                                          "CUDA, this run is on cpu; set model.attention: auto"):
        check_config_against_device(cfg, torch.device("cpu"))


def test_cuda_graphs_refuse_dflash_with_the_key_named():
    with pytest.raises(ConfigError, match="model.attention: dflash \\(its kernels tune themselves as they run; "
                                          "untested under capture\\)"):
        load_config(None, ["model.attention=dflash", "training.cuda_graphs=true"])


def test_a_trainer_given_auto_pads_batches_for_the_attention_auto_put_in_place(tiny_deberta_wide, monkeypatch,
                                                                               tmp_path):
    """Flex compiles a kernel per width: batches are padded to multiples of 64 whether the
    config said flex or auto chose it (a FoldTrainer built without a run's resolution)."""
    import numpy as np
    from transformers import AutoTokenizer

    from foldtune.data.dataset import TextDataset
    from foldtune.training.trainer import FoldData, FoldTrainer

    monkeypatch.setattr(attention, "fused_on", lambda device: True)    # as on a GPU Triton compiles for
    ids = [[2, 5, 6, 3], [2, 7, 3]]
    targets = np.ones((2, 6), dtype=np.float32)
    data = FoldData(0, TextDataset(ids, targets), TextDataset(ids, targets), ["a", "b"], np.arange(2),
                    ("a", "b", "c", "d", "e", "f"), (1.0, 5.0))
    pads = {}
    for name in ("auto", "eager"):
        cfg = load_config(None, [f"model.name={tiny_deberta_wide}", f"model.attention={name}",
                                 "model.backbone_dropout=0.0", "training.device=cpu"])
        trainer = FoldTrainer(cfg, data, AutoTokenizer.from_pretrained(tiny_deberta_wide), tmp_path / name).setup()
        pads[name] = (trainer.model.attention, trainer.pad_multiple)
    assert pads == {"auto": ("flex", 64), "eager": ("eager", 1)}


def test_training_pad_to_multiple_of_sets_the_batch_widths_and_flex_takes_whole_tiles(tiny_deberta_wide, monkeypatch,
                                                                                      tmp_path):
    import numpy as np
    from transformers import AutoTokenizer

    from foldtune.data.dataset import TextDataset
    from foldtune.training.trainer import FoldData, FoldTrainer

    monkeypatch.setattr(attention, "fused_on", lambda device: True)
    ids = [[2, 5, 6, 3], [2, 7, 3]]
    targets = np.ones((2, 6), dtype=np.float32)
    data = FoldData(0, TextDataset(ids, targets), TextDataset(ids, targets), ["a", "b"], np.arange(2),
                    ("a", "b", "c", "d", "e", "f"), (1.0, 5.0))
    got = {}
    for name, multiple in (("auto", 256), ("eager", 32)):
        cfg = load_config(None, [f"model.name={tiny_deberta_wide}", f"model.attention={name}",
                                 "model.backbone_dropout=0.0", "training.device=cpu",
                                 f"training.pad_to_multiple_of={multiple}"])
        trainer = FoldTrainer(cfg, data, AutoTokenizer.from_pretrained(tiny_deberta_wide), tmp_path / name).setup()
        got[name] = (trainer.model.attention, trainer.pad_multiple,
                     next(iter(trainer.train_loader))["input_ids"].shape[1])
    assert got == {"auto": ("flex", 256, 256), "eager": ("eager", 32, 32)}
    cfg = load_config(None, [f"model.name={tiny_deberta_wide}", "model.attention=flex",
                             "training.pad_to_multiple_of=96"])
    with pytest.raises(ConfigError) as err:
        resolve_attention(cfg, torch.device("cpu"))
    assert str(err.value) == ("training.pad_to_multiple_of: 96 with model.attention flex, whose kernels take widths "
                              "in whole tiles of 64: set a multiple of 64 (e.g. 128 or 256) or null")
    with pytest.raises(ConfigError, match="training.pad_to_multiple_of.*expected null or an integer >= 1, got 0"):
        load_config(None, ["training.pad_to_multiple_of=0"])
