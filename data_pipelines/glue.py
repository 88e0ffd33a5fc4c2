"""GLUE tasks as text pairs, from the official GLUE download or a prepared TFDS `glue` dataset.

The reference fine-tunes its text tower on GLUE (docs/reference.md R5.3): per task a maximum token length, MRPC
scored on `test`, the others on validation. `TASKS` holds what each task needs; `read_glue` returns one split as a
`TextPairSet` whichever source `data_dir` is:

    GLUE download  <data_dir>/<Folder>/train.tsv, dev.tsv (MNLI: dev_matched.tsv, dev_mismatched.tsv), as written by
                   GLUE's download_glue_data.py: tab-separated, no quoting at all (a `"` is text, so csv's
                   QUOTE_NONE; a stray quote must not swallow the following lines), a header row naming the columns
                   except CoLA's train/dev (source, label, original label, sentence). Columns are found by header
                   name, the names TFDS's glue builder reads. MRPC's train/dev start with a UTF-8 BOM ("Quality").
    TFDS           <data_dir>/glue/<config>/<version>/ prepared by TFDS's glue builder, read without TensorFlow:
                   array_record (and parquet) through `as_data_source` as `downstream.read_tfds` does; tfrecord
                   shards by a small sequential reader (TFRecord framing + TFDS's NumPy example parser). Examples
                   come back in TSV row order (the `idx` feature).

Label ids. Both sources must give the same id to the same example, and they number labels differently (MNLI: the
TSV spells names and transformers' processor orders them contradiction, entailment, neutral; TFDS's ClassLabel is
entailment, neutral, contradiction). We keep GLUE's own order: the TSV's 0/1 for the binary tasks (named as TFDS
names them, e.g. SST-2 0 = negative), transformers' order for MNLI, (entailment, not_entailment) for QNLI and RTE;
TFDS ids are mapped to ours by class NAME, never by number. STS-B is a float32 score in [0, 5].

Test labels of GLUE are not public: `split="test"` is an error, except MRPC, whose labeled test pairs are the
Microsoft corpus' msr_paraphrase_test.txt (download_glue_data.py leaves it in the MRPC folder; R5.3 scores there).
Rows with missing fields (QQP has some) are skipped, counted and reported, as manifests report bad rows.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.downstream import ClassOrderError, DatasetError, tfds_dataset_dir
from data_pipelines.manifest import RowProblem, skipped_summary
from synergy_jax.evaluators.classification import REGRESSION_METRICS

SPLITS = ("train", "validation", "test")


class UnlabeledSplitError(DatasetError):
    """A split whose labels are not distributed (GLUE's test sets)."""


@dataclasses.dataclass(frozen=True, eq=False)  # one instance per task: hashable by identity
class TaskSpec:
    """What one GLUE task needs: where its files are, how its columns and labels are spelled, how it is scored.

    `files`/`tfds_splits` map our split names (train, validation, test) to the GLUE file and the TFDS split;
    `tsv_columns` are TSV header names (`None`: the header-less CoLA layout), `tfds_features` the TFDS feature
    names of the same texts; `tsv_labels[i]` is how the TSV spells label id i, `label_names[i]` its name (TFDS's).
    """

    name: str
    folder: str  # folder of the GLUE download
    tfds_name: str  # glue/<config>
    tsv_columns: tuple[str, ...]  # text column(s) then the label column
    tfds_features: tuple[str, ...]  # text feature(s); the label feature is 'label'
    label_names: tuple[str, ...]  # () for regression (STS-B)
    tsv_labels: tuple[str, ...]
    files: dict[str, str]
    tfds_splits: dict[str, str]
    max_length: int  # tokens, docs/reference.md R5.3
    accumulation: int  # gradient accumulation steps, R5.3
    metrics: tuple[str, ...]  # GLUE's metrics, in leaderboard order (GLUE's task score averages a pair)
    reference_split: str = "validation"  # where R5.3 scores the task

    @property
    def num_labels(self) -> int:
        """Output units of the head: classes, or 1 for the regression task."""
        return len(self.label_names) or 1

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def eval_file(self) -> str:
        """The GLUE file of the evaluation split (dev.tsv, dev_matched.tsv, ...)."""
        return self.files["validation"]

    @property
    def eval_split(self) -> str:
        """The TFDS split of the evaluation split (validation, validation_matched, ...)."""
        return self.tfds_splits["validation"]


def _task(name, folder, config, texts, features, label_column, names, spelled, length, accumulation, metrics,
          dev="dev", tfds_dev="validation", test="test.tsv", tfds_test="test", reference_split="validation"):
    """A TaskSpec from positional essentials: keeps the TASKS table one line-pair per task."""
    return TaskSpec(
        name=name, folder=folder, tfds_name=f"glue/{config}", tsv_columns=(*texts, label_column),
        tfds_features=features, label_names=names, tsv_labels=spelled,
        files={"train": "train.tsv", "validation": f"{dev}.tsv", "test": test},
        tfds_splits={"train": "train", "validation": tfds_dev, "test": tfds_test},
        max_length=length, accumulation=accumulation, metrics=metrics, reference_split=reference_split,
    )  # fmt: skip


_MNLI = dict(folder="MNLI", config="mnli", texts=("sentence1", "sentence2"), features=("premise", "hypothesis"),
             label_column="gold_label", names=("contradiction", "entailment", "neutral"),
             spelled=("contradiction", "entailment", "neutral"), length=160, accumulation=4, metrics=("accuracy",))
_PAIR = ("sentence1", "sentence2")
_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
_SST_COLA_TEXT = ("sentence",)

TASKS: dict[str, TaskSpec] = {
    "mnli_m": _task("mnli_m", **_MNLI, dev="dev_matched", tfds_dev="validation_matched", test="test_matched.tsv",
                    tfds_test="test_matched"),
    "mnli_mm": _task("mnli_mm", **_MNLI, dev="dev_mismatched", tfds_dev="validation_mismatched",
                     test="test_mismatched.tsv", tfds_test="test_mismatched"),
    "qnli": _task("qnli", "QNLI", "qnli", ("question", "sentence"), ("question", "sentence"), "label", _NLI2, _NLI2,
                  160, 4, ("accuracy",)),
    "qqp": _task("qqp", "QQP", "qqp", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
                 ("not_duplicate", "duplicate"), _BINARY, 128, 4, ("f1", "accuracy")),
    "sst2": _task("sst2", "SST-2", "sst2", _SST_COLA_TEXT, _SST_COLA_TEXT, "label", ("negative", "positive"), _BINARY,
                  96, 4, ("accuracy",)),
    # GLUE scores CoLA by MCC; the reference reported accuracy (R5.3, R6 bug 44): both are computed.
    "cola": _task("cola", "CoLA", "cola", _SST_COLA_TEXT, _SST_COLA_TEXT, "label", ("unacceptable", "acceptable"),
                  _BINARY, 64, 2, ("mcc", "accuracy")),
    "mrpc": _task("mrpc", "MRPC", "mrpc", ("#1 String", "#2 String"), _PAIR, "Quality",
                  ("not_equivalent", "equivalent"), _BINARY, 128, 2, ("f1", "accuracy"),
                  test="msr_paraphrase_test.txt", reference_split="test"),
    "rte": _task("rte", "RTE", "rte", _PAIR, _PAIR, "label", _NLI2, _NLI2, 128, 2, ("accuracy",)),
    "stsb": _task("stsb", "STS-B", "stsb", _PAIR, _PAIR, "score", (), (), 128, 2, REGRESSION_METRICS),
    "wnli": _task("wnli", "WNLI", "wnli", _PAIR, _PAIR, "label", ("not_entailment", "entailment"), _BINARY, 128, 4,
                  ("accuracy",)),
}
COLA_COLUMNS = ("source", "label", "original_label", "sentence")  # CoLA train/dev.tsv have no header row


def task_spec(task: str | TaskSpec) -> TaskSpec:
    """The spec of a task by name, spelling aside ('MNLI-m', 'mnli_m', 'SST-2', 'sts-b' all work)."""
    if isinstance(task, TaskSpec):
        return task
    key = task.lower().replace("-", "").replace("_", "")
    for name, spec in TASKS.items():
        if name.replace("_", "") == key:
            return spec
    hint = " (MNLI has two evaluation sets: mnli_m or mnli_mm)" if key == "mnli" else ""
    raise DatasetError(f"unknown GLUE task {task!r}{hint}; tasks: {sorted(TASKS)}")


# ----------------------------------------------------------------------------------------------- the set


@dataclasses.dataclass(frozen=True)
class TextPairSet:
    """One split of a GLUE task: `text_a[i]` (and `text_b[i]` for pair tasks) with `labels[i]`.

    `labels` are int64 ids into `label_names` (GLUE's order, see the module docstring), or float32 scores for the
    regression task (`label_names` empty). `skipped` lists the file's rows that could not be used.
    """

    name: str
    text_a: tuple[str, ...]
    text_b: tuple[str, ...] | None
    labels: np.ndarray
    label_names: tuple[str, ...]
    skipped: tuple[RowProblem, ...] = ()
    source: str = ""  # the file or TFDS folder it was read from

    def __post_init__(self):
        if self.text_b is not None and len(self.text_b) != len(self.text_a):
            raise ValueError(f"{self.name}: {len(self.text_a)} first texts but {len(self.text_b)} second texts")
        if len(self.labels) != len(self.text_a):
            raise ValueError(f"{self.name}: {len(self.labels)} labels for {len(self.text_a)} examples")
        expected = np.float32 if self.is_regression else np.int64
        if self.labels.dtype != expected:
            raise ValueError(f"{self.name}: labels must be {np.dtype(expected)}, got {self.labels.dtype}")
        if not self.is_regression and len(self.labels) and not (
            0 <= self.labels.min() and self.labels.max() < len(self.label_names)
        ):
            raise ValueError(f"{self.name}: label ids outside 0..{len(self.label_names) - 1}")

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray, name: str) -> TextPairSet:
        """The examples at `indices`, in that order, under another name."""
        indices = np.asarray(indices, np.int64)
        return dataclasses.replace(
            self,
            name=name,
            text_a=tuple(self.text_a[i] for i in indices),
            text_b=None if self.text_b is None else tuple(self.text_b[i] for i in indices),
            labels=self.labels[indices],
        )


