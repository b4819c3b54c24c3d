"""A run exported for Kaggle loads offline in a fresh process, and the notebook in the
export writes the submission infer.py writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from conftest import train_tiny_run

from foldtune.checkpoint import CheckpointError
from foldtune.cli import infer_main
from foldtune.export import export_run

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# Run in a fresh interpreter: every way to the hub fails loudly, then the export is scored.
OFFLINE_SCRIPT = textwrap.dedent("""
    import socket, sys
    import huggingface_hub, huggingface_hub.file_download

    def no_network(*args, **kwargs):
        raise RuntimeError(f"network access attempted: {args[:1]}")

    for module, name in [(huggingface_hub, "hf_hub_download"), (huggingface_hub, "snapshot_download"),
                         (huggingface_hub.file_download, "hf_hub_download"),
                         (huggingface_hub.file_download, "get_hf_file_metadata"),
                         (huggingface_hub, "model_info")]:
        if hasattr(module, name):
            setattr(module, name, no_network)
    socket.socket.connect = no_network
    socket.create_connection = no_network

    from foldtune.inference import run_inference
    run_inference(sys.argv[1], sys.argv[2], sys.argv[3], device="cpu")
""")


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("fold_*/best/model.safetensors"))


@pytest.fixture(scope="module")
def exported(tiny_deberta, tmp_path_factory):
    """A run of its own backbone copy, infer.py's submission, and fp32/fp16 exports; then
    the run and the backbone are deleted: only the exports remain."""
    work = tmp_path_factory.mktemp("export")
    backbone = shutil.copytree(tiny_deberta, work / "backbone")
    run = train_tiny_run(backbone, work, "r")
    assert infer_main(["--run", str(run), "--test", str(work / "test.csv"), "--out", str(work / "infer.csv"),
                       "--device", "cpu"]) == 0
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "foldtune.export", str(run), str(work / "kaggle")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    weights32 = _weights_bytes(work / "kaggle")
    export_run(run, work / "kaggle_fp16", fp16=True)
    shutil.rmtree(run)
    shutil.rmtree(backbone)
    return work, weights32


def _score_offline(export: Path, test: Path, out: Path) -> pd.DataFrame:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(export), str(test), str(out)],
                            cwd=export.parent, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return pd.read_csv(out)


def test_export_holds_folds_config_wheel_and_notebook(exported):
    work, _ = exported
    export = work / "kaggle"
    for fold in (0, 1):
        assert {"model.safetensors", "config.json", "tokenizer.json", "foldtune.yaml", "foldtune.json"} <= {
            p.name for p in (export / f"fold_{fold}" / "best").iterdir()}
    assert {"config.yaml", "run.json", "scores.json", "report.md", "inference.ipynb", "export.json"} <= {
        p.name for p in export.iterdir()}
    info = json.loads((export / "export.json").read_text())
    assert info["folds"] == [0, 1] and info["weights_dtype"] == "float32"
    with zipfile.ZipFile(export / info["wheel"]) as wheel:
        names = wheel.namelist()
    assert "foldtune/inference.py" in names and "foldtune/export.py" in names
    notebook = nbformat.read(export / "inference.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    assert not list(work.glob(".kaggle*"))      # no temporary folder left behind


def test_export_loads_offline_in_a_fresh_process_and_matches_infer(exported):
    work, _ = exported
    expected = pd.read_csv(work / "infer.csv")
    got = _score_offline(work / "kaggle", work / "test.csv", work / "offline.csv")
    assert got.columns.tolist() == expected.columns.tolist()
    assert got["text_id"].tolist() == expected["text_id"].tolist()
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:].to_numpy(), atol=1e-6, rtol=0)


def test_fp16_export_is_half_the_size_and_close(exported):
    work, weights32 = exported
    export = work / "kaggle_fp16"
    assert json.loads((export / "export.json").read_text())["weights_dtype"] == "float16"
    assert 0.45 < _weights_bytes(export) / weights32 < 0.55
    for best in export.glob("fold_*/best"):        # the float16 files' own SHA-256, which loading checks
        data = (best / "model.safetensors").read_bytes()
        assert json.loads((best / "foldtune.json").read_text())["files"] == {
            "model.safetensors": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
    expected = pd.read_csv(work / "infer.csv")
    got = _score_offline(export, work / "test.csv", work / "offline16.csv")
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:].to_numpy(), atol=1e-2, rtol=0)


def test_the_notebook_writes_the_submission_of_infer(exported):
    from nbclient import NotebookClient

    work, _ = exported
    export = work / "kaggle"
    notebook = nbformat.read(export / "inference.ipynb", as_version=4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FOLDTUNE_SRC": str(SRC),
           "FOLDTUNE_EXPORT": str(export), "FOLDTUNE_TEST": str(work / "test.csv"),
           "FOLDTUNE_OUT": str(work / "notebook.csv")}
    NotebookClient(notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(work)}}).execute(
        env=env)
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert any(str(SRC / "foldtune") in out.get("text", "") for out in outputs)   # the worktree's foldtune
    assert any("image/png" in out.get("data", {}) for out in outputs)              # the histograms
    expected = pd.read_csv(work / "infer.csv")
    got = pd.read_csv(work / "notebook.csv")
    assert got["text_id"].tolist() == expected["text_id"].tolist()
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:].to_numpy(), atol=1e-6, rtol=0)


def test_a_run_without_checkpoints_exports_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("folds:\n  n_splits: 2\n")
    (run / "run.json").write_text(json.dumps({"folds": [0, 1]}))
    with pytest.raises(CheckpointError, match=r"fold\(s\) \[0, 1\]"):
        export_run(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_exported_wheel_installs_offline_and_scores_the_export(exported, tmp_path):
    """What the notebook does on Kaggle when foldtune is not importable."""
    work, _ = exported
    export = work / "kaggle"
    wheel = export / json.loads((export / "export.json").read_text())["wheel"]
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                             "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import foldtune; print(foldtune.__file__)"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(site / "foldtune" / "__init__.py")     # the wheel's, not the checkout's
    result = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(export), str(work / "test.csv"),
                             str(tmp_path / "wheel.csv")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    expected = pd.read_csv(work / "infer.csv")
    got = pd.read_csv(tmp_path / "wheel.csv")
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:].to_numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_every_exported_file_and_folder_has_the_mode_of_the_umask(tiny_deberta, tmp_path, monkeypatch, umask,
                                                                  file_mode, folder_mode):
    """A dataset to upload or share is readable as a new file is: safetensors writes its
    files owner-only (0600), and fp16 weights are written by it below fold_k/best/."""
    from foldtune import export

    def owner_only_wheel(out_dir, root=None):      # any writer, at any depth: the wheel is not what is tested
        wheel = out_dir / "foldtune-0-py3-none-any.whl"
        wheel.write_bytes(b"wheel")
        wheel.chmod(0o600)
        return wheel

    monkeypatch.setattr(export, "build_wheel", owner_only_wheel)
    run = train_tiny_run(tiny_deberta, tmp_path, "r")
    previous = os.umask(umask)
    try:
        out = export.export_run(run, tmp_path / "kaggle", fp16=True)
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert {"fold_0/best/model.safetensors", "fold_1/best/model.safetensors", "fold_1/best"} <= set(modes)
    assert {name: oct(mode) for name, mode in modes.items()
            if mode != (folder_mode if (out / name).is_dir() else file_mode)} == {}


def test_a_pruned_deberta_run_exports_and_scores_offline_as_infer_does(tiny_deberta, tmp_path):
    """pruning.heads on DeBERTa-v2, through train, infer and export: the export's folds load
    their pruned shapes back in a fresh process (foldtune.json's pruned_heads)."""
    from foldtune.checkpoint import read_meta

    backbone = shutil.copytree(tiny_deberta, tmp_path / "backbone")
    run = train_tiny_run(backbone, tmp_path, "pruned", "pruning.heads.enabled=true", "pruning.heads.target_heads=2",
                         "training.precision=fp32")
    assert [read_meta(run / f"fold_{fold}" / "best")["head_gates"]["kept"] for fold in (0, 1)] == [2, 2]
    assert infer_main(["--run", str(run), "--test", str(tmp_path / "test.csv"), "--out", str(tmp_path / "infer.csv"),
                       "--device", "cpu"]) == 0
    export_run(run, tmp_path / "kaggle")
    shutil.rmtree(run)
    shutil.rmtree(backbone)
    for fold in (0, 1):
        assert read_meta(tmp_path / "kaggle" / f"fold_{fold}" / "best")["pruned_heads"]
    expected = pd.read_csv(tmp_path / "infer.csv")
    got = _score_offline(tmp_path / "kaggle", tmp_path / "test.csv", tmp_path / "offline.csv")
    assert got["text_id"].tolist() == expected["text_id"].tolist()
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:].to_numpy(), atol=1e-6, rtol=0)
