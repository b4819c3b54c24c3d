"""data.long_text: windows: a text read whole as overlapping windows, pooled across them
with each token counted once; and the old data.truncation key of saved runs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from conftest import train_tiny_run
from foldtune.config import ConfigError, DataConfig, ModelConfig, config_from_dict, load_config
from foldtune.data.collate import DynamicPadding, fixed_window_shapes, model_inputs, window_batch
from foldtune.data.dataset import encode_data
from foldtune.data.windows import Windows
from foldtune.models.pooling import POOLINGS
from foldtune.models.regressor import TextRegressor
from foldtune.training.graphs import filled_texts

SENTENCE = "the quick brown fox jumps over the lazy dog"      # 9 tokens for MiniLM's tokenizer
# 27 and 19 tokens: three and two windows of max_len 16
LONG = ("my friend told me that school should start later because students are tired in the morning and cannot "
        "learn well when they sleep in class every day")
MIDDLE = "online classes let students work at their own pace at home, but many miss their friends and teachers"
WINDOWS16 = DataConfig(max_len=16, long_text="windows")      # 14 content tokens a window, stride 10


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    return AutoTokenizer.from_pretrained(str(tiny_bert))


def _model(tiny_bert, pooling: str) -> TextRegressor:
    torch.manual_seed(0)
    model = TextRegressor.from_pretrained(ModelConfig(name=str(tiny_bert), pooling=pooling, pooling_layers=2), 2)
    return model.eval()


def _ids(tokenizer, texts: list[str], data: DataConfig = WINDOWS16) -> list[list[int]]:
    return encode_data(tokenizer, texts, data).input_ids


# --- splitting a text into windows ----------------------------------------------------


def test_windows_of_a_token_list_start_stride_apart_the_last_aligned_to_the_end():
    windows = Windows(max_len=6, n_prefix=1, n_suffix=1, stride=3, max_windows=3)     # 4 content tokens a window
    text = lambda n: [101] + list(range(1, n + 1)) + [102]     # noqa: E731
    assert windows.split(text(4)) == [[101, 1, 2, 3, 4, 102]]
    # 5 tokens: a second window, aligned to the end (start 1, not 3)
    assert windows.split(text(5)) == [[101, 1, 2, 3, 4, 102], [101, 2, 3, 4, 5, 102]]
    assert windows.split(text(7)) == [[101, 1, 2, 3, 4, 102], [101, 4, 5, 6, 7, 102]]
    # 8 tokens: starts 0, 3, then the last at 8 - 4 = 4
    assert windows.split(text(8)) == [[101, 1, 2, 3, 4, 102], [101, 4, 5, 6, 7, 102], [101, 5, 6, 7, 8, 102]]
    # 10 tokens fill the 3 windows exactly; 12 are cut after the third window (tokens 11, 12 unread)
    full = [[101, 1, 2, 3, 4, 102], [101, 4, 5, 6, 7, 102], [101, 7, 8, 9, 10, 102]]
    assert windows.split(text(10)) == full and windows.split(text(12)) == full
    assert windows.capacity == 10


def test_the_default_stride_is_three_quarters_of_a_windows_content_and_encoding_keeps_what_windows_read(tokenizer):
    windows = Windows.of(tokenizer, DataConfig(max_len=16, long_text="windows", max_windows=2))
    assert (windows.room, windows.stride, windows.capacity) == (14, 10, 24)
    ids = _ids(tokenizer, [" ".join([SENTENCE] * 4)], DataConfig(max_len=16, long_text="windows", max_windows=2))[0]
    body = tokenizer(" ".join([SENTENCE] * 4), add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.cls_token_id] + body[:24] + [tokenizer.sep_token_id]
    assert Windows.of(tokenizer, DataConfig(max_len=16)) is None      # truncate: no windows


def test_a_window_batch_holds_each_texts_windows_in_turn_and_a_stitch_plan(tokenizer):
    windows = Windows(max_len=6, n_prefix=1, n_suffix=1, stride=3, max_windows=3)
    batch = window_batch([[101, 1, 2, 3, 4, 5, 102], [101, 7, 102]], windows, 0)
    assert batch["input_ids"].tolist() == [[101, 1, 2, 3, 4, 102], [101, 2, 3, 4, 5, 102], [101, 7, 102, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1] * 6, [1, 1, 1, 0, 0, 0]]
    # text 0, position 2 (token 2) is read by window 0 at 2 and window 1 at 1, half each
    assert batch["stitch_window"][0, 2].tolist() == [0, 1] and batch["stitch_position"][0, 2].tolist() == [2, 1]
    assert batch["stitch_weight"][0].tolist() == [[.5, .5], [1, 0], [.5, .5], [.5, .5], [.5, .5], [1, 0], [.5, .5]]
    # text 1: one window, weight 1 at its 3 positions, nothing past them
    assert batch["stitch_weight"][1].tolist() == [[1, 0], [1, 0], [1, 0]] + [[0, 0]] * 4
    assert batch["stitch_window"][1, :3, 0].tolist() == [2, 2, 2]


# --- pooling across windows -------------------------------------------------------------


@pytest.mark.parametrize("pooling", sorted(POOLINGS.names()))
def test_a_text_of_one_window_pools_exactly_as_the_plain_path(tiny_bert, tokenizer, pooling):
    model = _model(tiny_bert, pooling)
    ids = _ids(tokenizer, [SENTENCE])[0]
    assert len(ids) == 11
    with torch.no_grad():
        plain = model(**model_inputs(DynamicPadding(0)([{"input_ids": ids}])))
        windowed = model(**model_inputs(window_batch([ids], Windows.of(tokenizer, WINDOWS16), 0)))
    assert torch.equal(plain, windowed)


def _states_and_pooled(model, batch):
    """(the backbone's last states of each window, the pooling's output) of one forward pass."""
    seen = {}
    hooks = [model.backbone.register_forward_hook(lambda m, i, out: seen.update(states=out.last_hidden_state)),
             model.pooling.register_forward_hook(lambda m, i, out: seen.update(pooled=out))]
    with torch.no_grad():
        model(**model_inputs(batch))
    for hook in hooks:
        hook.remove()
    return seen["states"], seen["pooled"]


def test_overlapping_tokens_count_once_and_the_windows_cls_and_sep_are_one_token_each(tiny_bert, tokenizer):
    windows = Windows.of(tokenizer, WINDOWS16)
    ids = _ids(tokenizer, [" ".join([SENTENCE] * 3)])[0]           # 27 content tokens: windows at 0, 10, 13
    assert windows.starts(len(ids) - 2) == [0, 10, 13]
    states = {}
    for pooling in ("mean", "cls", "max"):
        states[pooling], pooled = _states_and_pooled(_model(tiny_bert, pooling), window_batch([ids], windows, 0))
        # by hand: each position of the text from every window that reads it
        per_token = []
        cls = torch.stack([states[pooling][w, 0] for w in range(3)]).mean(dim=0)
        sep = torch.stack([states[pooling][w, 15] for w in range(3)]).mean(dim=0)
        for i in range(27):
            reads = [states[pooling][w, 1 + i - start] for w, start in enumerate([0, 10, 13])
                     if start <= i < start + 14]
            assert len(reads) == ([1] * 10 + [2] * 3 + [3] + [2] * 10 + [1] * 3)[i]
            per_token.append(torch.stack(reads).mean(dim=0))
        text = torch.stack([cls, *per_token, sep])                 # 29 tokens, each once
        expected = {"mean": text.mean(dim=0), "cls": cls, "max": text.amax(dim=0)}[pooling]
        torch.testing.assert_close(pooled[0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "attention", "weighted_layers", "concat_cls"])
def test_texts_of_one_and_three_windows_in_a_batch_each_get_their_own_output(tiny_bert, tokenizer, pooling):
    model = _model(tiny_bert, pooling)
    windows = Windows.of(tokenizer, WINDOWS16)
    texts = _ids(tokenizer, ["a short one", LONG, SENTENCE, MIDDLE])
    assert [len(windows.split(ids)) for ids in texts] == [1, 3, 1, 2]
    together = _states_and_pooled(model, window_batch(texts, windows, 0))[1]
    alone = torch.cat([_states_and_pooled(model, window_batch([ids], windows, 0))[1] for ids in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    # the texts' pooled vectors differ far beyond that: a mixed-up text would show
    assert torch.cdist(alone, alone).add(torch.eye(4)).min() > 1e-3


# --- fixed shapes for CUDA graphs (training/graphs.py) ------------------------------------


def _mixed_batch(tokenizer):
    windows = Windows.of(tokenizer, WINDOWS16)
    texts = _ids(tokenizer, ["a short one", LONG, SENTENCE, MIDDLE])
    batch = window_batch(texts, windows, 0)
    batch["labels"] = torch.tensor([[1.0, 2.0], [3.0, 4.0], [2.5, 3.5], [4.0, 1.5]])
    return windows, batch


def test_a_window_batch_padded_to_graph_shapes_gives_each_text_the_same_output(tiny_bert, tokenizer):
    windows, batch = _mixed_batch(tokenizer)
    assert tuple(batch["input_ids"].shape) == (7, 16) and tuple(batch["stitch_weight"].shape) == (4, 29, 3)
    fixed = fixed_window_shapes(batch, windows.max_windows)
    # 7 windows -> 8 (the stand-in repeats window 0); 29 positions -> 256; 3 reads -> max_windows 4
    assert tuple(fixed["input_ids"].shape) == (8, 16) and tuple(fixed["stitch_weight"].shape) == (4, 256, 4)
    assert torch.equal(fixed["input_ids"][7], batch["input_ids"][0])
    assert fixed["stitch_weight"][:, 29:].abs().sum() == 0 and fixed["stitch_weight"][:, :, 3].abs().sum() == 0
    assert torch.equal(fixed["stitch_weight"][:, :29, :3], batch["stitch_weight"])
    for pooling in sorted(POOLINGS.names()):
        model = _model(tiny_bert, pooling)
        with torch.no_grad():
            torch.testing.assert_close(model(**model_inputs(fixed)), model(**model_inputs(batch)), atol=1e-6, rtol=0)


def test_a_short_window_batch_filled_with_stand_in_texts_trains_as_the_short_batch(tiny_bert, tokenizer):
    from foldtune.losses import build_loss
    from foldtune.config import TrainingConfig

    windows, batch = _mixed_batch(tokenizer)
    short = {key: value for key, value in batch.items()}
    filled = filled_texts(fixed_window_shapes(short, windows.max_windows), 6)
    # windows stay (the stand-ins read them); texts 4 and 5 copy texts 0 and 1 at weight 0
    assert len(filled["input_ids"]) == 8 and len(filled["labels"]) == 6
    assert filled["row_weight"].tolist() == [1, 1, 1, 1, 0, 0]
    assert torch.equal(filled["stitch_window"][4:], filled["stitch_window"][:2])
    loss_fn = build_loss(TrainingConfig(loss="mse"), 2)

    def loss_and_grads(b):
        model = _model(tiny_bert, "mean")      # eval mode: no dropout, the same draws both ways
        loss = loss_fn(model(**model_inputs(b)), b["labels"], b.get("row_weight"))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss_a, grads_a = loss_and_grads(batch)
    loss_b, grads_b = loss_and_grads(filled)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=0)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_a_data_parallel_shard_of_a_window_batch_keeps_each_texts_windows(tiny_bert, tokenizer):
    from foldtune.training.distributed import DataParallel

    model = _model(tiny_bert, "mean")
    windows = Windows.of(tokenizer, WINDOWS16)
    texts = _ids(tokenizer, [" ".join([SENTENCE] * 3), "a short one", " ".join([SENTENCE] * 2)])
    batch = {**window_batch(texts, windows, 0), "labels": torch.zeros(3, 2)}
    ranks = [DataParallel(SimpleNamespace(rank=r, world_size=2, is_main=r == 0)) for r in (0, 1)]
    local = [rank.shard(batch, pad_multiple=1)[0] for rank in ranks]
    assert [len(part["input_ids"]) for part in local] == [3, 3]         # text 0's windows; texts 1 and 2's
    with torch.no_grad():
        whole = model(**model_inputs(batch))
        parts = torch.cat([model(**model_inputs(part)) for part in local])
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=0)
    # a batch of one text: the process without a text of its own runs it weighed zero
    one = {**window_batch(texts[2:], windows, 0), "labels": torch.zeros(1, 2)}
    empty, share = ranks[0].shard(one, 1)
    assert share == 0.0 and empty["input_ids"].shape[0] == 2 and torch.equal(empty["stitch_window"],
                                                                             one["stitch_window"])


# --- a run with windows, and runs saved before long_text ----------------------------------


def _predictions_of_oof_rows(run_dir: Path, train: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    from foldtune.inference import predict_run

    oof = pd.read_csv(run_dir / "oof.csv")
    targets = [c for c in oof.columns if c not in ("text_id", "fold")]
    got = np.empty((len(oof), len(targets)), dtype=np.float32)
    for fold in sorted(oof["fold"].unique()):
        rows = np.flatnonzero(oof["fold"] == fold)
        texts = train.set_index("text_id").loc[oof["text_id"].iloc[rows], "full_text"].tolist()
        got[rows] = predict_run(run_dir, texts, batch_size=5, device="cpu", folds=[int(fold)])[0]
    return got, oof[targets].to_numpy(dtype=np.float32)


def test_a_run_with_windows_trains_and_its_checkpoints_predict_its_oof_again(tiny_bert, tmp_path, monkeypatch):
    read = []           # (widest window, whether a stitch plan came) of each forward pass
    forward = TextRegressor.forward

    def recording(self, input_ids, attention_mask, **stitch):
        read.append((input_ids.shape[1], "stitch_weight" in stitch))
        return forward(self, input_ids, attention_mask, **stitch)

    monkeypatch.setattr(TextRegressor, "forward", recording)
    # the demo essays' 76-140 tokens: 4 to 6 windows of 30 tokens, the longest cut after 6
    run = train_tiny_run(tiny_bert, tmp_path, "windows", "data.long_text=windows", "data.max_len=32",
                         "data.max_windows=6", "training.bucket_batches=true")
    # every step and evaluation read windows of at most max_len tokens, stitched
    assert read and all(stitched for _, stitched in read) and max(width for width, _ in read) == 32
    assert load_config(run / "config.yaml").data.long_text == "windows"
    train = pd.read_csv(tmp_path / "train.csv")
    got, oof = _predictions_of_oof_rows(run, train)
    np.testing.assert_allclose(got, oof, atol=1e-5, rtol=0)


def test_a_run_saved_with_data_truncation_loads_as_long_text_and_predicts(tiny_bert, tmp_path):
    run = train_tiny_run(tiny_bert, tmp_path, "old", "data.long_text=head_tail", "data.max_len=16")
    for saved in [run / "config.yaml", *run.glob("fold_*/best/foldtune.yaml")]:
        text = saved.read_text()
        assert "long_text: head_tail" in text
        saved.write_text(text.replace("long_text: head_tail", "truncation: head_tail"))   # as runs were saved before
    assert load_config(run / "config.yaml").data.long_text == "head_tail"
    got, oof = _predictions_of_oof_rows(run, pd.read_csv(tmp_path / "train.csv"))
    np.testing.assert_allclose(got, oof, atol=1e-5, rtol=0)


@pytest.mark.parametrize("old, new", [("head", "truncate"), ("head_tail", "head_tail")])
def test_the_old_truncation_key_loads_as_long_text(tmp_path, old, new):
    (tmp_path / "config.yaml").write_text(f"data:\n  truncation: {old}\n  head_fraction: 0.5\n")
    data = load_config(tmp_path / "config.yaml").data
    assert (data.long_text, data.head_fraction) == (new, 0.5)
    assert load_config(None, [f"data.truncation={old}"]).data.long_text == new


# --- refusals ---------------------------------------------------------------------------


def test_the_refusals_name_the_key_and_what_it_expects(tokenizer, tiny_bert):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.long_text=windows", "data.max_len=16", "data.window_stride=0"])
    assert str(err.value) == ("config key 'data.window_stride' set on the command line: expected null or an integer "
                              "in [1, data.max_len=16], got 0")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.max_windows=0"])
    assert str(err.value) == "config key 'data.max_windows' set on the command line: expected an integer >= 1, got 0"
    with pytest.raises(ConfigError) as err:
        Windows.of(tokenizer, DataConfig(max_len=16, long_text="windows", window_stride=15))
    assert str(err.value) == ("config key 'data.window_stride': expected null or an integer in [1, 14] "
                              "(data.max_len 16 less 2 special tokens: a longer stride would skip tokens), got 15")
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"truncation": "head", "long_text": "windows"}})
    assert str(err.value) == ("config keys 'data.truncation' and 'data.long_text' are both set; 'data.truncation' is "
                              "the old name of 'data.long_text': keep only the latter")


def test_a_stride_longer_than_a_window_fails_before_the_run_starts(tiny_bert):
    from foldtune.training.checks import check_run

    cfg = load_config(None, [f"model.name={tiny_bert}", "data.long_text=windows", "data.max_len=16",
                             "data.window_stride=15"])
    with pytest.raises(ConfigError, match=r"'data.window_stride': expected null or an integer in \[1, 14\]"):
        check_run(cfg, torch.device("cpu"), 1, False)
