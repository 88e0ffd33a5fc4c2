"""GLUE metrics on host NumPy: accuracy, binary F1, Matthews correlation, Pearson and Spearman correlation.

Fine-tuning evaluates on the host after gathering the logits, so these are plain NumPy (no sklearn/scipy needed
at run time). Each follows the definition GLUE's scorers use (sklearn's `accuracy_score`, `f1_score` with
pos_label=1, `matthews_corrcoef`; scipy's `pearsonr` and `spearmanr`), including their degenerate cases:

- F1 with no true and no predicted positives is 0 (sklearn's zero_division default);
- MCC is 0 when predictions or labels are constant (a zero denominator), as sklearn;
- Pearson/Spearman of a constant input are undefined: NaN, as scipy (callers ranking models must treat NaN as
  worst, e.g. with `numpy.nanargmax`).

`task_metrics` turns a task's logits (classification, (N, C)) or scores (regression, (N,) or (N, 1)) and its labels
into GLUE's named metrics (docs/reference.md R5.3; the names are `data_pipelines.glue.TaskSpec.metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman", "pearson_spearman_mean")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def class_accuracies(matrix: np.ndarray) -> np.ndarray:
    """Per-class recall from a confusion matrix (NaN for classes without examples)."""
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(matrix) / np.maximum(totals, 1), np.nan)


def _pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim != 1 or predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must be the same 1-D shape")
    if len(labels) == 0:
        raise ValueError("metrics need at least one example")
    return predictions, labels


def accuracy(predictions, labels) -> float:
    """Fraction of predictions equal to the label."""
    predictions, labels = _pair(predictions, labels)
    return float(np.mean(predictions == labels))


def f1(predictions, labels) -> float:
    """Binary F1 of class 1 (GLUE's MRPC/QQP F1); 0 when there are no true and no predicted positives."""
    predictions, labels = _pair(predictions, labels)
    for name, values in (("predictions", predictions), ("labels", labels)):
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"binary F1 needs 0/1 {name}, got values {np.unique(values)[:5]}")
    true_positive = int(np.sum((predictions == 1) & (labels == 1)))
    wrong = int(np.sum(predictions != labels))  # false positives + false negatives
    denominator = 2 * true_positive + wrong
    return 2.0 * true_positive / denominator if denominator else 0.0


def matthews_corrcoef(predictions, labels, num_classes: int | None = None) -> float:
    """Matthews correlation (multi-class form, as sklearn) from the confusion matrix; 0 when undefined.

    Computed in float64: the products of the covariance terms overflow int64 at GLUE sizes.
    """
    predictions, labels = _pair(predictions, labels)
    if min(predictions.min(), labels.min()) < 0:
        raise ValueError("class ids must be non-negative")
    num_classes = num_classes or int(max(predictions.max(), labels.max())) + 1
    matrix = confusion_matrix(labels, predictions, num_classes).astype(np.float64)
    true_sums, predicted_sums = matrix.sum(axis=1), matrix.sum(axis=0)
    total, correct = matrix.sum(), np.trace(matrix)
    covariance = correct * total - true_sums @ predicted_sums
    predicted_variance = total**2 - predicted_sums @ predicted_sums
    true_variance = total**2 - true_sums @ true_sums
    if predicted_variance * true_variance == 0:
        return 0.0
    return float(covariance / np.sqrt(predicted_variance * true_variance))


def pearson(predictions, labels) -> float:
    """Pearson correlation; NaN when either side is constant (or fewer than 2 examples), as scipy."""
    x, y = (np.asarray(v, np.float64) for v in _pair(predictions, labels))
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("correlation inputs must be finite")
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt((x @ x) * (y @ y))
    if len(x) < 2 or norm == 0:
        return float("nan")
    return float(np.clip((x @ y) / norm, -1.0, 1.0))


def average_ranks(values) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (scipy's rankdata method='average')."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], len(values)]  # exclusive
    ranks = np.empty(len(values), np.float64)
    ranks[order] = ((starts + ends - 1) / 2.0 + 1.0)[group]
    return ranks


def spearman(predictions, labels) -> float:
    """Spearman correlation: Pearson of the average ranks (ties averaged, as scipy); NaN when undefined."""
    predictions, labels = _pair(predictions, labels)
    for values in (predictions, labels):
        if not np.isfinite(np.asarray(values, np.float64)).all():
            raise ValueError("correlation inputs must be finite")
    return pearson(average_ranks(predictions), average_ranks(labels))


def task_metrics(logits_or_scores, labels, metric_names: Sequence[str]) -> dict[str, float]:
    """GLUE's named metrics of one evaluation.

    Classification metrics (accuracy, f1, mcc) take (N, C) logits, predicted class = argmax (first on ties);
    regression metrics (pearson, spearman, pearson_spearman_mean) take (N,) or (N, 1) scores. Mixing the kinds
    in one call is an error: a task is one or the other.
    """
    unknown = [name for name in metric_names if name not in CLASSIFICATION_METRICS + REGRESSION_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(CLASSIFICATION_METRICS + REGRESSION_METRICS)}")
    kinds = {name in REGRESSION_METRICS for name in metric_names}
    if len(kinds) > 1:
        raise ValueError(f"{list(metric_names)} mixes classification and regression metrics")
    values, labels = np.asarray(logits_or_scores), np.asarray(labels)
    if kinds == {True}:
        return _regression_metrics(values, labels, metric_names)
    if values.ndim != 2 or values.shape[1] < 2:
        raise ValueError(f"classification metrics need (N, C>=2) logits, got shape {values.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= values.shape[1]):
        raise ValueError(f"labels must be class ids in 0..{values.shape[1] - 1}")
    predictions = np.argmax(values, axis=1)
    compute = {
        "accuracy": lambda: accuracy(predictions, labels),
        "f1": lambda: f1(predictions, labels),
        "mcc": lambda: matthews_corrcoef(predictions, labels, values.shape[1]),
    }
    return {name: compute[name]() for name in metric_names}


def _regression_metrics(scores: np.ndarray, labels: np.ndarray, metric_names: Sequence[str]) -> dict[str, float]:
    """Pearson/Spearman of (N,) or (N, 1) scores against float labels, and their mean (GLUE's STS-B number)."""
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if scores.ndim != 1:
        raise ValueError(f"regression metrics need (N,) or (N, 1) scores, got shape {scores.shape}")
    values = {"pearson": pearson(scores, labels), "spearman": spearman(scores, labels)}
    values["pearson_spearman_mean"] = (values["pearson"] + values["spearman"]) / 2.0
    return {name: float(values[name]) for name in metric_names}
