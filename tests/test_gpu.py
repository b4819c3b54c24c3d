"""CUDA-only paths: bf16 and fp16 (with its grad scaler) training and autocast inference."""

from __future__ import annotations

import gc
import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch

from transformers import AutoTokenizer

from conftest import assert_scores_match_oof, run_stopped_at
from foldtune.checkpoint import load_checkpoint
from foldtune.config import load_config
from foldtune.data.dataset import TextDataset, encode_texts
from foldtune.data.demo import make_demo
from foldtune.runtime.precision import resolve_precision
from foldtune.runtime.predict import predict
from foldtune.training.cross_validation import run_cross_validation

pytestmark = pytest.mark.gpu

# model.attention=dflash needs the optional disentangled-flash package
DFLASH = pytest.param("dflash", marks=pytest.mark.skipif(importlib.util.find_spec("disentangled_flash") is None,
                                                         reason="disentangled-flash is not installed"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda(precision, tiny_deberta, tmp_path):
    train, test = make_demo(n_train=40, n_test=10, seed=2)
    train.to_csv(tmp_path / "train.csv", index=False)
    cfg = load_config(None, [f"data.train_file={tmp_path / 'train.csv'}", "data.test_file=null", "data.max_len=64",
                             "folds.n_splits=2", f"model.name={tiny_deberta}", "training.epochs=2",
                             "training.batch_size=8", f"training.precision={precision}", "training.device=cuda"])
    run_cross_validation(cfg, tmp_path / "run")
    assert_scores_match_oof(tmp_path / "run", train)
    assert resolve_precision(precision, torch.device("cuda")).scaler.is_enabled() == (precision == "fp16")

    # autocast predictions of a checkpoint stay close to its fp32 predictions
    model, _ = load_checkpoint(tmp_path / "run" / "fold_0" / "best", "cuda")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "fold_0" / "best"))
    data = TextDataset(encode_texts(tokenizer, test["full_text"].tolist(), 64).input_ids)
    device = torch.device("cuda")
    fp32 = predict(model, data, 4, tokenizer.pad_token_id, device, resolve_precision("fp32", device))
    low = predict(model, data, 4, tokenizer.pad_token_id, device, resolve_precision(precision, device))
    np.testing.assert_allclose(low, fp32, atol=0.05)


@pytest.mark.parametrize("attention", ["eager", "flex", DFLASH])
def test_the_deberta_recipe_takes_its_steps_in_fp16_as_in_bf16(attention, tiny_deberta_wide, tmp_path):
    # For T4 and P100 users: the recipe (LLRD, AWP, SWA, frozen bottom, re-init) under fp16
    # autocast and its grad scaler, on either attention path, takes the steps bf16 takes and
    # ends where bf16 does. At this size the head does most of the learning (on an H200 the
    # two precisions' epoch losses agreed to 1e-7), so this guards the scaler's path through
    # AWP, SWA and the fused kernel (no skipped steps, nothing infinite), not the backbone's
    # fp16 numerics.
    from pathlib import Path

    train, _ = make_demo(n_train=80, n_test=0, seed=2)
    train.to_csv(tmp_path / "train.csv", index=False)
    recipe = Path(__file__).resolve().parents[1] / "configs" / "deberta_v3_base.yaml"
    oof, losses = {}, {}
    for precision in ("bf16", "fp16"):
        cfg = load_config(recipe, [f"data.train_file={tmp_path / 'train.csv'}", "data.test_file=null",
                                   "data.max_len=64", "folds.n_splits=2", f"model.name={tiny_deberta_wide}",
                                   "training.epochs=4", "training.lr=1e-3", "training.head_lr=1e-3",
                                   "awp.start_epoch=2", "averaging.start_epoch=4", f"model.attention={attention}",
                                   f"training.precision={precision}", "training.device=cuda"])
        result = run_cross_validation(cfg, tmp_path / precision)
        assert_scores_match_oof(tmp_path / precision, train)
        oof[precision] = (result["oof"]["mcrmse"], pd.read_csv(tmp_path / precision / "oof.csv"))
        metrics = pd.read_csv(tmp_path / precision / "fold_0" / "metrics.csv")
        losses[precision] = metrics["train_loss"].tolist()
    print(attention, {k: v[0] for k, v in oof.items()}, losses)
    for precision, curve in losses.items():
        # steps were taken: with no dropout, a grad scaler that skipped them all would leave each
        # epoch's mean loss where the first one was (fp32 on the CPU: 0.1977 -> 0.1928)
        assert np.isfinite(curve).all() and curve[-1] < curve[0] - 0.002, (precision, curve)
    assert oof["fp16"][0] == pytest.approx(oof["bf16"][0], abs=0.03)
    targets = list(train.columns[2:])
    np.testing.assert_allclose(oof["fp16"][1][targets].to_numpy(), oof["bf16"][1][targets].to_numpy(), atol=0.25)