def skipped_report(data: TextPairSet, shown: int = 3) -> str:
    """'N row(s) skipped' by reason with the first few rows ('' when none), for logs and results."""
    return skipped_summary(data.source or data.name, data.skipped, shown)


# ----------------------------------------------------------------------------------------------- reading


def read_glue(task: str | TaskSpec, data_dir: str | os.PathLike, split: str) -> TextPairSet:
    """One split (train, validation, test) of a GLUE task from the GLUE download or a prepared TFDS dir."""
    spec = task_spec(task)
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    data_dir = Path(data_dir)
    folder = _glue_folder(spec, data_dir)
    if folder is not None:
        return _read_glue_folder(spec, folder, split)
    if (data_dir / "glue").is_dir() or (data_dir / "dataset_info.json").is_file():
        return _read_tfds(spec, data_dir, split)
    raise DatasetError(
        f"{data_dir}: neither the GLUE download ({data_dir}/{spec.folder}/{spec.eval_file}) nor a prepared TFDS "
        f"dataset ({data_dir}/{spec.tfds_name}/<version>/dataset_info.json)"
    )


def _glue_folder(spec: TaskSpec, data_dir: Path) -> Path | None:
    """<data_dir>/<Folder>, or `data_dir` itself when it is that task folder; None when neither."""
    if (data_dir / spec.folder).is_dir():
        return data_dir / spec.folder
    if data_dir.name == spec.folder and data_dir.is_dir():
        return data_dir
    return None


