"""Background writes of checkpoints and states, and the checks around CUDA-graph steps
(the replays themselves are tested on a GPU in test_gpu.py)."""

import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file

from foldtune.checkpoint import checkpoint_job, load_checkpoint
from foldtune.config import Config, ConfigError, ModelConfig, load_config
from foldtune.files import BackgroundWriter
from foldtune.models.regressor import TextRegressor
from foldtune.runtime.precision import resolve_device
from foldtune.runtime.snapshot import Snapshot
from foldtune.training.checks import check_config_against_device


def test_background_jobs_end_in_order_and_their_errors_reach_the_caller():
    writer = BackgroundWriter(max_pending=2)
    done, release = [], threading.Event()
    writer.submit(lambda: (release.wait(5), done.append(1)))
    writer.submit(lambda: done.append(2))   # queued behind job 1: the caller does not wait
    assert done == []
    release.set()
    writer.wait()
    assert done == [1, 2]

    # a third job while two are unfinished: the caller waits for the oldest first
    gate = threading.Event()
    writer.submit(lambda: (gate.wait(5), done.append(3)))
    writer.submit(lambda: done.append(4))
    timer = threading.Timer(0.2, gate.set)
    timer.start()
    writer.submit(lambda: done.append(5))
    assert done[:2] == [1, 2] and 3 in done       # job 3 had ended before submit returned
    writer.wait()
    assert done == [1, 2, 3, 4, 5]

    def failing():
        raise OSError("No space left on device")

    writer.submit(failing)
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    writer.wait()                           # raised once, then clear
    failing_soon = threading.Event()
    writer.submit(lambda: (failing_soon.wait(5), failing()))
    writer.submit(lambda: done.append(6))   # queued behind the failing job: it does not run
    failing_soon.set()
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    writer.submit(failing)
    writer._threads[-1].join()              # the failing job has ended
    with pytest.raises(OSError, match="No space left"):
        writer.submit(lambda: done.append(7))   # the next submit raises it, and its job does not start
    writer.wait()
    assert done == [1, 2, 3, 4, 5]


def test_a_snapshot_is_independent_and_keeps_views_of_one_tensor_one():
    weight = torch.arange(6.0)
    state = {"a": weight, "tied": weight.detach(), "nested": [weight[:3], (7, "x")], "step": 5}
    snapshot = Snapshot(state)
    weight.add_(100)
    copied = snapshot.value()
    assert copied["a"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert copied["a"] is copied["tied"]              # one tensor in, one tensor out
    assert copied["nested"][0].tolist() == [0.0, 1.0, 2.0]
    assert copied["nested"][1] == (7, "x") and copied["step"] == 5


def test_the_walk_of_a_state_maps_other_leaves_once_each():
    from foldtune.runtime.snapshot import _map_leaves, _Slot

    shared = _Slot("buffer", 0)
    state = {"a": shared, "b": [shared, (_Slot("buffer", 1), 3)], "c": torch.zeros(1)}
    calls = []
    filled = _map_leaves(state, lambda slot: calls.append(slot) or f"piece {slot.index}", leaf=_Slot)
    assert filled == {"a": "piece 0", "b": ["piece 0", ("piece 1", 3)], "c": state["c"]}
    assert len(calls) == 2                 # the slot seen twice is mapped once


def test_a_checkpoint_job_writes_the_weights_as_they_were_when_it_was_made(tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    model = TextRegressor.from_pretrained(ModelConfig(name=str(tiny_bert)), 2)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    job = checkpoint_job(tmp_path / "best", model, tokenizer, Config(),
                         {"pooling": "mean", "target_columns": ["a", "b"]})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)                     # training goes on before the write
    job()
    saved = load_file(str(tmp_path / "best" / "model.safetensors"))
    assert set(saved) == set(before)
    for name, value in saved.items():
        assert torch.equal(value, before[name]), name
    loaded, meta = load_checkpoint(tmp_path / "best")
    assert meta["target_columns"] == ["a", "b"]
    assert torch.equal(loaded.state_dict()["backbone.embeddings.word_embeddings.weight"],
                       before["backbone.embeddings.word_embeddings.weight"])


def test_checkpoints_hold_the_tokenizer_files_saved_once(tiny_bert, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    model = TextRegressor.from_pretrained(ModelConfig(name=str(tiny_bert)), 2)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    tokenizer.save_pretrained(tmp_path / "reference")
    saves = []
    original = type(tokenizer).save_pretrained

    def counted(self, *args, **kwargs):
        saves.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "save_pretrained", counted)
    for name in ("first", "second"):
        checkpoint_job(tmp_path / name, model, tokenizer, Config(), {"pooling": "mean", "target_columns": ["a", "b"]})()
    assert len(saves) == 1              # the files are kept from the first save
    reference = sorted(p.name for p in (tmp_path / "reference").iterdir())
    for name in ("first", "second"):
        for file in reference:
            ours, theirs = (tmp_path / name / file).read_bytes(), (tmp_path / "reference" / file).read_bytes()
            if file == "tokenizer.json":    # without the truncation and padding of the last call
                expected = {**json.loads(theirs), "truncation": None, "padding": None}
                assert json.loads(ours) == expected
            else:
                assert ours == theirs, file
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "second"))
    assert loaded("a cat sat")["input_ids"] == tokenizer("a cat sat")["input_ids"]