def test_8bit_adamw_trains_on_cuda(tiny_deberta, tmp_path):
    pytest.importorskip("bitsandbytes")
    train, _ = make_demo(n_train=40, n_test=0, seed=2)
    train.to_csv(tmp_path / "train.csv", index=False)
    cfg = load_config(None, [f"data.train_file={tmp_path / 'train.csv'}", "data.test_file=null", "data.max_len=64",
                             "folds.n_splits=2", f"model.name={tiny_deberta}", "training.epochs=2",
                             "training.batch_size=8", "training.optimizer=adamw_8bit", "training.lr=1e-3",
                             "training.layerwise_lr_decay=0.8", "awp.enabled=true", "awp.start_epoch=1"])
    run_cross_validation(cfg, tmp_path / "run")
    assert_scores_match_oof(tmp_path / "run", train)

    from foldtune.config import ModelConfig, TrainingConfig
    from foldtune.models.regressor import TextRegressor
    from foldtune.optim.factory import build_optimizer

    model = TextRegressor.from_pretrained(ModelConfig(name=str(tiny_deberta)), 6).cuda()
    opt = build_optimizer(model, TrainingConfig(optimizer="adamw_8bit", lr=1e-3), torch.device("cuda"))
    assert type(opt).__name__ == "AdamW8bit"
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.tensor([[2, 10, 11, 3]], device="cuda")
    model(ids, torch.ones_like(ids)).pow(2).mean().backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def _graph_cfg(tmp_path, backbone, *extra):
    train, _ = make_demo(n_train=40, n_test=0, seed=2)
    train.to_csv(tmp_path / "train.csv", index=False)
    # no dropout and fp32: a replayed step then does what an eager step does
    return load_config(None, [f"data.train_file={tmp_path / 'train.csv'}", "data.test_file=null",
                              "data.max_len=64", "folds.n_splits=2", f"model.name={backbone}", "training.epochs=3",
                              "training.batch_size=8", "training.lr=1e-3", "training.eval_steps=2",
                              "training.max_grad_norm=1.0", "training.precision=fp32", "training.device=cuda",
                              "model.backbone_dropout=0.0", "model.attention=eager", *extra])


@pytest.mark.parametrize("backbone", ["tiny_deberta", "tiny_deberta_4"])
def test_cuda_graph_steps_train_as_eager_steps_do(backbone, request, tmp_path, caplog):
    caplog.set_level("INFO", logger="foldtune")
    path = request.getfixturevalue(backbone)
    eager = run_cross_validation(_graph_cfg(tmp_path, path), tmp_path / "eager")
    graphed = run_cross_validation(_graph_cfg(tmp_path, path, "training.cuda_graphs=true"), tmp_path / "graphed")
    assert graphed["oof"]["mcrmse"] == pytest.approx(eager["oof"]["mcrmse"], abs=1e-4)
    for run in ("eager", "graphed"):
        assert (tmp_path / run / "oof.csv").is_file()
    a = pd.read_csv(tmp_path / "eager" / "oof.csv").iloc[:, 2:].to_numpy()
    b = pd.read_csv(tmp_path / "graphed" / "oof.csv").iloc[:, 2:].to_numpy()
    np.testing.assert_allclose(b, a, atol=1e-4)
    # 20 training rows a fold at batch 8: two full batches (one shape, one capture) and a short one (eager)
    log = (tmp_path / "graphed" / "fold_0" / "train.log").read_text()
    assert log.count("captured a CUDA graph") == 1
    la = pd.read_csv(tmp_path / "eager" / "fold_0" / "metrics.csv")["train_loss"].to_numpy()
    lb = pd.read_csv(tmp_path / "graphed" / "fold_0" / "metrics.csv")["train_loss"].to_numpy()
    np.testing.assert_allclose(lb, la, rtol=1e-4)


