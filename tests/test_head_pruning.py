"""pruning.heads: hard-concrete gates on attention heads, their L0 penalty, heads fixed and
removed at a fold's end, and the pruned checkpoint read back by inference."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import train_tiny_run
from transformers import AutoConfig

from foldtune.checkpoint import load_checkpoint, read_meta
from foldtune.config import ConfigError, load_config
from foldtune.models.head_gates import (INITIAL_LOG_ALPHA, attach_head_gates, deterministic_gates, expected_l0,
                                        kept_heads, prune_heads, sample_gates)
from foldtune.models.regressor import TextRegressor
from foldtune.optim.param_groups import parameter_groups
from foldtune.training.head_pruning import HeadPruning, fix_and_prune
from foldtune.training.step import check_techniques

TARGETS = ["cohesion", "syntax", "vocabulary", "phraseology", "grammar", "conventions"]


# --- the gates' arithmetic ------------------------------------------------------------


def test_sampled_gates_match_hand_computed_values():
    # log_alpha 0, u 1/4, beta 1: s = sigmoid(log(1/3)) = 1/4, z = 1/4 * 1.2 - 0.1 = 0.2
    # log_alpha log 3, u 1/2, beta 1/2: s = sigmoid(2 log 3) = 9/10, z = 0.9 * 1.2 - 0.1 = 0.98
    # log_alpha 0, u 0.99, beta 1: s = 0.99, 0.99 * 1.2 - 0.1 = 1.088, clamped to 1
    # log_alpha 0, u 0.05, beta 1: 0.05 * 1.2 - 0.1 = -0.04, clamped to 0
    assert sample_gates(torch.tensor([0.0]), 1.0, torch.tensor([0.25])).item() == pytest.approx(0.2, abs=1e-6)
    assert sample_gates(torch.tensor([math.log(3)]), 0.5, torch.tensor([0.5])).item() == pytest.approx(0.98, abs=1e-6)
    assert sample_gates(torch.tensor([0.0, 0.0]), 1.0, torch.tensor([0.99, 0.05])).tolist() == [1.0, 0.0]


def test_expected_l0_and_the_deterministic_gate_match_hand_computed_values():
    # beta 1: sigmoid(log_alpha - log(0.1 / 1.1)) = sigmoid(log_alpha + log 11)
    assert expected_l0(torch.tensor([0.0]), 1.0).item() == pytest.approx(11 / 12, abs=1e-6)
    assert expected_l0(torch.tensor([-math.log(11)]), 1.0).item() == pytest.approx(0.5, abs=1e-6)
    # beta 2/3, log_alpha 0: 1 / (1 + 11^(-2/3))
    assert expected_l0(torch.tensor([0.0]), 2 / 3).item() == pytest.approx(1 / (1 + 11 ** (-2 / 3)), abs=1e-6)
    # sigmoid(0) * 1.2 - 0.1 = 0.5; sigmoid(log 3) = 3/4 -> 0.8; the start value opens fully
    assert deterministic_gates(torch.tensor([0.0, math.log(3), INITIAL_LOG_ALPHA])).tolist() == pytest.approx(
        [0.5, 0.8, 1.0], abs=1e-6)


def test_fixed_gates_keep_the_target_by_log_alpha_or_those_above_one_half():
    log_alpha = torch.tensor([[0.3, -2.0], [1.5, 0.3]])
    assert kept_heads(log_alpha, 2).tolist() == [[1.0, 0.0], [1.0, 0.0]]      # a tie goes to the lower index
    assert kept_heads(log_alpha, 3).tolist() == [[1.0, 0.0], [1.0, 1.0]]
    # deterministic gates: 0.613, 0.044, 0.871, 0.613 -> above 0.5: three
    assert kept_heads(log_alpha, None).tolist() == [[1.0, 0.0], [1.0, 1.0]]


# --- the gates on a model ---------------------------------------------------------------


def _model(folder, **pruning) -> TextRegressor:
    overrides = ["pruning.heads.enabled=true", "model.attention=eager",
                 *[f"pruning.heads.{k}={v}" for k, v in pruning.items()]]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = TextRegressor.from_backbone_config(AutoConfig.from_pretrained(str(folder)), cfg.model, 3,
                                               torch.device("cpu"))
    attach_head_gates(model, cfg.pruning.heads)
    return model.eval()


def _inputs(vocab: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _query(model: TextRegressor, layer: int):
    attention = model.backbone.encoder.layer[layer].attention.self
    return getattr(attention, "query", None) or attention.query_proj


@pytest.fixture(params=["bert", "deberta"])
def backbone(request, tiny_bert, tiny_deberta):
    return tiny_bert if request.param == "bert" else tiny_deberta


def _head_projections(model: TextRegressor, layer: int) -> list[torch.nn.Linear]:
    attention = model.backbone.encoder.layer[layer].attention.self
    names = ("query", "key", "value") if hasattr(attention, "query") else ("query_proj", "key_proj", "value_proj")
    return [getattr(attention, name) for name in names]


def test_a_gate_fixed_at_zero_makes_the_output_independent_of_its_head(backbone):
    model = _model(backbone)
    model.head_gates.fix(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    inputs = _inputs(model.config.vocab_size)
    size = _query(model, 0).out_features // 2

    def push(rows: slice) -> None:          # the head's query, key and value weights
        for linear in _head_projections(model, 0):
            linear.weight[rows] += torch.randn(size, linear.in_features, generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        before = model(**inputs)
        push(slice(size, None))             # head 1 of layer 0: closed
        assert torch.equal(model(**inputs), before)
        push(slice(0, size))                # head 0 of layer 0: open
        assert (model(**inputs) - before).abs().max() > 1e-3


def test_open_gates_change_nothing_and_learning_gates_draw_in_training_only(backbone):
    model = _model(backbone)
    inputs = _inputs(model.config.vocab_size)
    with torch.no_grad():
        model.head_gates.mode = "open"
        plain = model(**inputs)
        model.head_gates.mode = "learn"         # log_alpha 3: every deterministic gate is exactly 1
        assert torch.equal(model(**inputs), plain)
        model.head_gates.log_alpha.fill_(0.0)   # deterministic 0.5 each
        assert (model(**inputs) - plain).abs().max() > 1e-3


def test_the_pruned_model_predicts_what_the_gated_model_predicted(backbone):
    model = _model(backbone)
    with torch.no_grad():        # layer 0 loses head 1; layer 1 both (it keeps a silenced head)
        model.head_gates.log_alpha.copy_(torch.tensor([[2.0, -3.0], [-1.0, -2.0]]))
    inputs = _inputs(model.config.vocab_size)
    model.head_gates.fix(kept_heads(model.head_gates.log_alpha, None))
    with torch.no_grad():
        gated = model(**inputs)
        full = _query(model, 0).out_features
        done = fix_and_prune(model, load_config(None, ["pruning.heads.enabled=true"]).pruning.heads)
        assert done == {"kept": 1, "of": 4, "closed": {"0": [1], "1": [0, 1]}}
        assert not hasattr(model, "head_gates") and "head_gates.log_alpha" not in model.state_dict()
        assert (_query(model, 0).out_features, _query(model, 1).out_features) == (full // 2, full // 2)
        torch.testing.assert_close(model(**inputs), gated, rtol=0, atol=1e-5)


def test_prune_heads_removes_the_rows_and_columns_of_the_heads_named(tiny_bert):
    model = _model(tiny_bert)
    layer = model.backbone.encoder.layer[0]
    query, dense = layer.attention.self.query.weight.clone(), layer.attention.output.dense.weight.clone()
    prune_heads(model.backbone, {0: [0]})
    size = query.shape[0] // 2
    assert torch.equal(layer.attention.self.query.weight, query[size:])
    assert torch.equal(layer.attention.output.dense.weight, dense[:, size:])
    assert (layer.attention.self.num_attention_heads, layer.attention.self.pruned_heads) == (1, [0])


# --- the penalty and the optimizer ----------------------------------------------------------


def test_the_gates_learn_in_their_own_group_without_weight_decay(tiny_bert):
    model = _model(tiny_bert, lr=0.25)
    cfg = load_config(None, ["training.weight_decay=0.01"]).training
    groups = {g["name"]: g for g in parameter_groups(model, cfg)}
    assert groups["head_gates_no_decay"]["params"] == [model.head_gates.log_alpha]
    assert (groups["head_gates_no_decay"]["lr"], groups["head_gates_no_decay"]["weight_decay"]) == (0.25, 0.0)
    assert "head_gates" not in groups
    assert all(model.head_gates.log_alpha is not p for name, g in groups.items() if name != "head_gates_no_decay"
               for p in g["params"])


def _penalised_steps(model, hook: HeadPruning, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(parameter_groups(model, load_config(None, []).training))
    inputs = _inputs(model.config.vocab_size)
    labels = torch.zeros(3, 3)
    model.train()
    hook.start_epoch(0)
    expected = [model.head_gates.expected_open().item()]
    for _ in range(steps):
        loss, _ = hook.around_forward(inputs, lambda b: (((model(**b) - labels) ** 2).mean(), None))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append(model.head_gates.expected_open().item())
    return expected


def test_the_penalty_pushes_the_expected_number_of_open_heads_down(tiny_bert):
    model = _model(tiny_bert, l0_lambda=10.0, lr=0.5)
    hook = HeadPruning(model.head_gates, load_config(None, ["pruning.heads.enabled=true",
                                                            "pruning.heads.l0_lambda=10.0"]).pruning.heads)
    expected = _penalised_steps(model, hook, 1)
    # Adam's first step moves each log_alpha by its rate against its gradient's sign: 3 -> 2.5
    assert model.head_gates.log_alpha.flatten().tolist() == pytest.approx([2.5] * 4, abs=1e-6)
    assert expected == pytest.approx([4 * expected_l0(torch.tensor(a), 2 / 3).item() for a in (3.0, 2.5)])
    expected += _penalised_steps(model, hook, 4)[1:]
    assert all(b < a for a, b in zip(expected, expected[1:]))
    assert (model.head_gates.log_alpha < 1.5).all()


def test_with_a_target_the_penalty_is_the_distance_to_it(tiny_bert):
    model = _model(tiny_bert)
    cfg = load_config(None, ["pruning.heads.enabled=true", "pruning.heads.l0_lambda=0.5",
                             "pruning.heads.target_sparsity=0.75"]).pruning.heads
    hook = HeadPruning(model.head_gates, cfg)
    assert hook.target == 1          # a quarter of 4 heads kept
    open_heads = 4 * expected_l0(torch.tensor(3.0), 2 / 3).item()
    assert hook.penalty().item() == pytest.approx(0.5 * (open_heads - 1))
    with torch.no_grad():
        model.head_gates.log_alpha.fill_(-20.0)     # every head all but closed: below the target
    assert hook.penalty().item() == pytest.approx(0.5 * 1.0, abs=1e-6)


def test_before_start_epoch_the_gates_are_open_and_nothing_is_added(tiny_bert):
    model = _model(tiny_bert)
    cfg = load_config(None, ["pruning.heads.enabled=true", "pruning.heads.start_epoch=2",
                             "training.epochs=2"]).pruning.heads
    hook = HeadPruning(model.head_gates, cfg)
    hook.start_epoch(0)
    assert (hook.acting, model.head_gates.mode) == (False, "open")
    loss, _ = hook.around_forward({}, lambda b: (torch.tensor(1.5), None))
    assert loss.item() == 1.5
    hook.start_epoch(1)
    assert (hook.acting, model.head_gates.mode) == (True, "learn")
    loss, _ = hook.around_forward({}, lambda b: (torch.tensor(1.5), None))
    assert loss.item() == pytest.approx(1.5 + 0.01 * 4 * expected_l0(torch.tensor(3.0), 2 / 3).item())


def test_from_fix_epoch_the_gates_are_the_targets_mask_and_nothing_is_added(tiny_bert):
    model = _model(tiny_bert)
    cfg = load_config(None, ["pruning.heads.enabled=true", "pruning.heads.target_heads=2",
                             "pruning.heads.fix_epoch=2", "training.epochs=3"]).pruning.heads
    hook = HeadPruning(model.head_gates, cfg)
    with torch.no_grad():
        model.head_gates.log_alpha.copy_(torch.tensor([[0.5, 2.0], [1.0, -1.0]]))
    hook.start_epoch(0)
    assert (hook.acting, model.head_gates.mode) == (True, "learn")
    hook.start_epoch(1)
    # the two heads of the largest log_alpha, as fix_and_prune keeps them at the end
    assert (hook.acting, model.head_gates.mode) == (False, "fixed")
    assert model.head_gates.mask.tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert model.head_gates.gates().tolist() == [[0.0, 1.0], [1.0, 0.0]]
    loss, _ = hook.around_forward({}, lambda b: (torch.tensor(1.5), None))
    assert loss.item() == 1.5
    # fixed once: a later epoch (or log_alpha moved meanwhile) keeps the mask it trains with
    with torch.no_grad():
        model.head_gates.log_alpha.copy_(torch.tensor([[3.0, -3.0], [3.0, -3.0]]))
    hook.start_epoch(2)
    assert model.head_gates.mask.tolist() == [[0.0, 1.0], [1.0, 0.0]]


# --- what is refused ---------------------------------------------------------------------


@pytest.mark.parametrize("overrides, expected", [
    (["averaging.method=ema"], "pruning.heads.enabled: true cannot be combined with averaging.method: ema (an average "
                               "of the gates' log_alpha is not the gates any model was evaluated with): change those "
                               "or set pruning.heads.enabled=false"),
    (["model.type=tfidf_ridge"], "pruning.heads.enabled: true cannot be combined with model.type: tfidf_ridge (it has "
                                 "no attention heads): change those or set pruning.heads.enabled=false"),
    (["model.attention=dflash"], "pruning.heads.enabled: true cannot be combined with model.attention: dflash (its "
                                 "encoder bypasses the gated output projection): change those or set "
                                 "pruning.heads.enabled=false"),
    (["pruning.heads.start_epoch=3", "training.epochs=2"],
     "pruning.heads.start_epoch: 3 is after the last epoch (training.epochs: 2): the gates would never learn"),
    (["pruning.heads.fix_epoch=3", "training.epochs=2"],
     "pruning.heads.fix_epoch: 3 is after the last epoch (training.epochs: 2): no epoch would train the pruned "
     "model; set it to an epoch <= training.epochs, or null to fix the gates at the fold's end"),
    (["training.cuda_graphs=true", "training.precision=bf16"],
     "training.cuda_graphs: true cannot be combined with pruning.heads.enabled: true: switch those off or set "
     "training.cuda_graphs: false"),
])
def test_what_cannot_prune_heads_is_refused_before_training(overrides, expected):
    cfg = load_config(None, ["pruning.heads.enabled=true", *overrides])
    with pytest.raises(ConfigError) as refused:
        check_techniques(cfg)
    assert str(refused.value) == expected
    check_techniques(load_config(None, overrides))      # without pruning: nothing refused


def test_a_data_parallel_launch_is_refused_and_a_fold_parallel_one_is_not():
    from foldtune.training.distributed import check_launch

    cfg = load_config(None, ["pruning.heads.enabled=true", "training.batch_size=8"])
    with pytest.raises(ConfigError, match="pruning.heads.enabled: true cannot train data-parallel"):
        check_launch(cfg, 2, fold_parallel=False)
    check_launch(cfg, 2, fold_parallel=True)


def test_bad_pruning_keys_fail_as_other_sections_do(tiny_bert):
    with pytest.raises(ConfigError, match="did you mean 'pruning.heads.target_heads'"):
        load_config(None, ["pruning.heads.target_head=3"])
    with pytest.raises(ConfigError, match="'pruning.heads.target_sparsity' set on the command line: expected null "
                                          "when pruning.heads.target_heads is set"):
        load_config(None, ["pruning.heads.target_heads=3", "pruning.heads.target_sparsity=0.5"])
    with pytest.raises(ConfigError, match="'pruning.heads.fix_epoch' set on the command line: expected null or an "
                                          r"epoch after pruning.heads.start_epoch \(2\): the gates learn before they "
                                          "are fixed, got 2"):
        load_config(None, ["pruning.heads.start_epoch=2", "pruning.heads.fix_epoch=2"])
    with pytest.raises(ConfigError, match=r"target_heads: 5 is more heads than the backbone has \(2 layers x 2 "):
        _model(tiny_bert, target_heads=5)


# --- a run, through the real entry points -------------------------------------------------


@pytest.fixture(scope="module")
def pruned_run(tiny_bert, tmp_path_factory):
    work = tmp_path_factory.mktemp("pruned")
    run = train_tiny_run(tiny_bert, work, "pruned", "pruning.heads.enabled=true", "pruning.heads.target_heads=2",
                         "pruning.heads.l0_lambda=0.1", "training.precision=fp32")
    return work, run


def test_a_run_saves_pruned_checkpoints_whose_predictions_are_its_oof(pruned_run):
    from foldtune.data.dataset import TextDataset, encode_texts
    from foldtune.runtime.precision import resolve_precision
    from foldtune.runtime.predict import predict
    from transformers import AutoTokenizer

    work, run = pruned_run
    train = pd.read_csv(work / "train.csv").set_index("text_id")
    for fold in (0, 1):
        best = run / f"fold_{fold}" / "best"
        meta = read_meta(best)
        assert (meta["head_gates"]["kept"], meta["head_gates"]["of"]) == (2, 4)
        closed = meta["head_gates"]["closed"]
        assert sum(len(heads) for heads in closed.values()) == 2
        # a layer closed whole keeps its first head, silenced: the others are removed
        assert meta["pruned_heads"] == {layer: heads[1:] if len(heads) == 2 else heads
                                        for layer, heads in closed.items()}
        model, _ = load_checkpoint(best)
        kept = sum(layer.attention.self.query.out_features for layer in model.backbone.encoder.layer) // 16
        assert kept == 4 - sum(len(v) for v in meta["pruned_heads"].values())
        oof = pd.read_csv(run / f"fold_{fold}" / "oof.csv")
        tokenizer = AutoTokenizer.from_pretrained(str(best))
        dataset = TextDataset(encode_texts(tokenizer, train.loc[oof["text_id"], "full_text"].tolist(), 48,
                                           "head", 0.25).input_ids)
        preds = predict(model, dataset, 32, tokenizer.pad_token_id, torch.device("cpu"),
                        resolve_precision("fp32", torch.device("cpu")), 1)
        np.testing.assert_allclose(preds, oof[TARGETS].to_numpy(dtype=np.float32), rtol=0, atol=1e-5)
        metrics = pd.read_csv(run / f"fold_{fold}" / "metrics.csv")
        assert metrics["best"].fillna("").tolist()[-1] == "pruned"


def test_with_fix_epoch_the_best_checkpoint_is_a_pruned_models_and_pruning_it_changes_no_score(
        tiny_bert, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="foldtune")
    run = train_tiny_run(tiny_bert, tmp_path, "fixed", "pruning.heads.enabled=true", "pruning.heads.target_heads=2",
                         "pruning.heads.l0_lambda=0.1", "pruning.heads.fix_epoch=2", "training.epochs=2",
                         "training.precision=fp32")
    for fold in (0, 1):
        meta = read_meta(run / f"fold_{fold}" / "best")
        metrics = pd.read_csv(run / f"fold_{fold}" / "metrics.csv")
        # 12 training rows in batches of 6: 2 steps an epoch, each evaluated; the best of epoch 2's steps
        trained = metrics[metrics["best"].fillna("") != "pruned"]
        assert trained["step"].tolist() == [1, 2, 3, 4]
        assert meta["step"] == trained.loc[trained["step"] > 2].sort_values("val_mcrmse", kind="stable")["step"].iloc[0]
        # fixed gates are the pruned model's: scored again, the same to float rounding
        assert meta["val_mcrmse"] == pytest.approx(meta["head_gates"]["val_mcrmse_gated"], abs=1e-6)
        assert meta["head_gates"]["kept"] == 2
    fixed = [r.getMessage() for r in caplog.records if "the gates fixed" in r.getMessage()]
    assert len(fixed) == 2 and all("epoch 2 trains 2 of 4 attention heads" in line for line in fixed)


@pytest.mark.parametrize("best_step, forgotten", [(2, True), (0, True), (3, False), (-1, False)])
def test_a_best_chosen_before_the_gates_were_fixed_is_forgotten_and_a_resumed_ones_is_not(tiny_bert, best_step,
                                                                                          forgotten):
    from types import SimpleNamespace

    from foldtune.training.trainer import FoldTrainer

    model = _model(tiny_bert, target_heads=2)
    cfg = load_config(None, ["pruning.heads.enabled=true", "pruning.heads.fix_epoch=2", "training.epochs=3"])
    trainer = SimpleNamespace(model=model, cfg=cfg, best_score=0.5, best_step=best_step, steps_per_epoch=2, unit="0")
    FoldTrainer._choose_best_from_pruned(trainer, 0)        # gates still learning: nothing forgotten
    assert (trainer.best_score, trainer.best_step) == (0.5, best_step)
    model.head_gates.fix(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # epoch 2 (from 0: 1) starts after step 2; a best of step 3 was the pruned model's, kept
    # from before a stop, and at the start of epoch 3 too; -1: none yet
    FoldTrainer._choose_best_from_pruned(trainer, 1)
    assert (trainer.best_score, trainer.best_step) == ((math.inf, -1) if forgotten else (0.5, best_step))
    if not forgotten:
        FoldTrainer._choose_best_from_pruned(trainer, 2)
        assert (trainer.best_score, trainer.best_step) == (0.5, best_step)


def test_infer_reads_a_pruned_run(pruned_run, monkeypatch):
    from foldtune.cli import infer_main
    from foldtune.inference import predict_run

    work, run = pruned_run
    monkeypatch.chdir(work)
    assert infer_main(["--run", str(run), "--test", "test.csv", "--out", "submission.csv", "--no-clip",
                       "--device", "cpu"]) == 0
    submission = pd.read_csv(work / "submission.csv")
    texts = pd.read_csv(work / "test.csv")["full_text"].tolist()
    preds, _ = predict_run(run, texts, device="cpu")
    assert len(submission) == len(texts)
    np.testing.assert_allclose(submission[TARGETS].to_numpy(), preds, rtol=0, atol=1e-5)


def test_a_compressed_pruned_run_records_the_heads_of_the_layers_it_keeps(pruned_run, tmp_path):
    from foldtune.compress import compress_run

    _, run = pruned_run
    compress_run(run, tmp_path / "small", keep=[1], rank=4)
    for fold in (0, 1):
        pruned = read_meta(run / f"fold_{fold}" / "best")["pruned_heads"]
        meta = read_meta(tmp_path / "small" / f"fold_{fold}" / "best")
        # layer 1 is the only one left, now layer 0
        assert meta.get("pruned_heads", {}) == ({"0": pruned["1"]} if "1" in pruned else {})
        model, _ = load_checkpoint(tmp_path / "small" / f"fold_{fold}" / "best")
        heads = model.backbone.encoder.layer[0].attention.self.num_attention_heads
        assert heads == 2 - len(pruned.get("1", []))


def test_a_fold_stopped_after_its_pruned_checkpoint_resumes_to_the_same_oof(tiny_bert, tmp_path, monkeypatch):
    """The process died after the pruned checkpoint was written and before the fold's result:
    the state of the end of epoch 1 is still there. The resume trains epoch 2 again; where no
    step of it beats the saved best, the checkpoint, already pruned, stays the fold's."""
    from foldtune.training import prepared
    from foldtune.training.resume import resume_run
    from foldtune.training.state import state_files
    from foldtune.training.trainer import FoldTrainer

    keep = ("pruning.heads.enabled=true", "pruning.heads.target_heads=2", "pruning.heads.l0_lambda=0.1",
            "training.precision=fp32", "training.epochs=2", "folds.n_splits=2")
    with monkeypatch.context() as patch:
        patch.setattr(prepared, "remove_states", lambda fold_dir, wait=True: None)   # as if it never came
        run = train_tiny_run(tiny_bert, tmp_path, "pruned", *keep)
    assert state_files(run / "fold_0")
    finished = pd.read_csv(run / "oof.csv")
    gates = read_meta(run / "fold_0" / "best")["head_gates"]
    for path in [run / "fold_0" / "result.json", run / "fold_0" / "oof.csv", run / "oof.csv", run / "scores.json"]:
        path.unlink()
    monkeypatch.setattr(FoldTrainer, "_evaluate_and_keep_best", lambda self, epoch, train_loss: None)
    resume_run(run)
    np.testing.assert_allclose(pd.read_csv(run / "oof.csv")[TARGETS].to_numpy(), finished[TARGETS].to_numpy(),
                               rtol=0, atol=1e-6)
    assert read_meta(run / "fold_0" / "best")["head_gates"] == gates


