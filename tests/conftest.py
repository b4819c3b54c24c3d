"""Shared fixtures: offline mode, tiny models built locally, the real essays when present."""

from __future__ import annotations

import os

# Nothing may reach a model hub during the tests: set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import re  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ELLIPSE = REPO.parent / "shared" / "data" / "ellipse"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _demo_vocab() -> list[str]:
    from foldtune.data.demo import make_demo

    train, test = make_demo(n_train=120, n_test=30, seed=0)
    words = set()
    for text in list(train.full_text) + list(test.full_text):
        words.update(re.findall(r"[a-z']+", text.lower()))
    return sorted(words)


def build_deberta_tokenizer(vocab_words: list[str]):
    """A real DebertaV2Tokenizer (unigram, as deberta-v3 uses) over a small local vocabulary."""
    from transformers import DebertaV2Tokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"))
    vocab = [(s, 0.0) for s in specials] + [("▁", -8.0)]
    vocab += [(f"▁{w}", -5.0) for w in vocab_words] + [(c, -10.0) for c in chars]
    return DebertaV2Tokenizer(vocab=vocab, do_lower_case=True)


def save_tiny_deberta(folder: Path, n_layers: int, hidden_size: int = 32) -> Path:
    """A randomly initialised DeBERTa-v3-style model (two heads) with its tokenizer, saved locally."""
    from transformers import AutoModel, DebertaV2Config

    tokenizer = build_deberta_tokenizer(_demo_vocab())
    config = DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=n_layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, type_vocab_size=0, position_biased_input=False,
        relative_attention=True, position_buckets=64, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm", share_att_key=True, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_deberta(tmp_path_factory) -> Path:
    """Two layers: the smallest DeBERTa-v2 that still has a bottom and a top."""
    return save_tiny_deberta(tmp_path_factory.mktemp("tiny-deberta"), n_layers=2)


@pytest.fixture(scope="session")
def tiny_deberta_4(tmp_path_factory) -> Path:
    """Four layers: room for the recipe's frozen bottom two and re-initialised top one."""
    return save_tiny_deberta(tmp_path_factory.mktemp("tiny-deberta-4"), n_layers=4)


@pytest.fixture(scope="session")
def tiny_deberta_wide(tmp_path_factory) -> Path:
    """Four layers of two heads of 32 dimensions: the smallest head dflash's kernels take."""
    return save_tiny_deberta(tmp_path_factory.mktemp("tiny-deberta-wide"), n_layers=4, hidden_size=64)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised two-layer BERT with MiniLM's (uncased WordPiece) tokenizer."""
    from transformers import AutoModel, AutoTokenizer, BertConfig

    from foldtune.models.regressor import resolve_backbone

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("all-MiniLM-L6-v2"))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def small_train_csv(tmp_path_factory) -> Path:
    """24 demo essays with scores (no test file): runs that stop or fail before they learn."""
    from foldtune.data.demo import make_demo

    path = tmp_path_factory.mktemp("small-train") / "train.csv"
    make_demo(n_train=24, n_test=0, seed=3)[0].to_csv(path, index=False)
    return path


