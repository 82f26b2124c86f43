"""Classification metrics with bootstrap intervals, slide-level aggregation, and plots.

Metrics (one-vs-rest AUC per class and their macro mean, accuracy, macro F1,
quadratic weighted kappa, confusion matrix) are computed on any unit: tiles,
slides or patients. Slide and patient predictions come from the worker's own
aggregation (:func:`her2_core.aggregate.class_percentages` with the predicted
tumour fractions, then :func:`her2_core.aggregate.asco_cap_call`), so they are
what the worker would report.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score, roc_auc_score, roc_curve

from her2_core.aggregate import CLASSES, asco_cap_call, class_percentages
from model_training.tileset import CALL_CLASS

#: Width (percentage points) of the logistic ramps of :func:`soft_call_scores`.
SOFT_CALL_WIDTH = 2.0
SCALAR_METRICS = ("macro_auc", "accuracy", "macro_f1", "qwk")


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, y_pred: np.ndarray | None = None,
                           classes: tuple[str, ...] = CLASSES) -> dict:
    """Metrics of integer labels ``y_true`` (n,) against class scores (n, C).

    ``y_pred`` defaults to the argmax of ``scores``. AUC of a class absent
    from ``y_true`` (or present alone) is NaN and left out of the macro mean.
    """
    n_classes = len(classes)
    y_pred = scores.argmax(axis=1) if y_pred is None else y_pred
    per_class = {}
    for k, name in enumerate(classes):
        positive = y_true == k
        per_class[name] = float(roc_auc_score(positive, scores[:, k])) if 0 < positive.sum() < len(y_true) else np.nan
    aucs = [v for v in per_class.values() if np.isfinite(v)]
    labels = list(range(n_classes))
    agree = float(np.mean(y_true == y_pred)) if len(y_true) else np.nan
    with warnings.catch_warnings():  # the undefined case is handled just below
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        qwk = float(cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic", replace_undefined_by=np.nan))
    if np.isnan(qwk):  # kappa is 0/0 when truth and prediction each use one class: perfect if they agree
        qwk = 1.0 if agree == 1.0 else 0.0
    return {
        "n": len(y_true),
        "macro_auc": float(np.mean(aucs)) if aucs else np.nan,
        "per_class_auc": per_class,
        "accuracy": agree,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "qwk": qwk,
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def bootstrap_intervals(y_true: np.ndarray, scores: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...],
                        n_boot: int = 500, seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals (resampling units with replacement) of the scalar metrics and per-class AUC."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        i = rng.integers(0, len(y_true), len(y_true))
        m = classification_metrics(y_true[i], scores[i], y_pred[i], classes)
        for key in SCALAR_METRICS:
            samples.setdefault(key, []).append(m[key])
        for name, v in m["per_class_auc"].items():
            samples.setdefault(f"auc_{name}", []).append(v)
    alpha = (1 - level) / 2
    out = {}
    for key, values in samples.items():
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v)]
        out[key] = [float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))] if len(v) else [np.nan, np.nan]
    return out


def soft_call_scores(pct: dict[str, float], evidence_floor: float) -> np.ndarray:
    """A continuous version of the ASCO/CAP top-down rules: scores (4,) for 0 / 1+ / 2+ / 3+ summing to 1.

    Each ">x %" test of :func:`her2_core.aggregate.asco_cap_call` becomes a
    logistic ramp of width :data:`SOFT_CALL_WIDTH` points around x, applied
    top-down; the hard call is (up to ties at the thresholds) the argmax. Used
    only to rank slides for AUC; the predicted class is the hard call.
    """
    def above(value: float, threshold: float) -> float:
        return float(1.0 / (1.0 + np.exp(-(value - threshold) / SOFT_CALL_WIDTH)))

    three = above(pct["3+"], 10.0)
    two = 1.0 - (1.0 - above(pct["2+"], 10.0)) * (1.0 - above(pct["3+"], evidence_floor))
    one = above(pct["1+"] + pct["2+"], 10.0)
    s3 = three
    s2 = (1 - three) * two
    s1 = (1 - three) * (1 - two) * one
    return np.array([1.0 - s3 - s2 - s1, s1, s2, s3])


def aggregate_groups(groups: np.ndarray, probabilities: np.ndarray, tumour: np.ndarray,
                     evidence_floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group (slide or patient) ASCO/CAP call as a class index, soft call scores and group ids.

    ``probabilities`` is (n, 4) or (n, 3) for a 1+/2+/3+ head (class 0 then has probability 0).
    """
    if probabilities.shape[1] == len(CLASSES) - 1:
        probabilities = np.concatenate([np.zeros((len(probabilities), 1), probabilities.dtype), probabilities], 1)
    ids = np.unique(groups)
    pred = np.zeros(len(ids), int)
    scores = np.zeros((len(ids), len(CLASSES)))
    for j, gid in enumerate(ids):
        sel = groups == gid
        pct = class_percentages(probabilities[sel], tumour[sel])
        call = asco_cap_call(pct, evidence_floor)
        pred[j] = CALL_CLASS.get(call, 0)
        scores[j] = soft_call_scores(pct, evidence_floor)
    return pred, scores, ids


def report(y_true: np.ndarray, scores: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...],
           n_boot: int, seed: int = 0) -> dict:
    """Metrics plus bootstrap 95 % intervals (``ci95``)."""
    out = classification_metrics(y_true, scores, y_pred, classes)
    out["ci95"] = bootstrap_intervals(y_true, scores, y_pred, classes, n_boot, seed) if n_boot else {}
    return out


def plot_roc(y_true: np.ndarray, scores: np.ndarray, classes: tuple[str, ...], title: str, path: Path) -> None:
    """One-vs-rest ROC curves of every class present, as PNG."""
    fig, ax = _figure()
    for k, name in enumerate(classes):
        positive = y_true == k
        if 0 < positive.sum() < len(y_true):
            fpr, tpr, _ = roc_curve(positive, scores[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positive, scores[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="lower right")
    _save(fig, path)


def plot_confusion(confusion: list[list[int]], classes: tuple[str, ...], title: str, path: Path) -> None:
    """Confusion matrix (rows: truth, columns: prediction) as PNG."""
    fig, ax = _figure()
    cm = np.asarray(confusion)
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="truth", title=title)
    _save(fig, path)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(4.5, 4.5))


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