def _read_glue_folder(spec: TaskSpec, folder: Path, split: str) -> TextPairSet:
    """A split of the GLUE download; test splits only where labels exist (MRPC's msr_paraphrase_test.txt)."""
    if split == "test" and spec.name != "mrpc":
        raise UnlabeledSplitError(
            f"{spec.name}: GLUE test labels are not public ({folder}/{spec.files['test']} has no labels); "
            f"evaluate on 'validation' ({spec.eval_file}) or carve a held-out part of train (finetune_input.stratified_holdout)"
        )
    path = folder / spec.files[split]
    if split == "test" and not path.is_file():
        raise UnlabeledSplitError(
            f"{path} not found: MRPC's test.tsv in the GLUE download has no labels; the labeled test pairs are "
            "the Microsoft corpus' msr_paraphrase_test.txt (download_glue_data.py saves it in the MRPC folder; "
            "copy it there if the download used --path_to_mrpc)"
        )
    header = COLA_COLUMNS if spec.name == "cola" else None
    rows, problems = _read_tsv(path, header, spec.tsv_columns)
    texts = [[row[column] for row in rows] for column in spec.tsv_columns[:-1]]
    labels = _labels_from_tsv(spec, [(row[spec.tsv_columns[-1]], row["__line__"]) for row in rows], path)
    return _make_set(spec, split, texts, labels, tuple(problems), str(path))


