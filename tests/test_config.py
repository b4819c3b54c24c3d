import re
from pathlib import Path

import pytest
import yaml

from foldtune.config import (COMPETITION_TARGETS, Config, ConfigError, config_to_dict, dump_config, load_config,
                             save_config)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_are_the_competition_layout():
    cfg = Config()
    assert (cfg.data.id_column, cfg.data.text_column) == ("text_id", "full_text")
    assert cfg.data.target_columns == COMPETITION_TARGETS
    assert cfg.folds.n_splits == 5


def test_dotted_overrides_change_one_key_each(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("training:\n  lr: 2.0e-5\n  epochs: 3\nfolds:\n  n_splits: 4\n")
    cfg = load_config(path, ["training.lr=3e-5", "folds.n_splits=3", "data.target_columns=a,b",
                             "training.max_grad_norm=null", "model.pooling=mean"])
    assert cfg.training.lr == 3e-5 and isinstance(cfg.training.lr, float)
    assert cfg.training.epochs == 3            # from the file, untouched by overrides
    assert cfg.folds.n_splits == 3
    assert cfg.data.target_columns == ("a", "b")
    assert cfg.training.max_grad_norm is None


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads 1e-5 as a string; the config must still take it as the number it means.
    path = tmp_path / "x.yaml"
    path.write_text("training:\n  lr: 1e-5\n")
    assert load_config(path).training.lr == 1e-5


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["training.lrr=1e-5"])
    message = str(err.value)
    assert "unknown config key 'training.lrr'" in message
    assert "did you mean 'training.lr'" not in message      # the key within its section, not the dotted name
    assert "(did you mean 'lr'?)" in message
    assert "valid keys in section 'training': epochs, batch_size, eval_batch_size, lr," in message


def test_unknown_section_is_refused():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainig' \(did you mean 'training'\?\); valid keys "
                                          r"in the top level: data, folds, model, training, awp, averaging, tfidf, distill, output"):
        load_config(None, ["trainig.lr=1"])


@pytest.mark.parametrize(("override", "expected"), [
    ("training.epochs=two", "config key 'training.epochs': expected an integer, got 'two'"),
    ("training.epochs=2.5", "config key 'training.epochs': expected an integer, got 2.5"),
    ("training.lr=fast", "config key 'training.lr': expected a number, got 'fast'"),
    ("data.demo=yes please", "config key 'data.demo': expected true or false, got 'yes please'"),
    ("training.scheduler=step", "config key 'training.scheduler': expected one of linear, cosine, constant"),
    ("training.adam_betas=[0.9]", "config key 'training.adam_betas': expected a list of 2 values"),
    ("folds.n_splits=1", "config key 'folds.n_splits': expected an integer >= 2, got 1"),
    ("training.lr=0", "config key 'training.lr': expected a positive number, got 0.0"),
    ("training", "override 'training' is not of the form section.key=value"),
])
def test_wrong_values_fail_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_error_names_the_config_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  nmae: x\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.nmae' \(did you mean 'name'\?\).*bad.yaml"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["training.lr=3e-5", "data.target_columns=[x, y]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load(dump_config(cfg)) == config_to_dict(cfg)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_yaml_in_configs_loads(path):
    cfg = load_config(path)
    from foldtune.losses import LOSSES
    from foldtune.models.pooling import POOLINGS
    from foldtune.optim.factory import OPTIMIZERS

    assert cfg.model.pooling in POOLINGS and cfg.training.loss in LOSSES and cfg.training.optimizer in OPTIMIZERS


def test_there_are_configs_to_check():
    assert {"default.yaml", "ellipse_minilm.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize(("override", "expected"), [
    ("model.type=svm", "config key 'model.type': expected one of transformer, tfidf_ridge, got 'svm'"),
    ("tfidf.char_ngram_range=[5,2]", "config key 'tfidf.char_ngram_range': expected [low, high] with 1 <= low <= high"),
    ("tfidf.alpha=0", "config key 'tfidf.alpha': expected a positive number, got 0.0"),
    ("distill.alpha=1.5", "config key 'distill.alpha': expected a number in [0, 1], got 1.5"),
    ("distill.holdout_targets=all", "config key 'distill.holdout_targets': expected one of fold_models, oof"),
])
def test_tfidf_and_distill_values_are_checked(override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(None, [override])


def test_the_fast_minilm_config_is_the_plain_one_with_the_measured_speed_switches():
    configs = Path(__file__).resolve().parents[1] / "configs"
    plain = config_to_dict(load_config(configs / "ellipse_minilm.yaml"))
    fast = config_to_dict(load_config(configs / "ellipse_minilm_fast.yaml"))
    changed = {(section, key): value for section, values in fast.items() for key, value in values.items()
               if plain[section][key] != value}
    assert changed == {("model", "backbone_dropout"): 0.0, ("model", "freeze_embeddings"): True,
                       ("training", "cuda_graphs"): True,
                       ("training", "eval_batch_size"): 256, ("training", "eval_steps_from_epoch"): 2,
                       ("training", "parallel_folds"): 5,
                       ("training", "parallel_mode"): "threads"}
