"""A model.name that gives no backbone fails in one line, before the run folder exists:
a typo'd hub name, a local folder missing its config, tokenizer or weights, a cached hub
model missing its weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from foldtune.cli import train_main
from foldtune.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _args(model, csv, runs: Path) -> list[str]:
    return [f"model.name={model}", f"data.train_file={csv}", "data.test_file=null", "data.max_len=40",
            "folds.n_splits=2", "training.epochs=1", "training.batch_size=6", f"output.dir={runs}",
            "output.name=run"]


def _without(source: Path, folder: Path, names: set[str]) -> Path:
    """A copy of the backbone folder `source` without the files `names`."""
    shutil.copytree(source, folder)
    for name in names:
        (folder / name).unlink()
    return folder


def test_a_typo_in_model_name_fails_in_one_line_before_the_run_folder(small_train_csv, tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"),
                             *_args("microsft/deberta-v3-base", small_train_csv, runs)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: model.name 'microsft/deberta-v3-base': not a local folder and not in the Hugging Face cache "
        "(HF_HUB_OFFLINE=1: nothing is downloaded); a local path must be a folder with config.json, the "
        "tokenizer's files (tokenizer.json, or vocab.txt, spm.model...) and model.safetensors"]
    assert not runs.exists()


TOKENIZER = {"tokenizer.json", "tokenizer_config.json"}


@pytest.mark.parametrize(("removed", "named"), [
    ({"config.json"}, "has no config.json"),
    # AutoTokenizer alone loads such a folder: a tokenizer of 5 special tokens, [UNK] for every word
    (TOKENIZER, "has no tokenizer files (one of tokenizer.json, vocab.txt, spm.model,"),
    ({"model.safetensors"}, "has no weights (one of model.safetensors, model.safetensors.index.json,"),
])
def test_a_local_folder_missing_a_file_fails_before_the_run_folder(removed, named, small_train_csv, tiny_bert, tmp_path,
                                                                  capsys):
    folder = _without(tiny_bert, tmp_path / "backbone", removed)
    runs = tmp_path / "runs"
    assert train_main(_args(folder, small_train_csv, runs)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: model.name '{folder}': the folder {folder} {named}"), err
    assert not runs.exists()


def test_a_folder_whose_config_does_not_load_is_named(tiny_bert, tmp_path):
    from foldtune.models.regressor import check_backbone

    folder = _without(tiny_bert, tmp_path / "backbone", set())
    (folder / "config.json").write_text('{"hidden_size": 32}')        # no model_type
    with pytest.raises(ConfigError, match=rf"^model.name '{folder}': {folder} does not load \(Unrecognized model"):
        check_backbone(str(folder))


def _cache_snapshot(cache: Path, repo: str, source: Path, names: set[str]) -> None:
    """`names` of `source` as the Hugging Face cache holds a download of `repo` at main."""
    commit = "0" * 40
    entry = cache / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in names:
        shutil.copy(source / name, snapshot / name)


def test_a_cached_hub_model_is_checked_in_the_cache(tiny_bert, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from foldtune.models.regressor import check_backbone

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    every = {path.name for path in tiny_bert.iterdir() if path.is_file()}
    _cache_snapshot(tmp_path / "hub", "foldtune/whole", tiny_bert, every)
    _cache_snapshot(tmp_path / "hub", "foldtune/no-weights", tiny_bert, every - {"model.safetensors"})
    check_backbone("foldtune/whole")
    with pytest.raises(ConfigError, match=r"^model.name 'foldtune/no-weights': the folder .*/snapshots/0{40} "
                                          r"has no weights \(one of model.safetensors,"):
        check_backbone("foldtune/no-weights")


def test_online_a_name_the_hub_does_not_give_is_named_without_offline_words(monkeypatch):
    """With HF_HUB_OFFLINE unset the message says what the hub answered, not that nothing is downloaded."""
    from huggingface_hub import constants

    from foldtune.models import regressor

    def not_on_the_hub(name, **kwargs):
        raise OSError(f"{name} is not a local folder and is not a valid model identifier listed on "
                      "'https://huggingface.co/models'\nIf this is a private repository, make sure to pass a token")

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(regressor.AutoConfig, "from_pretrained", not_on_the_hub)
    with pytest.raises(ConfigError) as err:
        regressor.check_backbone("microsft/deberta-v3-base")
    assert str(err.value) == (
        "model.name 'microsft/deberta-v3-base': not a local folder, and the Hugging Face hub did not give it "
        "(microsft/deberta-v3-base is not a local folder and is not a valid model identifier listed on "
        "'https://huggingface.co/models'); a local path must be a folder with config.json, the tokenizer's files "
        "(tokenizer.json, or vocab.txt, spm.model...) and model.safetensors")