def _read_tsv(path: Path, header: Sequence[str] | None, needed: Sequence[str]) -> tuple[list[dict], list[RowProblem]]:
    """Rows of a GLUE TSV as dicts (plus '__line__'); rows whose field count differs from the header, or with an
    empty label, are skipped and returned as problems. QUOTE_NONE: GLUE's files are not quoted."""
    if not path.is_file():
        raise DatasetError(f"{path} not found")
    rows, problems = [], []
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            columns = list(header) if header is not None else [name.strip() for name in next(reader, [])]
            missing = [name for name in needed if name not in columns]
            if missing:
                raise DatasetError(f"{path}: missing column(s) {missing}; found {columns}")
            for row_id, fields in enumerate(reader):
                if not fields:
                    continue  # a blank line
                line = reader.line_num
                if len(fields) != len(columns):
                    reason = f"{len(fields)} field(s), the header has {len(columns)}"
                    problems.append(RowProblem(row_id, line, reason))
                    continue
                row = dict(zip(columns, fields), __line__=line)
                if not row[needed[-1]].strip():
                    problems.append(RowProblem(row_id, line, f"empty {needed[-1]!r}"))
                    continue
                rows.append(row)
    except (UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"{path}: not a UTF-8 tab-separated file ({error})") from error
    return rows, problems


def _labels_from_tsv(spec: TaskSpec, values: list[tuple[str, int]], path: Path) -> np.ndarray:
    """TSV label strings -> ids in GLUE's order (or float32 scores); an unknown value stops with file:line."""
    if spec.is_regression:
        try:
            return np.asarray([float(value) for value, _ in values], np.float32)
        except ValueError:
            bad = next((v, line) for v, line in values if not _is_float(v))
            raise DatasetError(f"{path}:{bad[1]}: score {bad[0]!r} is not a number") from None
    index = {spelled: i for i, spelled in enumerate(spec.tsv_labels)}
    labels = []
    for value, line in values:
        if value.strip() not in index:
            raise DatasetError(f"{path}:{line}: label {value!r} is not one of {list(spec.tsv_labels)}")
        labels.append(index[value.strip()])
    return np.asarray(labels, np.int64)


