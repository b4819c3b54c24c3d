"""A path that is not there is named in one line with the option or key that named it and
the absolute path tried: a relative path is resolved from the working directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from foldtune.cli import infer_main, train_main
from foldtune.config import Config, ConfigError, save_config
from foldtune.data.validate import DataError, load_test


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty working directory, its absolute path (as the errors print it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path.resolve()


def _error_line(capsys) -> str:
    """The last line on stderr: the error (infer.py logs its run folders before it)."""
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize(("main", "sentence"), [
    (train_main, "relative paths, on the command line and in the config (data files, a model.name folder, "
                 "output.dir,\ndistill.teacher, pseudo.teacher, pseudo.file), are resolved from the working "
                 "directory, not from the\nconfig file's folder\n"),
    (infer_main, "relative paths (--run, --test, --blend, --out, and a run's data.test_file) are resolved from the "
                 "working directory\n"),
])
def test_help_says_where_relative_paths_lead(main, sentence, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.endswith("\n\n" + sentence)


def test_a_missing_config_file_names_config_and_the_absolute_path(work, capsys, monkeypatch):
    assert train_main(["--config", "configs/mine.yaml"]) == 2
    assert _error_line(capsys) == f"error: --config: {work / 'configs/mine.yaml'} does not exist"
    # installed without the checkout's configs/: the default is looked for in the working directory
    monkeypatch.setattr("foldtune.cli.DEFAULT_CONFIG", Path("configs/default.yaml"))
    assert train_main([]) == 2
    assert _error_line(capsys) == (f"error: the default config (no --config given): {work / 'configs/default.yaml'} "
                                   "does not exist")
    (work / "configs").mkdir()
    assert train_main(["--config", "configs"]) == 2
    assert _error_line(capsys) == f"error: --config: {work / 'configs'} is a folder, not a YAML file"


def test_resuming_a_folder_that_is_absent_or_not_a_run_names_the_absolute_path_and_writes_nothing(work, capsys):
    assert train_main(["--resume", "runs/mine"]) == 2
    assert _error_line(capsys) == f"error: --resume: {work / 'runs/mine'} does not exist: nothing to resume"
    (work / "data").mkdir()
    assert train_main(["--resume", "data"]) == 2
    assert _error_line(capsys) == (f"error: --resume: {work / 'data'} is not a run folder (no config.yaml): "
                                   "nothing to resume")
    assert list((work / "data").iterdir()) == []        # no train.log, no lock left in someone's folder


@pytest.fixture
def run_folder(work):
    """A folder holding only a run's config (the default one: data.test_file data/demo/test.csv)."""
    (work / "runs/a").mkdir(parents=True)
    save_config(Config(), work / "runs/a/config.yaml")
    return work / "runs/a"


def test_a_missing_test_file_names_test_or_the_runs_config_and_the_absolute_path(run_folder, work, capsys):
    assert infer_main(["--run", "runs/a", "--test", "tset.csv"]) == 2
    assert _error_line(capsys) == f"error: --test: {work / 'tset.csv'} does not exist"
    # the run's own test file, relative to where it was trained, not to here
    assert infer_main(["--run", "runs/a"]) == 2
    assert _error_line(capsys) == (f"error: data.test_file of runs/a/config.yaml (no --test given): "
                                   f"{work / 'data/demo/test.csv'} does not exist")


def test_a_missing_run_or_blend_file_names_the_absolute_path(run_folder, work, capsys):
    assert infer_main(["--run", "runs/a", "--run", "runs/b", "--test", "tset.csv"]) == 2
    assert _error_line(capsys) == f"error: --run: {work / 'runs/b'} does not exist"
    assert infer_main(["--run", "runs/a/config.yaml"]) == 2
    assert _error_line(capsys) == f"error: --run: {run_folder / 'config.yaml'} is a file, not a run folder"
    assert infer_main(["--blend", "blend.json"]) == 2
    assert _error_line(capsys) == (f"error: blend file {work / 'blend.json'} does not exist: write one with "
                                   "foldtune ensemble")


def test_a_missing_csv_and_teacher_name_the_absolute_path(work):
    from foldtune.distill import load_teacher

    with pytest.raises(DataError) as err:
        load_test("texts.csv", Config().data)
    assert str(err.value) == f"texts.csv: 1 problem(s) found before training:\n  - {work / 'texts.csv'} does not exist"
    with pytest.raises(ConfigError) as err:
        load_teacher("runs/teacher")
    assert str(err.value) == f"distill.teacher: {work / 'runs/teacher'} does not exist"
