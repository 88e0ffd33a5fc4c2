"""Retrieval evaluator: item i of one modality is the positive of item i of the other, over a whole split.

Rank = number of candidates scored strictly higher than the positive (0 = retrieved first; ties count in the
query's favour, as open_clip does); R@K = fraction of queries with rank < K. Six directions: image<->text,
text<->audio, audio<->image. Pure numpy on host arrays (a split's embeddings fit in host memory: 15k x 1024 floats
is 60 MB), so every job computes the same numbers whatever mesh produced the embeddings.
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


def evaluate(columns: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The evaluator: six-direction retrieval over a split's normalised 'image', 'text' and 'audio' columns."""
    return retrieval_metrics({m: columns[m] for m in ("image", "text", "audio")})
