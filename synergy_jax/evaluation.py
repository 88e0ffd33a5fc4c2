"""Evaluation metrics on embeddings: tri-modal retrieval, zero-shot classification, contrastive losses.

Pure numpy on host arrays (the embeddings of a whole evaluation split fit in host memory: 15k x 1024 floats is
60 MB), so every job (pre-training evals, zero-shot, MMR) computes the same numbers the same way, whatever mesh
produced the embeddings. Inputs are L2-normalised embeddings as the model returns them.

Retrieval: item i of one modality is the positive of item i of the other. Rank = number of candidates scored
strictly higher than the positive (0 = retrieved first; ties count in the query's favour, as open_clip does);
R@K = fraction of queries with rank < K. Six directions: image<->text, text<->audio, audio<->image.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from synergy_jax.models.synergy import PAIRS

RECALL_KS = (1, 5, 10)
# (query modality, candidate modality) for the six retrieval directions, in the order results are printed.
DIRECTIONS = tuple((a, b) for a, b in PAIRS.values()) + tuple((b, a) for a, b in PAIRS.values())


def positive_ranks(queries: np.ndarray, candidates: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Rank of candidate i for query i (0 = best) by cosine similarity, computed in row chunks."""
    if queries.shape != candidates.shape:
        raise ValueError(f"paired retrieval needs equal shapes, got {queries.shape} and {candidates.shape}")
    queries = np.asarray(queries, np.float32)
    candidates = np.asarray(candidates, np.float32)
    ranks = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ candidates.T
        rows = np.arange(scores.shape[0])
        positive = scores[rows, start + rows]
        ranks[start : start + chunk] = np.sum(scores > positive[:, None], axis=1)
    return ranks


def recall_at(ranks: np.ndarray, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    return {f"R@{k}": float(np.mean(ranks < k)) for k in ks}


def retrieval_metrics(embeddings: Mapping[str, np.ndarray], ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """R@K, median and mean rank (1-based, as usually reported) for the six directions over the whole split."""
    metrics = {}
    for query, candidate in DIRECTIONS:
        ranks = positive_ranks(embeddings[query], embeddings[candidate])
        name = f"retrieval/{query}->{candidate}"
        metrics.update({f"{name}/{key}": value for key, value in recall_at(ranks, ks).items()})
        metrics[f"{name}/median_rank"] = float(np.median(ranks) + 1)
        metrics[f"{name}/mean_rank"] = float(np.mean(ranks) + 1)
    return metrics


def _cross_entropy(logits: np.ndarray) -> float:
    """Mean softmax cross-entropy with the diagonal as the targets (float64 for a stable host reference)."""
    logits = logits.astype(np.float64)
    peak = logits.max(axis=1, keepdims=True)
    log_norm = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
    return float(np.mean(log_norm - np.diag(logits)))


def contrastive_losses(
    embeddings: Mapping[str, np.ndarray],
    log_scales: Mapping[str, float],
    batch_size: int,
    weights: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The symmetric InfoNCE pair losses over consecutive batches of `batch_size` real examples.

    Mean over batches weighted by batch length (the last batch may be short), so eval padding never enters and the
    number does not depend on the mesh. `batch_size` is the contrastive batch (the training microbatch with global
    negatives). Returns 'loss/it', 'loss/ta', 'loss/ai' and the weighted 'loss'.
    """
    count = len(next(iter(embeddings.values())))
    weights = weights or {pair: 1.0 for pair in PAIRS}
    sums = {pair: 0.0 for pair in PAIRS}
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        for pair, (a, b) in PAIRS.items():
            logits = np.exp(log_scales[pair]) * (
                embeddings[a][start : start + size].astype(np.float64) @ embeddings[b][start : start + size].T
            )
            sums[pair] += size * 0.5 * (_cross_entropy(logits) + _cross_entropy(logits.T))
    metrics = {f"loss/{pair}": total / count for pair, total in sums.items()}
    metrics["loss"] = sum(weights[pair] * metrics[f"loss/{pair}"] for pair in PAIRS)
    return metrics


def class_names_from_labels(labels: Sequence[str]) -> list[list[str]]:
    """Comma-separated synonym labels (VGGSound style) -> per class the list of names; underscores to spaces."""
    return [[name.strip().replace("_", " ") for name in label.split(",") if name.strip()] for label in labels]


def prompts_for_classes(
    class_names: Sequence[Sequence[str]], templates: Sequence[str]
) -> tuple[list[str], np.ndarray]:
    """Every (template, name) prompt of every class, and the class index of each prompt."""
    prompts, owners = [], []
    for index, names in enumerate(class_names):
        for name in names:
            for template in templates:
                prompts.append(template.format(name))
                owners.append(index)
    return prompts, np.asarray(owners, np.int64)


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def class_embeddings(prompt_embeddings: np.ndarray, owners: np.ndarray, num_classes: int) -> np.ndarray:
    """Per class: the mean of its normalised prompt embeddings, renormalised (CLIP's prompt ensembling)."""
    prompt_embeddings = normalize(prompt_embeddings)
    sums = np.zeros((num_classes, prompt_embeddings.shape[1]), np.float64)
    np.add.at(sums, owners, prompt_embeddings)
    if np.any(np.bincount(owners, minlength=num_classes) == 0):
        raise ValueError("every class needs at least one prompt")
    return normalize(sums)


def zero_shot_metrics(
    queries: np.ndarray, classes: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-K accuracy and mean per-class accuracy of nearest-class-embedding classification.

    `queries` (N, D) and `classes` (C, D) normalised; `labels` (N,) class indices (negative = unknown, excluded).
    """
    known = labels >= 0
    queries, labels = queries[known], labels[known]
    if len(labels) == 0:
        raise ValueError("zero-shot evaluation needs at least one example with a known label")
    scores = np.asarray(queries, np.float32) @ np.asarray(classes, np.float32).T
    positive = scores[np.arange(len(labels)), labels]
    ranks = np.sum(scores > positive[:, None], axis=1)
    metrics = {f"top{k}": float(np.mean(ranks < k)) for k in ks if k <= classes.shape[0]}
    present = np.unique(labels)
    metrics["per_class_accuracy"] = float(np.mean([np.mean(ranks[labels == c] == 0) for c in present]))
    metrics["chance"] = 1.0 / classes.shape[0]
    return metrics


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