def test_graphed_window_batches_train_as_eager_ones_do(tiny_bert, tmp_path, caplog):
    """data.long_text windows under CUDA graphs: batches padded to fixed shapes (more windows,
    a longer stitch plan, stand-in texts) replay the eager steps' training."""
    caplog.set_level("INFO", logger="foldtune")     # the fold's train.log gets the capture lines
    windows = ("data.long_text=windows", "data.max_len=32", "model.pooling=mean")
    eager = run_cross_validation(_graph_cfg(tmp_path, tiny_bert, *windows), tmp_path / "eager")
    graphed = run_cross_validation(_graph_cfg(tmp_path, tiny_bert, *windows, "training.cuda_graphs=true"),
                                   tmp_path / "graphed")
    assert graphed["oof"]["mcrmse"] == pytest.approx(eager["oof"]["mcrmse"], abs=1e-4)
    a = pd.read_csv(tmp_path / "eager" / "oof.csv").iloc[:, 2:].to_numpy()
    b = pd.read_csv(tmp_path / "graphed" / "oof.csv").iloc[:, 2:].to_numpy()
    np.testing.assert_allclose(b, a, atol=1e-4)
    log = (tmp_path / "graphed" / "fold_0" / "train.log").read_text()
    assert log.count("captured a CUDA graph") >= 1
    la = pd.read_csv(tmp_path / "eager" / "fold_0" / "metrics.csv")["train_loss"].to_numpy()
    lb = pd.read_csv(tmp_path / "graphed" / "fold_0" / "metrics.csv")["train_loss"].to_numpy()
    np.testing.assert_allclose(lb, la, rtol=1e-4)


def test_a_graphed_run_stopped_midway_resumes_to_the_same_oof(tiny_deberta, tmp_path, monkeypatch):
    from foldtune.training.resume import resume_run

    cfg = _graph_cfg(tmp_path, tiny_deberta, "training.cuda_graphs=true", "training.save_state_steps=2",
                     "model.backbone_dropout=null", "model.head_dropout=0.1")
    straight = run_cross_validation(cfg, tmp_path / "straight")
    run_stopped_at(monkeypatch, cfg, tmp_path / "stopped", fold=1, step=4)
    resumed = resume_run(tmp_path / "stopped")
    # dropout is on: the replays draw the same random numbers after a resume as without a stop
    assert resumed["oof"]["mcrmse"] == pytest.approx(straight["oof"]["mcrmse"], abs=1e-4)


def test_graphed_folds_in_threads_give_the_sequential_results(tiny_deberta, tmp_path):
    sequential = run_cross_validation(_graph_cfg(tmp_path, tiny_deberta, "training.cuda_graphs=true"), tmp_path / "s")
    threads = run_cross_validation(_graph_cfg(tmp_path, tiny_deberta, "training.cuda_graphs=true",
                                              "training.parallel_folds=2", "training.parallel_mode=threads"),
                                   tmp_path / "t")
    a = pd.read_csv(tmp_path / "s" / "oof.csv").iloc[:, 2:].to_numpy()
    b = pd.read_csv(tmp_path / "t" / "oof.csv").iloc[:, 2:].to_numpy()
    np.testing.assert_allclose(b, a, atol=1e-4)
    assert threads["oof"]["mcrmse"] == pytest.approx(sequential["oof"]["mcrmse"], abs=1e-5)