def train_tiny_run(backbone: Path, work: Path, name: str, *overrides: str) -> Path:
    """A 2-fold, 1-epoch run of `backbone` on demo essays (work/train.csv, test.csv, written
    once), trained in this process into work/runs/<name>."""
    from foldtune.config import load_config
    from foldtune.data.demo import make_demo
    from foldtune.training.cross_validation import run_cross_validation

    if not (work / "train.csv").exists():
        train, test = make_demo(n_train=24, n_test=6, seed=5)
        train.to_csv(work / "train.csv", index=False)
        test.to_csv(work / "test.csv", index=False)
    cfg = load_config(None, [f"data.train_file={work / 'train.csv'}", f"data.test_file={work / 'test.csv'}",
                             "data.max_len=48", "folds.n_splits=2", f"model.name={backbone}", "training.epochs=1",
                             "training.batch_size=6", "training.eval_steps=1", "training.lr=1.0e-4",
                             f"output.dir={work / 'runs'}", f"output.name={name}", *overrides])
    run_dir = work / "runs" / name
    run_dir.mkdir(parents=True)
    run_cross_validation(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def tiny_runs(tiny_deberta, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(runs folder, run a, run b): two tiny runs on the same data that differ in training.lr only."""
    work = tmp_path_factory.mktemp("tiny-runs")
    run_a = train_tiny_run(tiny_deberta, work, "a")
    run_b = train_tiny_run(tiny_deberta, work, "b", "training.lr=5.0e-4")
    return work / "runs", run_a, run_b


def assert_scores_match_oof(run_dir: Path, train) -> None:
    """scores.json's OOF MCRMSE (overall, per target) and each fold's are those of the run's
    oof.csv against the true targets of `train`, the run's whole train frame."""
    import json

    import numpy as np
    import pandas as pd

    from foldtune.config import load_config
    from foldtune.metrics import column_rmse

    cfg = load_config(run_dir / "config.yaml")
    id_column, targets = cfg.data.id_column, list(cfg.data.target_columns)
    scores = json.loads((run_dir / "scores.json").read_text())
    oof = pd.read_csv(run_dir / "oof.csv")
    assert sorted(oof[id_column].tolist()) == sorted(train[id_column].tolist()) and scores["n_rows"] == len(train)
    true = train.set_index(id_column).loc[oof[id_column], targets].to_numpy(dtype=np.float64)
    pred = oof[targets].to_numpy(dtype=np.float64)
    rmse = column_rmse(true, pred)
    assert scores["oof"]["mcrmse"] == pytest.approx(rmse.mean(), abs=1e-6)
    assert [scores["oof"]["per_target"][t] for t in targets] == pytest.approx(rmse.tolist(), abs=1e-6)
    assert sorted(scores["folds"]) == sorted(str(f) for f in oof["fold"].unique())
    for fold in oof["fold"].unique():
        rows = (oof["fold"] == fold).to_numpy()
        assert scores["folds"][str(fold)]["mcrmse"] == pytest.approx(column_rmse(true[rows], pred[rows]).mean(),
                                                                     abs=1e-6)


def tfidf_ridge_fit(texts, y, alpha, char_range):
    """The tfidf_ridge member fitted directly with scikit-learn: what a fold model must equal."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import FeatureUnion, Pipeline

    features = FeatureUnion([
        ("w", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), min_df=1, sublinear_tf=True)),
        ("c", TfidfVectorizer(analyzer="char_wb", ngram_range=char_range, min_df=1, sublinear_tf=True)),
    ])
    return Pipeline([("f", features), ("r", Ridge(alpha=alpha))]).fit(texts, y)


def train_two_tfidf_runs(work: Path, seed: int, n_test: int, names: tuple[str, str]):
    """Two tfidf_ridge runs on the same 3 folds of 30 demo essays (alpha 1 / char 2-4 and
    alpha 10 / char 3-3) under work/runs; returns the train and test frames."""
    from foldtune.cli import train_main
    from foldtune.data.demo import make_demo

    train, test = make_demo(n_train=30, n_test=n_test, seed=seed)
    train.to_csv(work / "train.csv", index=False)
    test.to_csv(work / "test.csv", index=False)
    (work / "tfidf.yaml").write_text(
        "data:\n  train_file: train.csv\n  test_file: test.csv\nfolds:\n  n_splits: 3\n"
        "model:\n  type: tfidf_ridge\ntfidf:\n  min_df: 1\n  char_ngram_range: [2, 4]\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        assert train_main(["--config", "tfidf.yaml", "--name", names[0]]) == 0
        assert train_main(["--config", "tfidf.yaml", "--name", names[1], "tfidf.alpha=10",
                           "tfidf.char_ngram_range=[3,3]"]) == 0
    return train, test


def run_stopped_at(monkeypatch, cfg, run_dir: Path, fold: int, step: int) -> None:
    """Run cfg into run_dir with a SIGTERM requested once `fold` has counted `step` steps;
    the run must stop (TrainingInterrupted). The trainer is restored afterwards."""
    import signal

    from foldtune.training import stopping
    from foldtune.training.cross_validation import run_cross_validation
    from foldtune.training.stopping import TrainingInterrupted
    from foldtune.training.trainer import FoldTrainer

    original = FoldTrainer._count_step

    def counting(self):
        original(self)
        if self.data.fold == fold and self.step == step:
            stopping.request_stop(signal.SIGTERM)

    monkeypatch.setattr(FoldTrainer, "_count_step", counting)
    try:
        with pytest.raises(TrainingInterrupted):
            run_cross_validation(cfg, run_dir)
    finally:
        stopping.clear_stop_request()
        monkeypatch.setattr(FoldTrainer, "_count_step", original)


def accelerate_launch(args: list[str], cwd: Path, wait: bool = True, cpu: bool = True, processes: int = 2):
    """train.py under accelerate launch, `processes` of them: on the CPUs over gloo, or (cpu
    False) one GPU each over NCCL; a free port each time. Without --resume the config is
    the dataclass defaults and args' overrides, as the in-process runs'."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(REPO / "train.py"), *args]
    if "--resume" not in args:
        (cwd / "defaults.yaml").write_text("# nothing: the dataclass defaults\n")
        command += ["--config", "defaults.yaml"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def live_pid():
    """The pid of a process that runs (not this one) while the test does."""
    import subprocess

    sleeper = subprocess.Popen(["sleep", "60"])
    yield sleeper.pid
    sleeper.kill()
    sleeper.wait()


def ended_pid() -> int:
    """The pid of a process that has ended."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
