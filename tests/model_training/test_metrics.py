"""Metrics on constructed predictions where the answer is known."""

import numpy as np

from her2_core.aggregate import CLASSES
from model_training.metrics import aggregate_groups, classification_metrics, report, soft_call_scores


def test_perfect_predictions_score_one():
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    scores = np.eye(4)[y] * 0.9 + 0.025
    m = classification_metrics(y, scores)
    assert m["macro_auc"] == 1.0 and m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["qwk"] == 1.0
    assert all(v == 1.0 for v in m["per_class_auc"].values())
    assert np.trace(np.array(m["confusion"])) == 8


def test_off_by_one_costs_less_kappa_than_off_by_three():
    y = np.array([0, 1, 2, 3] * 5)
    near = np.minimum(y + (np.arange(20) % 5 == 0), 3)
    far = np.where(np.arange(20) % 5 == 0, 3 - y, y)
    k_near = classification_metrics(y, np.eye(4)[near], near)["qwk"]
    k_far = classification_metrics(y, np.eye(4)[far], far)["qwk"]
    assert 0 < k_far < k_near < 1


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    scores = np.eye(4)[y] + rng.normal(0, 0.6, (200, 4))
    r = report(y, scores, scores.argmax(1), CLASSES, n_boot=200)
    for key in ("macro_auc", "accuracy", "macro_f1", "qwk"):
        lo, hi = r["ci95"][key]
        assert lo <= r[key] <= hi and hi - lo < 0.3
    assert set(r["ci95"]) >= {f"auc_{c}" for c in CLASSES}


def test_soft_call_follows_the_asco_cap_rules():
    assert soft_call_scores({"0": 100, "1+": 0, "2+": 0, "3+": 0}, 2.0).argmax() == 0
    assert soft_call_scores({"0": 70, "1+": 30, "2+": 0, "3+": 0}, 2.0).argmax() == 1
    assert soft_call_scores({"0": 50, "1+": 20, "2+": 30, "3+": 0}, 2.0).argmax() == 2
    assert soft_call_scores({"0": 80, "1+": 0, "2+": 0, "3+": 20}, 2.0).argmax() == 3
    assert np.isclose(soft_call_scores({"0": 25, "1+": 25, "2+": 25, "3+": 25}, 2.0).sum(), 1.0)


def test_slide_aggregation_weights_by_tumour_fraction():
    probs = np.array([[1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0.0]])
    groups = np.array(["a", "a", "b"])
    # slide a: the 3+ tile holds 20 % of the tumour -> 3+; without it (tumour 0) -> 0.
    pred, _, ids = aggregate_groups(groups, probs, np.array([0.8, 0.2, 0.5]), 2.0)
    assert list(ids) == ["a", "b"] and list(pred) == [3, 1]
    pred, _, _ = aggregate_groups(groups, probs, np.array([0.8, 0.0, 0.5]), 2.0)
    assert list(pred) == [0, 1]
    # a 3-class head (1+/2+/3+) aggregates with class 0 at probability 0
    pred, _, _ = aggregate_groups(groups, probs[:, 1:], np.array([0.5, 0.5, 0.5]), 2.0)
    assert list(pred) == [3, 1]