def test_graphed_fold_seeds_in_threads_hand_their_memory_back(tiny_deberta, tmp_path):
    # each finished fold-seed's graphs, model and optimizer are freed and torch's cache emptied:
    # a dropped graph's memory pool is reused by no other, and 25 windowed fold-seeds filled an H200
    def cached():       # held by torch's allocator and used by no tensor (cuBLAS's workspaces are tensors)
        return torch.cuda.memory_reserved() - torch.cuda.memory_allocated()

    gc.collect()
    torch.cuda.empty_cache()
    before = cached()
    run_cross_validation(_graph_cfg(tmp_path, tiny_deberta, "training.cuda_graphs=true", "training.seeds=[1,2,3]",
                                    "training.parallel_folds=2", "training.parallel_mode=threads"), tmp_path / "t")
    assert len(list((tmp_path / "t").glob("fold_*/seed_*/best"))) == 6
    # without the release these six fold-seeds left 261 MiB more cached (H200, 2026-12-01); with it
    # 11 MiB more after the other graphed tests: less than one fold-seed's 43
    assert cached() - before < 32 * 2**20


def _oof_values(run):
    return pd.read_csv(run / "oof.csv").iloc[:, 2:].to_numpy()


def _recipe_cfg(tmp_path, backbone, *extra):
    """configs/deberta_v3_base.yaml on a tiny DeBERTa in fp32: flex, AWP from epoch 2, SWA over
    epoch 4, LLRD, the bottom two layers frozen and the top one re-initialised. The demo essays
    are 56-154 word pieces: batches of widths 128 and 192 whose rows end in different tiles,
    so a replay that kept its capture's block mask would skip tiles its own batch needs."""
    from pathlib import Path

    train, _ = make_demo(n_train=80, n_test=0, seed=2)
    train.to_csv(tmp_path / "train.csv", index=False)
    recipe = Path(__file__).resolve().parents[1] / "configs" / "deberta_v3_base.yaml"
    return load_config(recipe, [f"data.train_file={tmp_path / 'train.csv'}", "data.test_file=null",
                                "data.max_len=256", "folds.n_splits=2", f"model.name={backbone}",
                                "training.lr=1e-3", "training.head_lr=1e-3", "model.attention=flex",
                                "training.precision=fp32", "training.device=cuda", *extra])


def test_the_deberta_recipe_graphed_trains_as_its_eager_steps_do(tiny_deberta_wide, tmp_path, caplog):
    # flex's block mask is built inside the captured step; AWP's attack and restore are captured
    # with it, in a graph of their own from epoch 2
    caplog.set_level("INFO", logger="foldtune")
    eager = run_cross_validation(_recipe_cfg(tmp_path, tiny_deberta_wide), tmp_path / "eager")
    graphed = run_cross_validation(_recipe_cfg(tmp_path, tiny_deberta_wide, "training.cuda_graphs=true"),
                                   tmp_path / "graphed")
    log = (tmp_path / "graphed" / "fold_0" / "train.log").read_text()
    # 40 rows a fold at batch 8: 5 full batches an epoch, of one or two widths, without AWP and with it
    assert 2 <= log.count("captured a CUDA graph") <= 4, log
    np.testing.assert_allclose(_oof_values(tmp_path / "graphed"), _oof_values(tmp_path / "eager"), atol=1e-4)
    assert graphed["oof"]["mcrmse"] == pytest.approx(eager["oof"]["mcrmse"], abs=1e-5)
    for fold in ("fold_0", "fold_1"):
        la = pd.read_csv(tmp_path / "eager" / fold / "metrics.csv")["train_loss"].to_numpy()
        lb = pd.read_csv(tmp_path / "graphed" / fold / "metrics.csv")["train_loss"].to_numpy()
        np.testing.assert_allclose(lb, la, rtol=1e-4)


def test_graphed_recipe_folds_in_threads_give_the_sequential_results(tiny_deberta_wide, tmp_path):
    threads = ("training.parallel_folds=2", "training.parallel_mode=threads")
    sequential = run_cross_validation(_recipe_cfg(tmp_path, tiny_deberta_wide, "training.cuda_graphs=true"),
                                      tmp_path / "s")
    parallel = run_cross_validation(_recipe_cfg(tmp_path, tiny_deberta_wide, "training.cuda_graphs=true", *threads),
                                    tmp_path / "t")
    np.testing.assert_allclose(_oof_values(tmp_path / "t"), _oof_values(tmp_path / "s"), atol=1e-4)
    assert parallel["oof"]["mcrmse"] == pytest.approx(sequential["oof"]["mcrmse"], abs=1e-5)


