"""Compression: SVD factors that are exactly the truncated SVD, layer subsets that keep
the right weights, and compressed runs that load back and predict the same."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from foldtune.checkpoint import WEIGHTS_FILE, load_checkpoint
from foldtune.compress import main as compress_main
from foldtune.config import load_config
from foldtune.inference import predict_run
from foldtune.models.compress import (LowRankEmbedding, LowRankLinear, compress, count_parameters,
                                      encoder_linear_names, factorise_embedding, factorise_linear, keep_layers,
                                      low_rank)
from foldtune.models.regressor import TextRegressor
from foldtune.models.surgery import encoder_layers

from conftest import REPO


def _model(folder, **model_keys) -> TextRegressor:
    cfg = load_config(None, [f"model.name={folder}"] + [f"model.{k}={v}" for k, v in model_keys.items()])
    torch.manual_seed(0)
    return TextRegressor.from_pretrained(cfg.model, 6).eval()


def _batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 200, (3, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0                 # a padded row
    return ids, mask


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_deberta"])
def test_full_rank_factors_reproduce_the_outputs(backbone, request):
    model = _model(request.getfixturevalue(backbone), pooling="attention")
    ids, mask = _batch()
    with torch.no_grad():
        before = model(ids, mask)
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    linears = encoder_linear_names(model.backbone)
    done = low_rank(model, rank_fraction=1.0, only_if_smaller=False)
    assert encoder_linear_names(model.backbone) == []       # factors are not factorised again
    # every linear layer of each encoder layer (q, k, v, attention output, intermediate,
    # output) and the embeddings, found without names
    assert len(done["linear"]) == len(linears) == 6 * 2 and done["embedding"] == 32
    assert all(isinstance(model.backbone.get_submodule(n), LowRankLinear) for n in linears)
    assert isinstance(model.backbone.get_input_embeddings(), LowRankEmbedding)
    assert not any(isinstance(m, (LowRankLinear, LowRankEmbedding)) for m in model.pooling.modules())
    assert all(torch.equal(head[k], v) for k, v in model.head.state_dict().items())
    with torch.no_grad():
        after = model(ids, mask)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def _truncated(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank], s[rank:]


def test_factors_are_the_best_rank_r_approximation():
    torch.manual_seed(0)
    linear = nn.Linear(40, 48)
    rank = 7
    factorised = factorise_linear(linear, rank)
    assert (factorised.down.weight.shape, factorised.up.weight.shape) == ((7, 40), (48, 7))
    product = (factorised.up.weight @ factorised.down.weight).double()
    best, discarded = _truncated(linear.weight.detach(), rank)
    torch.testing.assert_close(product, best, rtol=0, atol=1e-6)
    # Eckart-Young: the Frobenius error is the norm of the discarded singular values
    error = torch.linalg.norm(linear.weight.detach().double() - product)
    assert error.item() == pytest.approx(torch.linalg.norm(discarded).item(), rel=1e-5)
    assert torch.equal(factorised.up.bias, linear.bias)
    x = torch.randn(5, 40)
    torch.testing.assert_close(factorised(x).double(), x.double() @ best.T + linear.bias.double(), rtol=0, atol=1e-5)

    embedding = nn.Embedding(100, 24, padding_idx=0)
    table = factorise_embedding(embedding, 5)
    product = (table.embed.weight @ table.project.weight.T).double()
    best, discarded = _truncated(embedding.weight.detach(), 5)
    torch.testing.assert_close(product, best, rtol=0, atol=1e-6)
    error = torch.linalg.norm(embedding.weight.detach().double() - product)
    assert error.item() == pytest.approx(torch.linalg.norm(discarded).item(), rel=1e-5)
    tokens = torch.tensor([[3, 0, 99]])
    torch.testing.assert_close(table(tokens).double(), best[tokens], rtol=0, atol=1e-6)
    assert table.padding_idx == 0


def test_parameter_count_follows_the_formula_and_only_smaller_layers_are_factorised(tiny_bert):
    model = _model(tiny_bert)
    shapes = {n: tuple(model.backbone.get_submodule(n).weight.shape) for n in encoder_linear_names(model.backbone)}
    vocab, hidden = model.backbone.get_input_embeddings().weight.shape
    before = count_parameters(model)
    # rank 20: 32 x 32 attention matrices would grow (20 * 64 >= 1024), 64 x 32 ones shrink (20 * 96 < 2048)
    done = low_rank(model, rank=20)
    assert sorted(done["skipped"]) == sorted(n for n, s in shapes.items() if s == (32, 32))
    assert sorted(done["linear"]) == sorted(n for n, s in shapes.items() if s != (32, 32))
    assert len(done["linear"]) == 4 and set(done["linear"].values()) == {20} and done["embedding"] == 20
    saved = sum(o * i - 20 * (o + i) for n, (o, i) in shapes.items() if n in done["linear"])
    saved += vocab * hidden - 20 * (vocab + hidden)
    assert count_parameters(model) == before - saved


def test_keep_layers_keeps_those_layers_weights_in_order(tiny_deberta_4):
    model = _model(tiny_deberta_4)
    layers = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in encoder_layers(model.backbone)]
    outside = {k: v.clone() for k, v in model.state_dict().items() if ".layer." not in k}
    assert keep_layers(model, [3, 0, 2]) == [0, 2, 3]
    assert model.backbone.config.num_hidden_layers == 3
    kept = encoder_layers(model.backbone)
    assert len(kept) == 3
    for new, old in zip(kept, [0, 2, 3]):
        state = new.state_dict()
        assert state.keys() == layers[old].keys()
        assert all(torch.equal(state[k], layers[old][k]) for k in state)
    # embeddings, DeBERTa's relative positions, pooling and head untouched
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in outside.items())
    ids, mask = _batch()
    with torch.no_grad():
        assert model(ids, mask).shape == (3, 6)


def test_bad_ranks_and_layer_indices_fail_clearly(tiny_bert, tiny_runs, tmp_path, capsys):
    model = _model(tiny_bert, pooling="weighted_layers", pooling_layers=2)
    for kwargs, message in [
        ({"rank": 0}, "rank must be a positive integer, got 0"),
        ({"rank": -3}, "rank must be a positive integer, got -3"),
        ({"rank": 33}, "rank 33 is larger than the full rank 32 of embeddings.word_embeddings"),
        ({"rank_fraction": 0.0}, r"rank fraction must be in \(0, 1\]"),
        ({"rank_fraction": 1.5}, r"rank fraction must be in \(0, 1\]"),
        ({"rank": 4, "rank_fraction": 0.5}, "either a rank or a rank fraction"),
        ({}, "either a rank or a rank fraction"),
    ]:
        with pytest.raises(ValueError, match=message):
            low_rank(model, **kwargs)
    with pytest.raises(ValueError, match="rank 33 is larger than the full rank 32 of encoder.layer.0"):
        low_rank(model, rank=33, embedding=False)
    for indices, message in [([], "keep at least one layer"), ([2], r"\[2\] are out of range: the backbone has 2 "
                                                                     r"layers, 0..1"),
                             ([-1, 0], r"\[-1\] are out of range"), ([1, 1], "repeat a layer"),
                             ([1], "the pooling reads the last 2 layers")]:
        with pytest.raises(ValueError, match=message):
            keep_layers(model, indices)
    with pytest.raises(ValueError, match="nothing to compress"):
        compress(model)
    # a refused request leaves the model as it was
    assert not any(isinstance(m, (LowRankLinear, LowRankEmbedding)) for m in model.modules())
    assert len(encoder_layers(model.backbone)) == 2 == model.backbone.config.num_hidden_layers

    _, run_a, _ = tiny_runs
    assert compress_main(["--run", str(run_a), "--out", str(tmp_path / "x"), "--keep-layers", "0,5"]) == 2
    assert "out of range: the backbone has 2 layers" in capsys.readouterr().err
    assert compress_main(["--run", str(run_a), "--out", str(tmp_path / "x"), "--keep-layers", "0,a"]) == 2
    assert "expected layer indices separated by commas" in capsys.readouterr().err
    assert compress_main(["--run", str(run_a), "--out", str(tmp_path / "x"), "--rank", "0"]) == 2
    assert "rank must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_compressed_run_round_trips_through_save_load_and_infer(tiny_runs, tmp_path, capsys):
    from foldtune.cli import infer_main

    runs_dir, run_a, _ = tiny_runs
    out = tmp_path / "run_a_small"
    assert compress_main(["--run", str(run_a), "--out", str(out), "--rank", "8", "--keep-layers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "fold 0: layers 1 of 2 kept; rank 8: embeddings factorised (rank 8), 6 linear layer(s)" in printed
    assert "parameters" in printed and "MB ->" in printed
    summary = json.loads((out / "compress.json").read_text())
    texts = pd.read_csv(runs_dir.parent / "test.csv")["full_text"].tolist()
    for fold in (0, 1):
        source = run_a / f"fold_{fold}" / "best"
        # the same compression in memory: what the saved folder must give back
        expected, _ = load_checkpoint(source)
        compress(expected, [1], 8)
        loaded, meta = load_checkpoint(out / f"fold_{fold}" / "best")
        assert meta["compression"]["kept_layers"] == [1] and "val_mcrmse" not in meta
        assert {tuple(v) for v in meta["low_rank"].values()} == {("linear", 8), ("embedding", 8)}
        assert loaded.state_dict().keys() == expected.state_dict().keys()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.state_dict().items())
        ids, mask = _batch()
        ids = ids.clamp(max=loaded.backbone.config.vocab_size - 1)
        with torch.no_grad():
            assert torch.equal(loaded(ids, mask), expected(ids, mask))
        done = summary["folds"][str(fold)]
        assert done["parameters_after"] == count_parameters(loaded) < done["parameters_before"]
        assert done["bytes_after"] == (out / f"fold_{fold}" / "best" / WEIGHTS_FILE).stat().st_size
        assert done["bytes_after"] < done["bytes_before"]
    preds, _ = predict_run(out, texts, device="cpu")
    again, _ = predict_run(out, texts, device="cpu")
    np.testing.assert_array_equal(preds, again)
    assert not np.allclose(preds, predict_run(run_a, texts, device="cpu")[0], atol=1e-3)
    # infer.py reads the compressed folder like any run
    assert infer_main(["--run", str(out), "--test", str(runs_dir.parent / "test.csv"), "--out",
                       str(tmp_path / "sub.csv"), "--no-clip"]) == 0
    sub = pd.read_csv(tmp_path / "sub.csv")
    np.testing.assert_allclose(sub[list(load_config(out / "config.yaml").data.target_columns)].to_numpy(), preds,
                               rtol=0, atol=1e-6)


def test_benchmark_runs_on_cpu_and_its_uncompressed_row_is_the_oof_score(tiny_runs, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compress_benchmark", REPO / "benchmarks" / "compress.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs_dir, run_a, _ = tiny_runs
    rows_file = tmp_path / "rows.json"
    assert bench.main(["--run", str(run_a), "--fold", "1", "--train", str(runs_dir.parent / "train.csv"),
                       "--ranks", "full", "8", "--layers", "all", "1", "--repeats", "1", "--heal-epochs", "1",
                       "--device", "cpu", "--out-dir", str(tmp_path / "variants"), "--json", str(rows_file)]) == 0
    table = capsys.readouterr().out
    assert "| layers | rank | parameters | checkpoint MB |" in table
    rows = json.loads(rows_file.read_text())
    assert [(r["layers"], r["rank"]) for r in rows] == [("all", "full"), ("all", "8"), ("1", "full"), ("1", "8")]
    # scored as the run scored fold 1: the uncompressed row is its validation score
    fold_result = json.loads((run_a / "scores.json").read_text())["folds"]["1"]
    assert rows[0]["mcrmse"] == pytest.approx(fold_result["mcrmse"], abs=1e-5)
    assert rows[3]["parameters"] < rows[1]["parameters"] < rows[0]["parameters"]
    assert rows[3]["checkpoint_mb"] < rows[0]["checkpoint_mb"]
    assert all(np.isfinite(r["healed_mcrmse"]) for r in rows)
