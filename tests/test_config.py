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


TRAINING_KEYS = ("epochs, batch_size, eval_batch_size, lr, head_lr, layerwise_lr_decay, optimizer, weight_decay, "
                 "adam_eps, adam_betas, scheduler, warmup_ratio, warmup_steps, gradient_accumulation_steps, "
                 "max_grad_norm, eval_steps, eval_steps_from_epoch, loss, loss_beta, target_weights, precision, "
                 "device, seed, seeds, log_steps, num_workers, save_state_steps, keep_states, deterministic, "
                 "bucket_batches, compile, pad_to_multiple_of, parallel_folds, parallel_mode, cuda_graphs")


def test_a_key_mistyped_on_the_command_line_is_named_with_the_key_it_meant(tmp_path):
    # with a config file too: the mistake is on the command line, not in the file
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["training.lr_rate=1e-4"])
    assert str(err.value) == ("unknown config key 'training.lr_rate' set on the command line (did you mean "
                              f"'training.lr'?); valid keys in section 'training': {TRAINING_KEYS}")


@pytest.mark.parametrize(("typo", "meant"), [
    ("training.lrr", "training.lr"),                            # spelling
    ("training.learning_rate", "training.lr"),                  # Hugging Face's name
    ("training.train_batch_size", "training.batch_size"),       # a key inside the name, not eval_batch_size
    ("training.num_train_epochs", "training.epochs"),
    ("folds.n_folds", "folds.n_splits"),
    ("data.max_length", "data.max_len"),
])
def test_did_you_mean_gives_the_whole_dotted_key(typo, meant):
    with pytest.raises(ConfigError, match=re.escape(f"unknown config key '{typo}' set on the command line "
                                                    f"(did you mean '{meant}'?); valid keys in section")):
        load_config(None, [f"{typo}=1"])


def test_unknown_section_is_refused():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainig' set on the command line \(did you mean "
                                          r"'training'\?\); valid keys in the top level: data, folds, model, "
                                          r"training, awp, averaging, fgm, rdrop, pruning, tfidf, distill, pseudo, output$"):
        load_config(None, ["trainig.lr=1"])


def test_a_bad_value_on_the_command_line_names_key_value_type_and_the_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["training.lr=abc"])
    assert str(err.value) == "config key 'training.lr' set on the command line: expected a number, got 'abc'"


def test_an_override_without_a_value_says_it_is_on_the_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["training.lr"])
    assert str(err.value) == ("override 'training.lr' on the command line is not of the form section.key=value, "
                              "e.g. training.lr=3e-5")


@pytest.mark.parametrize(("override", "expected"), [
    ("training.epochs=two", "config key 'training.epochs' set on the command line: expected an integer, got 'two'"),
    ("training.epochs=2.5", "config key 'training.epochs' set on the command line: expected an integer, got 2.5"),
    ("training.lr=fast", "config key 'training.lr' set on the command line: expected a number, got 'fast'"),
    ("data.demo=yes please", "config key 'data.demo' set on the command line"
                             ": expected true or false, got 'yes please'"),
    ("training.scheduler=step", "config key 'training.scheduler' set on the command line"
                                ": expected one of linear, cosine, constant"),
    ("training.adam_betas=[0.9]", "config key 'training.adam_betas' set on the command line"
                                  ": expected a list of 2 values"),
    ("folds.n_splits=1", "config key 'folds.n_splits' set on the command line: expected an integer >= 2, got 1"),
    ("training.lr=0", "config key 'training.lr' set on the command line: expected a positive number, got 0.0"),
    ("training", "override 'training' on the command line is not of the form section.key=value"),
])
def test_wrong_values_fail_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_error_names_the_config_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  nmae: x\ntraining:\n  lr: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["training.epochs=2"])
    assert str(err.value) == (f"unknown config key 'model.nmae' set in {path} (did you mean 'model.name'?); valid "
                              "keys in section 'model': type, name, pooling, pooling_layers, gem_p, init_head_bias, "
                              "head_dropout, head_dropout_samples, backbone_dropout, reinit_layers, "
                              "freeze_embeddings, freeze_layers, gradient_checkpointing, attention")
    path.write_text("training:\n  lr: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["training.epochs=2"])
    assert str(err.value) == f"config key 'training.lr' set in {path}: expected a number, got 'fast'"


def test_a_check_across_keys_names_the_config_file(tmp_path):
    # the key named is not the one set: no 'set in' for it, the file the config came from
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  id_column: cohesion\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == ("config key 'data.target_columns': expected id, text and target columns that are all "
                              f"different, got ('cohesion', 'full_text') (in {path})")


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
    ("model.type=svm", "config key 'model.type' set on the command line"
                       ": expected one of transformer, tfidf_ridge, got 'svm'"),
    ("tfidf.char_ngram_range=[5,2]", "config key 'tfidf.char_ngram_range' set on the command line"
                                     ": expected [low, high] with 1 <= low <= high"),
    ("tfidf.alpha=0", "config key 'tfidf.alpha' set on the command line: expected a positive number, got 0.0"),
    ("distill.alpha=1.5", "config key 'distill.alpha' set on the command line: expected a number in [0, 1], got 1.5"),
    ("distill.holdout_targets=all", "config key 'distill.holdout_targets' set on the command line"
                                    ": expected one of fold_models, oof"),
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


def test_a_config_file_that_is_not_yaml_fails_in_one_line_with_where(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"config file {path} is not valid YAML: line 3, column 1: expected ',' or ']', "
                              "but got '<stream end>'")
    path.write_text("training:\n\tlr: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"config file {path} is not valid YAML: line 2, column 1: found character '\\t' "
                              "that cannot start any token")
