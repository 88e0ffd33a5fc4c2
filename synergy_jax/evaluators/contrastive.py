"""Contrastive-loss evaluator: the tri-modal InfoNCE pair losses of a whole split, computed on host.

The split is cut into consecutive contrastive batches of the training microbatch's size, so the number is
comparable with the training loss, padding never enters, and it does not depend on the mesh.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from synergy_jax.models.synergy import PAIRS


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


def evaluator(
    log_scales: Mapping[str, float], batch_size: int, weights: Mapping[str, float] | None = None
) -> Callable[[Mapping[str, np.ndarray]], dict[str, float]]:
    """The evaluator: pair losses at the model's current temperatures (`log_scales`, clamped as in training)."""
    return lambda columns: contrastive_losses(columns, log_scales, batch_size, weights)
