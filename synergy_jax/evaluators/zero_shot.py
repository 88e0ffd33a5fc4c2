"""Zero-shot classification evaluator: nearest class embedding, the classes described by text prompts.

A class embedding is the mean of its prompts' normalised embeddings (every synonym x template), renormalised:
CLIP's prompt ensembling. Labels may list comma-separated synonyms (VGGSound style).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from synergy_jax.evaluators.classification import class_accuracies, confusion_matrix


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


def classes_from_prompts(
    embed_prompts: Callable[[Sequence[str]], np.ndarray], class_names: Sequence[Sequence[str]], templates: Sequence[str]
) -> np.ndarray:
    """(C, D) class embeddings: every (template, name) prompt of each class embedded and ensembled."""
    prompts, owners = prompts_for_classes(class_names, templates)
    return class_embeddings(embed_prompts(prompts), owners, len(class_names))


def classification_results(
    queries: np.ndarray, classes: np.ndarray, labels: np.ndarray, class_names: Sequence[str], folds=None
) -> dict:
    """Top-1/5, per-class accuracy and the confusion matrix over the whole split (and per fold when there are)."""
    results = zero_shot_metrics(queries, classes, labels)
    predictions = np.argmax(queries @ classes.T, axis=1)
    matrix = confusion_matrix(labels, predictions, len(class_names))
    results["num_examples"] = int(len(labels))
    results["per_class"] = {name: (None if np.isnan(a) else float(a)) for name, a in zip(class_names, class_accuracies(matrix))}
    results["confusion_matrix"] = matrix.tolist()
    if folds is not None and len(np.unique(folds)) > 1:
        by_fold = {int(f): zero_shot_metrics(queries[folds == f], classes, labels[folds == f]) for f in np.unique(folds)}
        results["folds"] = {str(f): m for f, m in by_fold.items()}
        top1 = np.asarray([m["top1"] for m in by_fold.values()])
        results["fold_mean_top1"], results["fold_std_top1"] = float(top1.mean()), float(top1.std())
    return results


def evaluator(
    embed_prompts: Callable[[Sequence[str]], np.ndarray], labels: Sequence[str], templates: Mapping[str, Sequence[str]]
) -> Callable[[Mapping[str, np.ndarray]], dict[str, float]]:
    """The evaluator: image->text and audio->text accuracy against the split's label prompts (`templates` per
    query modality), from its 'image'/'audio' columns and 'label_id'."""

    def evaluate(columns: Mapping[str, np.ndarray]) -> dict[str, float]:
        names = class_names_from_labels(labels)
        metrics = {}
        for modality, modality_templates in templates.items():
            classes = classes_from_prompts(embed_prompts, names, modality_templates)
            scores = zero_shot_metrics(columns[modality], classes, columns["label_id"])
            metrics.update({f"zero_shot/{modality}->text/{k}": v for k, v in scores.items()})
        return metrics

    return evaluate