# FGM and R-Drop declare themselves graph safe (training/hooks.py): captured, their step is the eager one.
@pytest.mark.parametrize("technique", [("fgm.enabled=true", "fgm.epsilon=0.5"), ("rdrop.enabled=true",)])
def test_a_graphed_step_with_fgm_or_rdrop_trains_as_the_eager_one(technique, tiny_deberta, tmp_path, caplog,
                                                                   monkeypatch):
    from foldtune.training.rdrop import RDrop

    caplog.set_level("INFO", logger="foldtune")
    # Dropout is off so that a replay equals an eager step; R-Drop's two passes then agree,
    # and its refusal of a model without dropout (a waste of a user's time) is lifted here.
    monkeypatch.setattr(RDrop, "check_config", classmethod(lambda cls, cfg: None))
    eager = run_cross_validation(_graph_cfg(tmp_path, tiny_deberta, *technique), tmp_path / "eager")
    graphed = run_cross_validation(_graph_cfg(tmp_path, tiny_deberta, "training.cuda_graphs=true", *technique),
                                   tmp_path / "graphed")
    assert "captured a CUDA graph" in (tmp_path / "graphed" / "fold_0" / "train.log").read_text()
    assert graphed["oof"]["mcrmse"] == pytest.approx(eager["oof"]["mcrmse"], abs=1e-4)
    np.testing.assert_allclose(_oof_values(tmp_path / "graphed"), _oof_values(tmp_path / "eager"), atol=1e-4)


def test_fgm_rdrop_and_awp_change_a_graphed_run(tiny_deberta, tmp_path):
    # head dropout on: R-Drop's two passes differ. Each switch must change what the replays learn.
    common = ("training.cuda_graphs=true", "model.head_dropout=0.1")
    run_cross_validation(_graph_cfg(tmp_path, tiny_deberta, *common), tmp_path / "plain")
    for name, *switch in (("fgm", "fgm.enabled=true"), ("rdrop", "rdrop.enabled=true"),
                          ("awp", "awp.enabled=true", "awp.start_epoch=1", "awp.adv_lr=1.0", "awp.adv_eps=0.1")):
        run_cross_validation(_graph_cfg(tmp_path, tiny_deberta, *common, *switch), tmp_path / name)
        assert np.abs(_oof_values(tmp_path / name) - _oof_values(tmp_path / "plain")).max() > 1e-3, name