def _is_float(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


def _make_set(spec, split, texts, labels, skipped, source) -> TextPairSet:
    """The TextPairSet of one read; a file with no usable row is an error that shows why rows were skipped."""
    if len(labels) == 0:
        shown = "; ".join(str(problem) for problem in skipped[:3])
        raise DatasetError(f"{source}: no usable rows{f' ({len(skipped)} skipped: {shown})' if skipped else ''}")
    return TextPairSet(
        name=f"{spec.name}/{split}",
        text_a=tuple(texts[0]),
        text_b=tuple(texts[1]) if len(texts) > 1 else None,
        labels=labels,
        label_names=spec.label_names,
        skipped=skipped,
        source=source,
    )


# ----------------------------------------------------------------------------------------------- TFDS


def _read_tfds(spec: TaskSpec, data_dir: Path, split: str) -> TextPairSet:
    """A split of a prepared TFDS glue config; ids mapped to GLUE's order by class name."""
    import tensorflow_datasets as tfds

    directory = tfds_dataset_dir(data_dir, spec.tfds_name)
    builder = tfds.builder_from_directory(str(directory))
    found = f"{builder.info.name}/{builder.info.config_name}"
    if found != spec.tfds_name:
        raise DatasetError(f"{directory} holds {found!r}, not {spec.tfds_name!r}")
    features, tfds_split = builder.info.features, spec.tfds_splits[split]
    missing = [name for name in (*spec.tfds_features, "label") if name not in features]
    if missing:
        raise DatasetError(f"{directory}: no feature(s) {missing} (features: {list(features)})")
    if tfds_split not in builder.info.splits:
        raise DatasetError(f"{directory}: no split {tfds_split!r}; splits: {list(builder.info.splits)}")
    remap = _tfds_label_map(spec, features["label"], directory)
    examples = _tfds_examples(builder, tfds_split, directory)
    if "idx" in features:  # TSV row order, as the GLUE download reads
        examples.sort(key=lambda example: int(example["idx"]))
    raw = np.asarray([example["label"] for example in examples])
    unlabeled = int(np.sum(raw == -1))
    if unlabeled:
        hint = ""
        if spec.name == "mrpc":
            hint = "; MRPC's labeled test pairs are the GLUE download's MRPC/msr_paraphrase_test.txt"
        raise UnlabeledSplitError(
            f"{directory}:{tfds_split}: {unlabeled} of {len(raw)} examples have no label (-1): GLUE test labels "
            f"are not public{hint}"
        )
    labels = raw.astype(np.float32) if remap is None else remap[raw.astype(np.int64)]
    texts = [[_text(example[name]) for example in examples] for name in spec.tfds_features]
    return _make_set(spec, split, texts, labels, (), f"{directory}:{tfds_split}")


def _tfds_label_map(spec: TaskSpec, feature: Any, directory: Path) -> np.ndarray | None:
    """TFDS label id -> our id, by class name (None for the regression task)."""
    import tensorflow_datasets as tfds

    is_class_label = isinstance(feature, tfds.features.ClassLabel)
    if spec.is_regression:
        if is_class_label:
            raise DatasetError(f"{directory}: {spec.name} is a regression task but its label is a ClassLabel")
        return None
    if not is_class_label:
        raise DatasetError(f"{directory}: the label is not a ClassLabel feature ({feature})")
    names = tuple(feature.names)
    if sorted(names) != sorted(spec.label_names):
        raise ClassOrderError(f"{directory}: label names {list(names)}, expected {sorted(spec.label_names)}")
    return np.asarray([spec.label_names.index(name) for name in names], np.int64)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _tfds_examples(builder: Any, split: str, directory: Path) -> list[dict]:
    """Every decoded example of a split, without TensorFlow: a random-access data source for the formats TFDS can
    read that way (array_record, parquet), the sequential TFRecord reader for tfrecord, an error otherwise."""
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format == "tfrecord":
        return _read_tfrecord_split(builder, split)
    try:
        source = builder.as_data_source(split=split)
    except (NotImplementedError, ValueError) as error:
        raise DatasetError(
            f"{directory} is stored as {file_format}, which cannot be read without TensorFlow; prepare it as "
            f"array_record or tfrecord ({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from error
    examples, chunk = [], 4096
    for start in range(0, len(source), chunk):
        examples.extend(source.__getitems__(range(start, min(start + chunk, len(source)))))
    return examples


def _read_tfrecord_split(builder: Any, split: str) -> list[dict]:
    """Decodes a tfrecord split with TFDS's NumPy example parser (the serialized tf.train.Example protos)."""
    from tensorflow_datasets.core import example_parser

    features = builder.info.features
    parser = example_parser.ExampleParserNp(features.get_serialized_info())
    examples = []
    for path in builder.info.splits[split].filepaths:
        for payload in tfrecord_payloads(Path(os.fspath(path))):
            examples.append(features.decode_example_np(parser.parse_example(payload)))
    return examples


def tfrecord_payloads(path: Path):
    """The records of a TFRecord file: per record a uint64 length, its masked CRC32-C, the payload and the
    payload's masked CRC. The length's CRC is checked (it catches a file that is not TFRecord or is misframed);
    the payload's is not (pure-Python CRC of a whole split would be slow; the proto parser rejects garbage)."""
    with open(path, "rb") as handle:
        offset = 0
        while header := handle.read(12):
            if len(header) < 12:
                raise DatasetError(f"{path}: truncated TFRecord header at byte {offset}")
            (length,), (crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if masked_crc32c(header[:8]) != crc:
                raise DatasetError(f"{path}: not a TFRecord file (bad length checksum at byte {offset})")
            payload = handle.read(length)
            if len(payload) < length or len(handle.read(4)) < 4:
                raise DatasetError(f"{path}: truncated TFRecord record at byte {offset}")
            offset += 16 + length
            yield payload


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 and add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------- held-out part


def describe(data: TextPairSet) -> dict:
    """A JSON-able summary for results files: size, class counts or score range, skipped rows."""
    summary: dict[str, Any] = {"name": data.name, "num_examples": len(data), "source": data.source}
    if data.is_regression:
        summary["score_range"] = [float(data.labels.min()), float(data.labels.max())]
    else:
        counts = np.bincount(data.labels, minlength=len(data.label_names))
        summary["class_counts"] = dict(zip(data.label_names, map(int, counts)))
    summary["num_skipped"] = len(data.skipped)
    summary["skipped"] = [problem.to_dict() for problem in data.skipped[:20]]
    return summary