@pytest.mark.parametrize("override, named", [
    ("model.gradient_checkpointing=true", "model.gradient_checkpointing: true"),
    ("training.compile=true", "training.compile: true"),
    ("model.attention=dflash", "model.attention: dflash"),
    ("training.optimizer=madgrad", "training.optimizer: madgrad"),
    ("training.precision=fp16", "training.precision: fp16"),
])
def test_cuda_graphs_refuse_what_a_replay_cannot_do(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["training.cuda_graphs=true", override])
    assert str(err.value).startswith(f"training.cuda_graphs: true cannot be combined with {named}")
    load_config(None, [override])               # alone, each of them is a valid config


# The techniques around the step declare whether a graph can capture them
# (training/hooks.py: graph_safe); the run's checks refuse them before any training.
def test_cuda_graphs_refuse_the_techniques_a_replay_cannot_do():
    named = "training.gradient_accumulation_steps > 1"
    with pytest.raises(ConfigError) as err:
        check_config_against_device(load_config(None, ["training.cuda_graphs=true", "awp.enabled=true",
                                                       "training.gradient_accumulation_steps=2"]), torch.device("cpu"))
    # AWP's attack and restore are device work, captured with the step: only accumulation is named
    assert str(err.value) == (f"training.cuda_graphs: true cannot be combined with {named}: switch those off or "
                              "set training.cuda_graphs: false")
    check_config_against_device(load_config(None, ["training.gradient_accumulation_steps=2"]), torch.device("cpu"))


def test_a_graphed_run_with_more_batch_shapes_than_graphs_says_which_pad_multiple_fits(tiny_bert, tmp_path, caplog,
                                                                                       monkeypatch):
    from pathlib import Path

    from foldtune.training import cross_validation
    from foldtune.training.graphs import too_many_shapes

    recipe = Path(__file__).resolve().parents[1] / "configs" / "deberta_v3_base.yaml"
    graphed = load_config(recipe, ["training.cuda_graphs=true"])
    # 1,536 tokens in multiples of 64, AWP from epoch 2: 24 widths x 2 variants for 16 graphs
    assert too_many_shapes(graphed) == (
        "training.cuda_graphs: batches come in up to 24 widths (data.max_len 1536 in multiples of 64) times 2 step "
        "variants (a technique starts at a later epoch), more shapes than the 16 graphs a fold captures: the others "
        "train eagerly, slower. training.pad_to_multiple_of=192 makes 8 widths")
    assert too_many_shapes(load_config(recipe, ["training.cuda_graphs=true", "training.pad_to_multiple_of=256"])) is None
    assert too_many_shapes(load_config(recipe, ["training.cuda_graphs=true", "awp.start_epoch=1"])).endswith(
        "training.pad_to_multiple_of=128 makes 12 widths")
    assert too_many_shapes(load_config(recipe)) is None                     # no graphs, nothing to say
    fast = Path(__file__).resolve().parents[1] / "configs" / "ellipse_minilm_fast.yaml"
    assert too_many_shapes(load_config(fast)) is None                       # 512 in multiples of 64: 8 widths
    # a run says it as it starts, into its log, before a fold trains
    caplog.set_level("WARNING", logger="foldtune")

    class Started(Exception):
        pass

    def start_run(*args, **kwargs):
        raise Started

    monkeypatch.setattr(cross_validation, "start_run", start_run)
    cfg = load_config(None, [f"model.name={tiny_bert}", "training.cuda_graphs=true", "data.max_len=512",
                             "training.pad_to_multiple_of=16"])
    with pytest.raises(Started):
        cross_validation.run_cross_validation(cfg, tmp_path / "run", frame=object())
    assert caplog.messages == [too_many_shapes(cfg)] and "32 widths" in caplog.messages[0]


