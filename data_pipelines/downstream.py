"""Readers for the downstream (zero-shot) classification sets, in their official layouts.

Each reader returns a `ClassificationSet`: class names in the dataset's own label order (from its own metadata,
never from a hard-coded list: the reference's Pets and Flowers lists were in the wrong order, docs/reference.md R6
items 45-46), one integer label per example, an optional fold per example, and a random-access `examples` sequence
that decodes example i to model-ready input: a PIL RGB image, or a 16 kHz mono float32 waveform.

    esc50          <root>/meta/esc50.csv (filename, fold, target, category, ...) + <root>/audio/<filename>
    urbansound8k   <root>/metadata/UrbanSound8K.csv (slice_file_name, fold, classID, class, ...)
                   + <root>/audio/fold<fold>/<slice_file_name>
    tfds           a prepared TFDS dataset in array_record format, <data_dir>/<name>/<version>/ (read without
                   TensorFlow through `builder_from_directory(...).as_data_source`); class names from its
                   ClassLabel feature
    folder         <root>/<class name>/<file>: images or audio, classes in sorted folder-name order (torchvision's
                   ImageFolder convention)

Label ids and class names are checked against each other: every id must map to one name and back, ids must be
0..C-1. `check_class_names` compares a user's expected list (e.g. one copied from another codebase) with the
metadata's, so a wrong order stops the job instead of silently misaligning prompts and targets.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from data_pipelines import audio_io
from synergy_jax.errors import SetupError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aiff", ".aif")
MODALITIES = ("image", "audio")


class DatasetError(SetupError):
    """A dataset folder or metadata file that cannot be read as the layout it claims to be."""


class ClassOrderError(DatasetError):
    """Class names that disagree with the dataset's own label metadata."""


@dataclasses.dataclass(frozen=True)
class ClassificationSet:
    """One evaluation split: `examples[i]` is the decoded input of example i, `labels[i]` its class index."""

    name: str
    modality: str  # 'image' or 'audio'
    class_names: tuple[str, ...]  # in label order, as the dataset spells them (underscores kept)
    labels: np.ndarray  # (N,) int64
    examples: Sequence[Any]  # random access: PIL image or 16 kHz waveform
    folds: np.ndarray | None = None  # (N,) int64, for sets distributed in folds

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if len(self.labels) != len(self.examples):
            raise ValueError(f"{len(self.labels)} labels for {len(self.examples)} examples")
        if len(self.labels) == 0:
            raise DatasetError(f"{self.name}: no examples")

    def __len__(self) -> int:
        return len(self.labels)


def prompt_name(name: str) -> str:
    """A class name as it goes into a prompt: underscores to spaces ('crying_baby' -> 'crying baby')."""
    return " ".join(name.replace("_", " ").split())


# ----------------------------------------------------------------------------------------------- decoding


class ImageFiles:
    """Image files decoded to RGB on access."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        return decode_image(self.paths[index], self.paths[index])


class AudioFiles:
    """Audio files decoded to 16 kHz mono float32 on access (any format `audio_io` reads)."""

    def __init__(self, paths: Sequence[str], sample_rate: int = audio_io.TARGET_SAMPLE_RATE):
        self.paths = list(paths)
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        try:
            return audio_io.load_audio(self.paths[index], self.sample_rate)
        except audio_io.AudioDecodeError as error:
            raise DatasetError(f"{self.paths[index]}: {error}") from error


def decode_image(source: str | bytes, where: str) -> Image.Image:
    """A path or encoded bytes -> fully decoded RGB image; names `where` in the error."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.convert("RGB")
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, ...
        raise DatasetError(f"{where}: not a readable image ({type(error).__name__}: {error})") from error


# ----------------------------------------------------------------------------------------------- label checks


def class_names_from_pairs(pairs: Iterable[tuple[int, str]], where: str) -> tuple[str, ...]:
    """Class names in id order from (id, name) pairs of a metadata table; ids must be 0..C-1, one name each."""
    names_of: dict[int, set[str]] = {}
    for label, name in pairs:
        names_of.setdefault(int(label), set()).add(name)
    conflicts = {label: sorted(names) for label, names in names_of.items() if len(names) > 1}
    if conflicts:
        shown = "; ".join(f"id {label}: {names}" for label, names in sorted(conflicts.items())[:5])
        raise ClassOrderError(f"{where}: class ids with more than one name ({shown})")
    ids = sorted(names_of)
    if ids != list(range(len(ids))):
        raise ClassOrderError(f"{where}: class ids must be 0..{len(ids) - 1}, found {ids[:10]}{'...' if len(ids) > 10 else ''}")
    names = tuple(next(iter(names_of[i])) for i in ids)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ClassOrderError(f"{where}: names used by more than one class id: {repeated[:5]}")
    return names