def _deberta_pair(share_att_key: bool, attention: str):
    """A random DeBERTa-v2 (buckets small enough that 200 tokens reach the log buckets; heads
    of 32, which both fused paths take) and its copy with a fused attention."""
    import copy

    from transformers import DebertaV2Config, DebertaV2Model

    from foldtune.models.attention import use_attention

    config = DebertaV2Config(vocab_size=300, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=512, type_vocab_size=0,
                             position_biased_input=False, relative_attention=True, position_buckets=16,
                             pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=share_att_key,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    eager = DebertaV2Model(config).cuda()
    fused = copy.deepcopy(eager)
    assert use_attention(fused, attention) == attention
    ids = torch.randint(5, 300, (3, 200), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 150:] = 0
    mask[2, 37:] = 0
    return eager, fused, ids, mask


def _outputs_and_grads(model, ids, mask, autocast: bool):
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    real = mask.bool()
    (hidden[real].sin().sum()).backward()
    return hidden[real].detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("attention", ["flex", DFLASH])
@pytest.mark.parametrize("share_att_key", [True, False])
def test_fused_disentangled_attention_matches_transformers(share_att_key, attention):
    eager, fused, ids, mask = _deberta_pair(share_att_key, attention)
    ref_out, ref_grad = _outputs_and_grads(eager, ids, mask, autocast=False)
    # fp32: the same function, summed in another order
    out, grad = _outputs_and_grads(fused, ids, mask, autocast=False)
    assert (out - ref_out).abs().max() / ref_out.abs().max() < 1e-4
    assert (grad - ref_grad).norm() / ref_grad.norm() < 1e-4
    # bf16: the fused kernel's rounding error is of the order of transformers' own
    bf_ref_out, bf_ref_grad = _outputs_and_grads(eager, ids, mask, autocast=True)
    bf_out, bf_grad = _outputs_and_grads(fused, ids, mask, autocast=True)
    eager_err = (bf_ref_out - ref_out).norm() / ref_out.norm()
    assert (bf_out - ref_out).norm() / ref_out.norm() < 2 * eager_err + 1e-3
    eager_grad_err = (bf_ref_grad - ref_grad).norm() / ref_grad.norm()
    assert (bf_grad - ref_grad).norm() / ref_grad.norm() < 2 * eager_grad_err + 1e-3


@pytest.mark.parametrize("attention", ["flex", DFLASH])
def test_fused_attention_trains_as_transformers_attention_does(attention, tiny_deberta_wide, tmp_path):
    eager = run_cross_validation(_graph_cfg(tmp_path, tiny_deberta_wide), tmp_path / "eager")
    fused = run_cross_validation(_graph_cfg(tmp_path, tiny_deberta_wide, f"model.attention={attention}"),
                                 tmp_path / "flex")
    a = pd.read_csv(tmp_path / "eager" / "oof.csv").iloc[:, 2:].to_numpy()
    b = pd.read_csv(tmp_path / "flex" / "oof.csv").iloc[:, 2:].to_numpy()
    np.testing.assert_allclose(b, a, atol=1e-3)
    assert fused["oof"]["mcrmse"] == pytest.approx(eager["oof"]["mcrmse"], abs=1e-4)
    # the checkpoint holds DeBERTa's own weights: on CPU transformers' attention reproduces its OOF
    oof = pd.read_csv(tmp_path / "flex" / "oof.csv")
    train = pd.read_csv(tmp_path / "train.csv").set_index("text_id").loc[oof["text_id"][oof["fold"] == 0]]
    model, _ = load_checkpoint(tmp_path / "flex" / "fold_0" / "best", torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "flex" / "fold_0" / "best"))
    dataset = TextDataset(encode_texts(tokenizer, train["full_text"].tolist(), 64).input_ids)
    cpu = predict(model, dataset, 8, tokenizer.pad_token_id, torch.device("cpu"), resolve_precision("fp32", torch.device("cpu")))
    np.testing.assert_allclose(cpu, oof[oof["fold"] == 0].iloc[:, 2:].to_numpy(), atol=1e-4)