def test_cuda_graphs_on_a_cpu_run_fail_before_training():
    cfg = load_config(None, ["training.cuda_graphs=true", "training.device=cpu"])
    with pytest.raises(ConfigError, match="training.cuda_graphs: true needs a CUDA device; this run is on cpu"):
        check_config_against_device(cfg, resolve_device(cfg.training.device))


def test_deberta_relative_positions_are_built_once_per_length_and_unchanged(tiny_deberta):
    from foldtune.training.graphs import cache_relative_positions

    model = TextRegressor.from_pretrained(ModelConfig(name=str(tiny_deberta)), 2).eval()
    ids = torch.randint(5, 100, (2, 24))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = model(ids, mask)
    encoder = model.backbone.encoder
    calls = []
    original = encoder.get_rel_pos
    encoder.get_rel_pos = lambda *a, **k: (calls.append(a[0].shape[-2]), original(*a, **k))[1]
    cache_relative_positions(model)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(ids, mask), before)
        model(ids[:, :16], mask[:, :16])
    assert calls == [24, 16]            # one build per length, the cached tensor after that


@pytest.mark.parametrize("stage_bytes", [1, 5, 64, 4096])
def test_copying_through_a_small_buffer_fills_each_target_in_turn(stage_bytes):
    from foldtune.runtime.snapshot import copy_in_chunks

    source = torch.arange(40, dtype=torch.float32)          # 160 bytes
    targets = [torch.empty(3, 2), torch.empty(0), torch.empty(1), torch.empty(33)]
    copy_in_chunks(source, targets, torch.empty(stage_bytes, dtype=torch.uint8))
    assert targets[0].tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert targets[2].tolist() == [6.0]
    assert targets[3].tolist() == [float(v) for v in range(7, 40)]
    with pytest.raises(ValueError, match="160 bytes into targets of 156"):
        copy_in_chunks(source, [torch.empty(39)], torch.empty(8, dtype=torch.uint8))


def test_states_removed_in_the_background_are_gone_at_once_for_a_resume(tmp_path):
    from foldtune.training.state import STATE_DIR, remove_states, state_files, wait_for_removals

    for fold in (0, 1):
        (tmp_path / f"fold_{fold}" / STATE_DIR).mkdir(parents=True)
        (tmp_path / f"fold_{fold}" / STATE_DIR / "state-0000004.pt").write_bytes(b"x" * 1000)
    (tmp_path / "fold_1" / f".{STATE_DIR}.tmp-{os.getpid()}").mkdir()     # an earlier process of this pid
    remove_states(tmp_path / "fold_0", wait=False)
    remove_states(tmp_path / "fold_1", wait=False)
    assert state_files(tmp_path / "fold_0") == [] and state_files(tmp_path / "fold_1") == []
    wait_for_removals()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["fold_0", "fold_1"]
    remove_states(tmp_path / "fold_0", wait=False)     # nothing there: nothing to do
    wait_for_removals()