def check_class_names(found: Sequence[str], expected: Sequence[str], where: str) -> None:
    """Raises ClassOrderError unless `expected` is `found` in the same order (underscores/case/spacing aside)."""
    def key(name: str) -> str:
        return prompt_name(name).lower()

    if len(found) != len(expected):
        raise ClassOrderError(f"{where}: the dataset has {len(found)} classes, the expected list {len(expected)}")
    wrong = [(i, e, f) for i, (f, e) in enumerate(zip(found, expected)) if key(f) != key(e)]
    if wrong:
        shown = "; ".join(f"label {i}: expected {e!r}, dataset says {f!r}" for i, e, f in wrong[:5])
        same_set = sorted(map(key, found)) == sorted(map(key, expected))
        raise ClassOrderError(
            f"{where}: {len(wrong)} of {len(found)} class names disagree with the dataset's label metadata "
            f"({shown}){' - same names, different order' if same_set else ''}"
        )


def read_class_list(path: str | os.PathLike) -> list[str]:
    """One class name per line (blank lines and '#' comments ignored)."""
    lines = Path(path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def parse_folds(spec: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """'1,3' / '1-3' / [1, 3] -> (1, 3) / (1, 2, 3); None or '' or 'all' -> None (every fold)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    if not isinstance(spec, str):
        return tuple(sorted({int(f) for f in spec}))
    folds: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.strip().partition("-")
        try:
            folds.update(range(int(low), int(high or low) + 1))
        except ValueError:
            raise ValueError(f"--folds={spec!r}: use e.g. 1,2,5 or 1-5 or all") from None
    return tuple(sorted(folds))


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetError(f"{path} not found")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in required if column not in (reader.fieldnames or ())]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {missing}; has {reader.fieldnames}")
        return list(reader)


def _int(row: dict[str, str], column: str, where: str) -> int:
    try:
        return int(row[column])
    except ValueError:
        raise DatasetError(f"{where}: column {column!r} is not an integer: {row[column]!r}") from None


def _select_folds(
    name: str, rows: list[dict], folds: tuple[int, ...] | None, fold_of: Callable[[dict], int]
) -> list[dict]:
    present = sorted({fold_of(row) for row in rows})
    if folds is None:
        return rows
    absent = [f for f in folds if f not in present]
    if absent:
        raise DatasetError(f"{name}: fold(s) {absent} not in the metadata (folds present: {present})")
    return [row for row in rows if fold_of(row) in folds]


def _check_files(name: str, paths: list[str]) -> None:
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise DatasetError(f"{name}: {len(missing)} file(s) listed in the metadata are missing, e.g. {missing[:3]}")


# ----------------------------------------------------------------------------------------------- readers


def _read_fold_table(
    name: str, table: Path, columns: tuple[str, str, str], path_of: Callable[[dict], Path], folds
) -> ClassificationSet:
    """A csv-described audio set in folds: `columns` = (file, class id, class name) column names."""
    file_column, id_column, name_column = columns
    rows = _read_csv(table, (file_column, "fold", id_column, name_column))
    class_names = class_names_from_pairs(((_int(r, id_column, str(table)), r[name_column]) for r in rows), str(table))
    rows = _select_folds(name, rows, parse_folds(folds), lambda r: _int(r, "fold", str(table)))
    paths = [str(path_of(row)) for row in rows]
    _check_files(name, paths)
    return ClassificationSet(
        name=name,
        modality="audio",
        class_names=class_names,
        labels=np.asarray([int(row[id_column]) for row in rows], np.int64),
        examples=AudioFiles(paths),
        folds=np.asarray([int(row["fold"]) for row in rows], np.int64),
    )


def read_esc50(root: str | os.PathLike, folds: str | Sequence[int] | None = None) -> ClassificationSet:
    """ESC-50 (github.com/karolpiczak/ESC-50 layout); classes in `target` order with their `category` names."""
    root = Path(root)
    return _read_fold_table("esc50", root / "meta" / "esc50.csv", ("filename", "target", "category"),
                            lambda row: root / "audio" / row["filename"], folds)  # fmt: skip


def read_urbansound8k(root: str | os.PathLike, folds: str | Sequence[int] | None = None) -> ClassificationSet:
    """UrbanSound8K (the official archive's layout); classes in `classID` order with their `class` names."""
    root = Path(root)
    return _read_fold_table("urbansound8k", root / "metadata" / "UrbanSound8K.csv", ("slice_file_name", "classID", "class"),
                            lambda row: root / "audio" / f"fold{row['fold']}" / row["slice_file_name"], folds)  # fmt: skip


def folder_modality(paths: Sequence[str]) -> str:
    """'image' or 'audio' from file extensions; mixed or unknown folders are an error."""
    kinds = {"image" if p.lower().endswith(IMAGE_EXTENSIONS) else "audio" for p in paths}
    if len(kinds) != 1:
        raise DatasetError("the class folders mix image and audio files: pass --dataset=folder:image or folder:audio")
    return kinds.pop()


def read_folder(root: str | os.PathLike, modality: str | None = None) -> ClassificationSet:
    """<root>/<class>/<files>: classes are the sub-folders in sorted order; files of other types are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root}: no class sub-folders (expected <root>/<class name>/<files>)")
    extensions = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS}.get(modality, IMAGE_EXTENSIONS + AUDIO_EXTENSIONS)
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        if not files:
            raise DatasetError(f"{root / name}: no {modality or 'image or audio'} files")
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    modality = modality or folder_modality(paths)
    return ClassificationSet(
        name=f"folder:{root.name}",
        modality=modality,
        class_names=tuple(classes),
        labels=np.asarray(labels, np.int64),
        examples=ImageFiles(paths) if modality == "image" else AudioFiles(paths),
    )


class TfdsImages:
    """Images of a TFDS array_record data source, decoded from their encoded bytes on access."""

    def __init__(self, source, image_key: str, where: str):
        self.source = source
        self.image_key = image_key
        self.where = where

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Image.Image:
        return decode_image(self.source[index][self.image_key], f"{self.where}[{index}]")


def tfds_dataset_dir(data_dir: str | os.PathLike, name: str) -> Path:
    """The prepared <data_dir>/<name>/[<config>/]<version>/ folder (the newest version), or `data_dir` itself."""
    data_dir = Path(data_dir)
    if (data_dir / "dataset_info.json").is_file():
        return data_dir
    found = sorted(data_dir.glob(f"{name}/*/dataset_info.json")) + sorted(data_dir.glob(f"{name}/*/*/dataset_info.json"))
    if not found:
        raise DatasetError(
            f"no prepared TFDS dataset {name!r} under {data_dir} (expected {data_dir}/{name}/<version>/"
            "dataset_info.json in array_record format); see docs/zero_shot.md for how to prepare it"
        )

    def version_key(path: Path) -> tuple:
        return tuple(int(part) if part.isdigit() else -1 for part in path.parent.name.split("."))

    return max(found, key=version_key).parent


def read_tfds(
    name: str, data_dir: str | os.PathLike, split: str = "test", image_key: str = "image", label_key: str = "label"
) -> ClassificationSet:
    """A prepared array_record TFDS image dataset; class names from its ClassLabel feature, in label order."""
    import tensorflow_datasets as tfds

    directory = tfds_dataset_dir(data_dir, name)
    builder = tfds.builder_from_directory(str(directory))
    features = builder.info.features
    if label_key not in features or not isinstance(features[label_key], tfds.features.ClassLabel):
        raise DatasetError(f"{directory}: no ClassLabel feature {label_key!r} (features: {list(features)})")
    if image_key not in features:
        raise DatasetError(f"{directory}: no image feature {image_key!r} (features: {list(features)})")
    if split not in builder.info.splits:
        raise DatasetError(f"{directory}: no split {split!r}; splits: {list(builder.info.splits)}")
    if str(builder.info.file_format) not in ("array_record", "FileFormat.ARRAY_RECORD"):
        raise DatasetError(
            f"{directory} is stored as {builder.info.file_format}; random access without TensorFlow needs "
            "array_record (prepare it with file_format='array_record', see docs/zero_shot.md)"
        )
    source = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    labels = np.asarray([int(source[i][label_key]) for i in range(len(source))], np.int64)
    class_names = tuple(features[label_key].names)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ClassOrderError(f"{directory}: labels outside 0..{len(class_names) - 1}")
    return ClassificationSet(
        name=f"{builder.info.name}/{split}",
        modality="image",
        class_names=class_names,
        labels=labels,
        examples=TfdsImages(source, image_key, f"{directory}:{split}"),
    )


def read_manifest_set(manifests: Sequence[str | os.PathLike], modality: str) -> ClassificationSet:
    """The image or audio files of pre-training manifests (`img_path, wav_path, label, caption`, paths relative to
    the manifest) as one classification set: classes are the sorted distinct labels (the demo's fine-tuning set)."""
    paths, names = [], []
    column = {"image": "img_path", "audio": "wav_path"}[modality]
    for manifest in map(Path, manifests):
        for row in _read_csv(manifest, (column, "label")):
            paths.append(str(manifest.parent / row[column]))
            names.append(row["label"])
    classes = sorted(set(names))
    _check_files(f"{manifests[0]}", paths)
    return ClassificationSet(
        name=Path(manifests[0]).parent.name,
        modality=modality,
        class_names=tuple(classes),
        labels=np.asarray([classes.index(name) for name in names], np.int64),
        examples=ImageFiles(paths) if modality == "image" else AudioFiles(paths),
    )