def test_a_fold_stopped_while_training_its_pruned_model_resumes_to_the_same_oof(tiny_bert, tmp_path, monkeypatch,
                                                                                caplog):
    """Stopped in epoch 2 of 3 with pruning.heads.fix_epoch 2, after that epoch's first best:
    the resume fixes the same gates again and keeps that best (it was the pruned model's)."""
    import signal

    from foldtune.data.demo import make_demo
    from foldtune.training import stopping
    from foldtune.training.cross_validation import run_cross_validation
    from foldtune.training.resume import resume_run
    from foldtune.training.state import load_state, state_files
    from foldtune.training.trainer import FoldTrainer

    caplog.set_level("INFO", logger="foldtune")     # the fold's train.log gets the info lines
    make_demo(n_train=24, n_test=0, seed=9)[0].to_csv(tmp_path / "train.csv", index=False)
    # 12 training rows at batch 4: 3 steps an epoch, each evaluated, a state saved at each
    cfg = load_config(None, [f"data.train_file={tmp_path / 'train.csv'}", "data.test_file=null", "data.max_len=40",
                             "folds.n_splits=2", f"model.name={tiny_bert}", "training.epochs=3",
                             "training.batch_size=4", "training.eval_steps=1", "training.save_state_steps=1",
                             "training.lr=1e-3", "training.precision=fp32", "pruning.heads.enabled=true",
                             "pruning.heads.target_heads=2", "pruning.heads.l0_lambda=0.1",
                             "pruning.heads.fix_epoch=2"])
    reference = tmp_path / "reference"
    run_cross_validation(cfg, reference)
    original = FoldTrainer._optimizer_step

    def stepping(self):
        original(self)
        if self.data.fold == 1 and self.step == 5:
            stopping.request_stop(signal.SIGTERM)

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(FoldTrainer, "_optimizer_step", stepping)
        with pytest.raises(stopping.TrainingInterrupted):
            run_cross_validation(cfg, run)
    stopping.clear_stop_request()
    saved = load_state(state_files(run / "fold_1")[-1])
    assert saved["step"] == 5 and saved["best"]["step"] >= 4      # a best of the pruned model's steps
    resume_run(run)
    np.testing.assert_allclose(pd.read_csv(run / "oof.csv").iloc[:, 2:].to_numpy(),
                               pd.read_csv(reference / "oof.csv").iloc[:, 2:].to_numpy(), rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(pd.read_csv(run / "fold_1" / "metrics.csv"),
                                  pd.read_csv(reference / "fold_1" / "metrics.csv"), rtol=0, atol=1e-6)
    assert read_meta(run / "fold_1" / "best")["step"] == read_meta(reference / "fold_1" / "best")["step"]
    # the best was forgotten once, as epoch 2 began; the resume, in epoch 2, kept step 4's
    assert (run / "fold_1" / "train.log").read_text().count("is chosen again from here") == 1