@pytest.mark.parametrize("room,separate", [(True, False), (True, True), (False, False)])
def test_a_snapshot_of_gpu_tensors_keeps_their_values_when_training_goes_on(room, separate, monkeypatch):
    from foldtune.runtime import snapshot as host_copies

    if not room:    # no room for GPU copies: copied to the host at once
        monkeypatch.setattr(host_copies, "_room", lambda device: 0)
    # through pinned buffers of 1 MB: the 4 MB weight crosses four of them, the moment four more
    monkeypatch.setattr(host_copies, "STAGING_BYTES", 1 << 20)
    monkeypatch.setattr(host_copies, "_STAGING", host_copies._Staging(most=1))
    weight = torch.arange(1 << 20, dtype=torch.float32, device="cuda").view(1024, 1024)
    moment = torch.full((1 << 20,), 3.0, device="cuda")
    count = torch.tensor(5.0, device="cuda")                # a 0-d optimizer step
    ids = torch.arange(10, device="cuda")                   # int64: a buffer of its own dtype
    gc.collect()                        # earlier tests' tensors must not be freed while this one counts
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    snapshot = host_copies.Snapshot({"model": {"w": weight, "tied": weight.detach(), "ids": ids},
                                     "optimizer": [moment, count], "step": 7}, separate=separate)
    # one buffer per dtype: the tied weight copied once (+4 B for the step), the ids apart
    # (the allocator rounds each buffer up to 512 B)
    assert torch.cuda.memory_allocated() - before == ((2 * 4 << 20) + 512 + 512 if room else 0)
    for _ in range(20):                 # training changes the originals, queued behind the copies
        weight.mul_(2.0).add_(1.0)
        moment.zero_()
        count.add_(1.0)
        ids.add_(1)
    copied = threading_result(snapshot.value)      # read in another thread, as the writer does
    assert copied["step"] == 7 and copied["model"]["w"] is copied["model"]["tied"]
    assert copied["model"]["w"].device.type == "cpu"
    assert torch.equal(copied["model"]["w"], torch.arange(1 << 20, dtype=torch.float32).view(1024, 1024))
    assert torch.equal(copied["optimizer"][0], torch.full((1 << 20,), 3.0))
    assert copied["optimizer"][1].shape == () and copied["optimizer"][1].item() == 5.0
    assert torch.equal(copied["model"]["ids"], torch.arange(10))
    assert not copied["model"]["w"].is_pinned()     # pageable: only the staging buffer is pinned
    if room:
        assert host_copies._STAGING._made == 1 and host_copies._STAGING._free[0].is_pinned()
    storages = {t.untyped_storage().data_ptr() for t in (copied["model"]["w"], *copied["optimizer"])}
    # views of one host buffer unless separate (safetensors needs tensors that own their memory)
    assert len(storages) == (3 if separate or not room else 1)
    assert torch.cuda.memory_allocated() == before  # the GPU copies are freed once on the host


def threading_result(function):
    import threading

    box = []
    thread = threading.Thread(target=lambda: box.append(function()))
    thread.start()
    thread.join()
    return box[0]


def test_the_warm_up_kernels_run_in_bf16_and_draw_no_random_numbers():
    from foldtune.training.warmup import run_first_kernels

    device = torch.device("cuda")
    before = torch.cuda.get_rng_state(device), torch.get_rng_state()
    grad = run_first_kernels(device, resolve_precision("bf16", device))
    assert grad.shape == (2, 64, 128) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.equal(torch.cuda.get_rng_state(device), before[0]) and torch.equal(torch.get_rng_state(), before[1])


def test_a_run_gives_the_same_oof_with_and_without_the_device_warm_up(tiny_deberta, tmp_path):
    from foldtune.training.warmup import start_warm_up

    cfg = _graph_cfg(tmp_path, tiny_deberta, "training.cuda_graphs=true", "model.backbone_dropout=null",
                     "model.head_dropout=0.1")
    cold = run_cross_validation(cfg, tmp_path / "cold")
    thread = start_warm_up(cfg)         # as train.py does: the run begins while it warms up
    assert thread is not None
    warmed = run_cross_validation(cfg, tmp_path / "warmed")
    thread.join()
    # dropout on: the warm-up must not have moved the generators the run draws from
    a = pd.read_csv(tmp_path / "cold" / "oof.csv").iloc[:, 2:].to_numpy()
    b = pd.read_csv(tmp_path / "warmed" / "oof.csv").iloc[:, 2:].to_numpy()
    np.testing.assert_allclose(b, a, atol=1e-4)
    assert warmed["oof"]["mcrmse"] == pytest.approx(cold["oof"]["mcrmse"], abs=1e-5)


def test_auto_takes_flex_for_deberta_on_this_gpu_and_dflash_or_eager_where_attention_dropout_is_on(tiny_deberta_wide):
    from foldtune.training.checks import resolve_attention

    with_dropout = load_config(None, [f"model.name={tiny_deberta_wide}"])        # the config's 0.1
    assert with_dropout.model.attention == "auto"
    # dflash where its package is installed (an optional dependency), else transformers' eager
    from foldtune.models.attention import dflash_device_problem

    expected = "dflash" if dflash_device_problem(torch.device("cuda")) is None else "eager"
    assert resolve_attention(with_dropout, torch.device("cuda")).model.attention == expected
    without = load_config(None, [f"model.name={tiny_deberta_wide}", "model.backbone_dropout=0.0"])
    assert resolve_attention(without, torch.device("cuda")).model.attention == "flex"
