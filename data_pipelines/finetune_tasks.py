"""The examples of each fine-tuning task in its official layout, split for one sub-run of a sweep.

Every sub-run trains on `train`, picks its epoch on `select` (the clean protocol's validation part: the official
validation split where the task has one, else a seeded, stratified held-out share of the training examples), and
reports `report` (the fold, the test split, or GLUE's validation split: GLUE's test labels are not public). Both
protocols are read from the same run (synergy_jax/finetune.py), so `train` never contains `select` or `report`.

    demo           the demo run's raw files (train + test manifests), audio, 5 seeded stratified folds
    esc50          ESC-50 (5 official folds)            urbansound8k   UrbanSound8K (10 official folds)
    cifar10/100, pets, flowers102   prepared TFDS data dirs (train / test; Flowers: train / validation / test)
    folder         <data_dir>/train/<class>/..., <data_dir>/test/<class>/... (optional <data_dir>/validation/)
    GLUE tasks     the GLUE download's TSV folders or prepared TFDS glue/* data dirs (data_pipelines/glue.py)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines import downstream
from data_pipelines.finetune_input import kfold_indices, stratified_holdout
from synergy_jax.distributed import log
from synergy_jax.errors import SetupError

TFDS = {"cifar10": ("cifar10", "train", None, "test"), "cifar100": ("cifar100", "train", None, "test"),
        "pets": ("oxford_iiit_pet", "train", None, "test"),
        "flowers102": ("oxford_flowers102", "train", "validation", "test")}  # fmt: skip
DEMO_FOLDS = 5


@dataclasses.dataclass(frozen=True)
class Splits:
    """One sub-run's examples: (set, indices) to train on, to select the epoch on, and to report."""

    train: Any
    train_idx: np.ndarray
    select: Any
    select_idx: np.ndarray
    report: Any
    report_idx: np.ndarray
    class_names: tuple[str, ...]
    regression: bool = False

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.class_names)


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A task's sets, read once per sweep. `folds` is None for tasks without folds."""

    name: str
    train: Any
    report: Any
    validation: Any = None  # an official validation split (the clean protocol selects on it)
    folds: np.ndarray | None = None  # per example of `train` (== `report`) for fold tasks

    @property
    def fold_ids(self) -> list[int | None]:
        return [None] if self.folds is None else sorted(int(f) for f in np.unique(self.folds))

    def splits(self, fold: int | None, seed: int, holdout_fraction: float) -> Splits:
        regression = bool(getattr(self.train, "is_regression", False))
        names = tuple(getattr(self.train, "class_names", None) or getattr(self.train, "label_names", ()))
        if self.folds is not None:
            if fold not in self.fold_ids:
                raise SetupError(f"{self.name} has folds {self.fold_ids}, not {fold}")
            rest, report_idx = kfold_indices(self.folds, fold)
        else:
            report_idx, rest = np.arange(len(self.report)), np.arange(len(self.train))
        if self.validation is not None:
            return Splits(self.train, rest, self.validation, np.arange(len(self.validation)), self.report, report_idx,
                          names, regression)  # fmt: skip
        keep, held = stratified_holdout(_strata(self.train.labels[rest], regression), holdout_fraction, seed)
        return Splits(self.train, rest[keep], self.train, rest[held], self.report, report_idx, names, regression)


def _strata(labels: np.ndarray, regression: bool) -> np.ndarray:
    """Class ids, or for a regression target its rounded score (STS-B 0-5), so held-out parts are balanced."""
    return np.rint(labels).astype(np.int64) if regression else labels


def load(task: str, data_dir: str, *, demo_root: str = "", seed: int = 0, reference_flowers_splits: bool = False):
    """The task's sets (see the module docstring); a SetupError naming the flag when the data is not there."""
    if task == "demo":
        raw = Path(demo_root) / "raw" if demo_root else None
        if raw is None or not (raw / "train.csv").is_file():
            raise SetupError(f"the demo task needs the demo run's raw data ({raw}): run `python experiments/"
                             "pretrain.py` first, or pass --init=<a demo pre-training run>")  # fmt: skip
        examples = downstream.read_manifest_set([raw / "train.csv", raw / "test.csv"], "audio")
        return TaskData("demo", examples, examples, folds=seeded_folds(examples.labels, DEMO_FOLDS, seed))
    if not data_dir:
        raise SetupError(f"--task={task} needs --data_dir (the dataset folder; see docs/finetune.md)")
    data_dir = str(Path(data_dir).expanduser())
    if task in ("esc50", "urbansound8k"):
        examples = (downstream.read_esc50 if task == "esc50" else downstream.read_urbansound8k)(data_dir, "all")
        return TaskData(task, examples, examples, folds=examples.folds)
    if task in TFDS:
        name, train, validation, test = TFDS[task]
        if task == "flowers102" and reference_flowers_splits:  # bug 41: trained on 'test', scored on 'validation'
            train, validation, test = "test", None, "validation"
        read = lambda split: downstream.read_tfds(name, data_dir, split)  # noqa: E731
        return TaskData(task, read(train), read(test), read(validation) if validation else None)
    if task == "folder":
        root = Path(data_dir)
        validation = downstream.read_folder(root / "validation") if (root / "validation").is_dir() else None
        return TaskData(task, downstream.read_folder(root / "train"), downstream.read_folder(root / "test"), validation)
    from data_pipelines import glue

    if task in glue.TASKS:
        parts = [glue.read_glue(task, data_dir, split) for split in ("train", "validation")]
        for part in parts:  # rows the reader skipped (e.g. QQP's broken lines), said once
            if glue.skipped_report(part):
                log(glue.skipped_report(part))
        return TaskData(task, *parts)
    raise SetupError(f"unknown --task={task!r}")


def seeded_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Folds 1..k, stratified: each class's examples dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(labels), np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        folds[members] = 1 + (np.arange(len(members)) + int(label)) % k
    return folds
