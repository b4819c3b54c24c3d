"""Blend weights on OOF predictions: exact least squares, hill climbing, the honest score,
and the refusal of runs trained on other folds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from foldtune.config import load_config, save_config
from foldtune.ensemble import (EnsembleError, apply_weights, build_blend, fit_weights, hill_climb, honest_blend,
                               main, read_blend, simplex_least_squares)
from foldtune.metrics import mcrmse

TARGETS = ["a", "b"]


def two_member_weight(p1: np.ndarray, p2: np.ndarray, y: np.ndarray) -> float:
    """The best weight of member 1 in w*p1 + (1-w)*p2 by hand: the minimum of a parabola, clipped to [0, 1]."""
    d1, d2 = p1 - y, p2 - y
    return float(np.clip(np.dot(d2, d2 - d1) / np.dot(d1 - d2, d1 - d2), 0, 1))


def test_exact_weights_recovered_when_the_target_is_a_blend():
    rng = np.random.default_rng(0)
    a, b, noise = rng.normal(3, 1, 200), rng.normal(3, 1, 200), rng.normal(3, 1, 200)
    y = 0.7 * a + 0.3 * b
    np.testing.assert_allclose(simplex_least_squares(np.c_[a, b], y), [0.7, 0.3], atol=1e-6)
    # a third member of pure noise gets nothing: the two others already fit exactly
    np.testing.assert_allclose(simplex_least_squares(np.c_[a, noise, b], y), [0.7, 0.0, 0.3], atol=1e-6)


def test_least_squares_matches_the_two_member_formula_and_noise_gets_almost_nothing():
    rng = np.random.default_rng(1)
    y = rng.normal(3, 0.6, 400)
    good = y + rng.normal(0, 0.05, 400)
    noise = rng.normal(3, 0.6, 400)              # knows nothing of y
    w = simplex_least_squares(np.c_[good, noise], y)
    expected = two_member_weight(good, noise, y)
    np.testing.assert_allclose(w, [expected, 1 - expected], atol=1e-9)
    assert w[1] < 0.02 and w.sum() == pytest.approx(1.0)


def test_negative_weight_is_clipped_to_the_best_single_member():
    # b's errors are a's, larger and of the same sign: the unconstrained optimum puts a
    # negative weight on b; on the simplex the answer is a alone
    y = np.linspace(0, 1, 50)
    err = np.sin(np.arange(50))
    np.testing.assert_allclose(simplex_least_squares(np.c_[y + err, y + 2 * err], y), [1.0, 0.0], atol=1e-12)


def test_hill_climbing_picks_members_whose_errors_cancel():
    y = np.linspace(1, 5, 40)
    err = np.cos(np.arange(40))
    third = y + 3 * err
    # a and b err in opposite directions: half of each is exact; the poor third is never picked
    w = hill_climb(np.c_[y + err, y - err, third], y)
    np.testing.assert_allclose(w, [0.5, 0.5, 0.0])
    # a member alone best and nothing helps: weight one
    np.testing.assert_allclose(hill_climb(np.c_[y + err, third], y), [1.0, 0.0])


def test_weights_are_per_target():
    rng = np.random.default_rng(2)
    p = rng.normal(0, 1, (2, 100, 2))                                # 2 members, 100 rows, 2 targets
    y = np.c_[0.2 * p[0, :, 0] + 0.8 * p[1, :, 0], p[0, :, 1]]
    w = fit_weights(p, y, "nnls")
    np.testing.assert_allclose(w, [[0.2, 0.8], [1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(apply_weights(p, w), y, atol=1e-6)


def test_honest_score_fits_each_fold_on_the_other_folds_only():
    rng = np.random.default_rng(3)
    n = 90
    fold_of = np.repeat([0, 1, 2], 30)
    y = rng.normal(3, 0.6, (n, 1))
    good = y + rng.normal(0, 0.05, (n, 1))
    noise = rng.normal(3, 0.6, (n, 1))
    preds = np.stack([good, noise])
    blended, fold_weights = honest_blend(preds, y, fold_of, "nnls")

    by_hand = np.empty(n)
    for k in range(3):
        out = fold_of != k
        w = two_member_weight(good[out, 0], noise[out, 0], y[out, 0])
        np.testing.assert_allclose(fold_weights[k][0], [w, 1 - w], atol=1e-9)
        assert fold_weights[k][0][1] < 0.02          # the noise member gets (almost) no weight from other folds
        by_hand[fold_of == k] = w * good[fold_of == k, 0] + (1 - w) * noise[fold_of == k, 0]
    np.testing.assert_allclose(blended[:, 0], by_hand, atol=1e-12)

    w_all = fit_weights(preds, y, "nnls")
    in_sample = mcrmse(y, apply_weights(preds, w_all))
    honest = mcrmse(y, blended)
    assert honest == pytest.approx(mcrmse(y[:, 0], by_hand))
    assert honest >= in_sample


# --- run folders ------------------------------------------------------------------------


def fake_run(root: Path, name: str, train_file: Path, ids, folds, preds) -> Path:
    run = root / name
    run.mkdir(parents=True)
    save_config(load_config(None, [f"data.train_file={train_file}", "data.target_columns=a,b",
                                   "data.id_column=id", "data.text_column=text", "folds.n_splits=2"]),
                run / "config.yaml")
    oof = pd.DataFrame(np.asarray(preds), columns=TARGETS)
    oof.insert(0, "fold", folds)
    oof.insert(0, "id", ids)
    oof.to_csv(run / "oof.csv", index=False)
    return run


@pytest.fixture
def two_runs(tmp_path):
    rng = np.random.default_rng(4)
    n = 40
    ids = [f"e{i:02d}" for i in range(n)]
    y = rng.normal(3, 0.6, (n, 2)).round(1)
    train = pd.DataFrame({"id": ids, "text": [f"essay {i}" for i in ids], "a": y[:, 0], "b": y[:, 1]})
    train.to_csv(tmp_path / "train.csv", index=False)
    folds = np.tile([0, 1], n // 2)
    p1 = y + rng.normal(0, 0.2, y.shape)
    p2 = y + rng.normal(0, 0.3, y.shape)
    # the second run lists its rows in another order: the blend matches them by id
    order = rng.permutation(n)
    r1 = fake_run(tmp_path, "runs/one", tmp_path / "train.csv", ids, folds, p1)
    r2 = fake_run(tmp_path, "runs/two", tmp_path / "train.csv", [ids[i] for i in order], folds[order], p2[order])
    return tmp_path, r1, r2, y, folds, np.stack([p1, p2])


def test_blend_file_holds_weights_and_both_scores(two_runs, capsys):
    root, r1, r2, y, folds, preds = two_runs
    out = root / "blends" / "blend.json"
    assert main([str(r1), str(r2), "--out", str(out)]) == 0
    blend = json.loads(out.read_text())
    assert blend["members"] == ["../runs/one", "../runs/two"]            # relative to the file
    assert blend["target_columns"] == TARGETS and blend["n_rows"] == 40 and blend["n_folds"] == 2
    w = fit_weights(preds, y, "nnls")
    np.testing.assert_allclose([blend["weights"][t] for t in TARGETS], w, atol=1e-12)
    assert blend["oof_in_sample"]["mcrmse"] == pytest.approx(mcrmse(y, apply_weights(preds, w)))
    honest, _ = honest_blend(preds, y, folds, "nnls")
    assert blend["oof_honest"]["mcrmse"] == pytest.approx(mcrmse(y, honest))
    assert blend["members_oof"][str(r2)]["mcrmse"] == pytest.approx(mcrmse(y, preds[1]))
    printed = capsys.readouterr().out
    assert "honest" in printed and f"{blend['oof_honest']['mcrmse']:.4f}" in printed
    _, runs = read_blend(out)
    assert runs == [r1.resolve(), r2.resolve()]


def test_runs_on_other_folds_are_refused_naming_the_runs_and_an_id(two_runs, capsys):
    root, r1, _, y, folds, preds = two_runs
    ids = [f"e{i:02d}" for i in range(40)]
    shifted = folds.copy()
    shifted[5] = 1 - shifted[5]
    r3 = fake_run(root, "runs/three", root / "train.csv", ids, shifted, preds[1])
    with pytest.raises(EnsembleError, match=r"runs .*one and .*three were trained on different folds: id e05 "
                                            r"is in fold 1 of .*one and fold 0 of .*three \(1 ids differ\)"):
        build_blend([r1, r3], root / "b.json")
    assert not (root / "b.json").exists()
    # the command line says the same and exits 2
    assert main([str(r1), str(r3), "--out", str(root / "b.json")]) == 2
    assert "different folds: id e05" in capsys.readouterr().err

    r4 = fake_run(root, "runs/four", root / "train.csv", ids[:-1], folds[:-1], preds[1][:-1])
    with pytest.raises(EnsembleError, match=r"different rows: id e39 is only in .*one"):
        build_blend([r1, r4], root / "b.json")


def test_a_changed_train_file_is_refused(two_runs):
    root, r1, r2, *_ = two_runs
    (r1 / "run.json").write_text(json.dumps({"train_file_sha256": "0" * 64}))
    with pytest.raises(EnsembleError, match="SHA-256 differs"):
        build_blend([r1, r2], root / "b.json")
