"""GLUE metrics (synergy_jax/evaluators/classification.py) against sklearn and scipy, degenerate cases included."""

import warnings

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from data_pipelines import glue
from synergy_jax.evaluators import classification as metrics
from synergy_jax.evaluators import zero_shot


def sk_quiet(function, *args, **kwargs):
    """sklearn/scipy warn on the degenerate cases whose values we check; silence only that."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


@pytest.mark.parametrize("num_classes,size,seed", [(2, 50, 0), (2, 7, 1), (3, 200, 2), (5, 1000, 3)])
def test_classification_metrics_match_sklearn(num_classes, size, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size)
    predictions = np.where(rng.random(size) < 0.6, labels, rng.integers(0, num_classes, size))
    assert metrics.accuracy(predictions, labels) == pytest.approx(sklearn.metrics.accuracy_score(labels, predictions))
    assert metrics.matthews_corrcoef(predictions, labels) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(labels, predictions), abs=1e-12
    )
    if num_classes == 2:
        assert metrics.f1(predictions, labels) == pytest.approx(sklearn.metrics.f1_score(labels, predictions))
    np.testing.assert_array_equal(
        metrics.confusion_matrix(labels, predictions, num_classes),
        sklearn.metrics.confusion_matrix(labels, predictions, labels=range(num_classes)),
    )


def test_degenerate_classification_cases():
    labels = np.array([0, 1, 1, 0, 1, 0])
    constant = np.ones_like(labels)
    # constant predictions: MCC's denominator is 0 -> 0, as sklearn
    assert sk_quiet(sklearn.metrics.matthews_corrcoef, labels, constant) == 0.0
    assert metrics.matthews_corrcoef(constant, labels) == 0.0
    assert metrics.matthews_corrcoef(labels, np.zeros_like(labels)) == 0.0  # constant labels
    # no positives at all -> F1 0 (sklearn's zero_division default), not NaN
    zeros = np.zeros_like(labels)
    assert metrics.f1(zeros, zeros) == 0.0 == sk_quiet(sklearn.metrics.f1_score, zeros, zeros)
    # positives only predicted, none true: F1 0; positives true, none predicted: F1 0
    assert metrics.f1(labels, zeros) == 0.0 and metrics.f1(zeros, labels) == 0.0
    assert metrics.f1(labels, labels) == 1.0 and metrics.matthews_corrcoef(labels, labels) == 1.0
    assert metrics.matthews_corrcoef(1 - labels, labels) == -1.0
    with pytest.raises(ValueError, match="binary F1 needs 0/1"):
        metrics.f1(np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="same 1-D shape"):
        metrics.accuracy(np.zeros(3), np.zeros(4))


def test_mcc_does_not_overflow_at_glue_sizes():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 400_000)  # MNLI train size: products of covariances exceed int64
    predictions = np.where(rng.random(len(labels)) < 0.8, labels, rng.integers(0, 3, len(labels)))
    assert metrics.matthews_corrcoef(predictions, labels) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(labels, predictions), abs=1e-10
    )


def test_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 6, 300).astype(np.float32)  # STS-B-like scores with many ties
    scores = labels + rng.normal(0, 1.5, 300).astype(np.float32)
    scores[:40] = np.round(scores[:40])  # ties in the predictions too
    exact = scores.astype(np.float64), labels.astype(np.float64)  # scipy 1.17 computes float32 inputs in float32
    assert metrics.pearson(scores, labels) == pytest.approx(scipy.stats.pearsonr(*exact)[0], abs=1e-9)
    assert metrics.spearman(scores, labels) == pytest.approx(scipy.stats.spearmanr(*exact)[0], abs=1e-9)
    np.testing.assert_allclose(metrics.average_ranks(labels), scipy.stats.rankdata(labels, method="average"))
    np.testing.assert_allclose(metrics.average_ranks([3.0, 1.0, 3.0, 2.0, 3.0]), [4.0, 1.0, 4.0, 2.0, 4.0])


def test_degenerate_correlations_are_nan_as_scipy():
    labels = np.array([0.0, 1.0, 2.0, 3.0])
    constant = np.full(4, 2.5)
    assert np.isnan(sk_quiet(scipy.stats.pearsonr, constant, labels)[0])
    assert np.isnan(sk_quiet(scipy.stats.spearmanr, constant, labels)[0])
    assert np.isnan(metrics.pearson(constant, labels)) and np.isnan(metrics.spearman(constant, labels))
    assert metrics.pearson(-labels, labels) == -1.0 and metrics.spearman(labels**3, labels) == 1.0
    with pytest.raises(ValueError, match="finite"):
        metrics.pearson(np.array([0.0, np.nan, 1.0]), np.array([0.0, 1.0, 2.0]))


def test_task_metrics_names_and_inputs():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(60, 2))
    labels = rng.integers(0, 2, 60)
    predictions = logits.argmax(1)
    result = metrics.task_metrics(logits, labels, ("f1", "accuracy", "mcc"))
    assert list(result) == ["f1", "accuracy", "mcc"]
    assert result["f1"] == pytest.approx(sklearn.metrics.f1_score(labels, predictions))
    assert result["accuracy"] == pytest.approx(np.mean(predictions == labels))
    assert result["mcc"] == pytest.approx(sklearn.metrics.matthews_corrcoef(labels, predictions))
    # three classes: MCC over the logits' class count
    logits3, labels3 = rng.normal(size=(90, 3)), rng.integers(0, 3, 90)
    assert metrics.task_metrics(logits3, labels3, ["mcc"])["mcc"] == pytest.approx(
        sklearn.metrics.matthews_corrcoef(labels3, logits3.argmax(1))
    )
    # regression: (N, 1) head output or (N,) scores
    scores, targets = rng.normal(size=(50, 1)), rng.uniform(0, 5, 50)
    stsb = metrics.task_metrics(scores, targets, glue.TASKS["stsb"].metrics)
    expected_p = scipy.stats.pearsonr(scores[:, 0], targets)[0]
    expected_s = scipy.stats.spearmanr(scores[:, 0], targets)[0]
    assert stsb["pearson"] == pytest.approx(expected_p) and stsb["spearman"] == pytest.approx(expected_s)
    assert stsb["pearson_spearman_mean"] == pytest.approx((expected_p + expected_s) / 2)
    assert metrics.task_metrics(scores[:, 0], targets, ["spearman"]) == {"spearman": pytest.approx(expected_s)}
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.task_metrics(logits, labels, ["acc"])
    with pytest.raises(ValueError, match="mixes classification and regression"):
        metrics.task_metrics(logits, labels, ["accuracy", "pearson"])
    with pytest.raises(ValueError, match=r"need \(N, C>=2\) logits"):
        metrics.task_metrics(scores, labels, ["accuracy"])
    with pytest.raises(ValueError, match="class ids in 0..1"):
        metrics.task_metrics(logits, np.full(60, 2), ["accuracy"])
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, 1\) scores"):
        metrics.task_metrics(logits, targets[:60], ["pearson"])


def test_confusion_matrix_is_the_zero_shot_one_and_every_task_metric_is_known():
    assert metrics.confusion_matrix is zero_shot.confusion_matrix
    for spec in glue.TASKS.values():
        kind = metrics.REGRESSION_METRICS if spec.is_regression else metrics.CLASSIFICATION_METRICS
        assert set(spec.metrics) <= set(kind), spec.name
