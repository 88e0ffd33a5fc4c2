"""Manifests: the reference's CSV format, one file per split.

    img_path,wav_path,label,caption
    frames/0001.jpg,audio/0001.wav,"engine accelerating, revving, vroom",A red car revs its engine on a track.

`label` holds comma-separated synonyms of the class (the prompt text mode picks one); `caption` is one sentence per
clip. Paths are absolute or relative to the manifest's folder. Extra columns are ignored. Rows are identified by
`row_id` (0-based data row) and reported by `line` (the CSV line: the header is line 1), so that a report points
at the line an editor shows.

Checking a row here is cheap (text present, files exist and are readable); whether the files decode is found out
by precompute, which reports those rows the same way.

    python -m data_pipelines.manifest path/to/train.csv     # prints every bad row, exit 1 if any
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from synergy_jax.errors import SetupError

REQUIRED_COLUMNS = ("img_path", "wav_path", "label", "caption")


class ManifestError(SetupError):
    """The manifest as a whole is unusable (missing file or columns, not a CSV)."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One usable-looking manifest row, paths resolved to absolute."""

    row_id: int
    line: int
    image_path: str
    audio_path: str
    label: str
    caption: str

    @property
    def synonyms(self) -> list[str]:
        return split_label(self.label)


@dataclasses.dataclass(frozen=True)
class RowProblem:
    """Why one row cannot be used."""

    row_id: int
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line} (row {self.row_id}): {self.reason}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def kind(self) -> str:
        """The reason without its file names and error details ('audio file not found', 'image: OSError'), to
        count rows skipped for the same cause."""
        without_paths = re.sub(r"[^\s:]*[/\\][^\s:]*", "", self.reason)
        parts = [part.strip() for part in without_paths.split(":")[:2]]
        return ": ".join(part for part in parts if part) or self.reason


def skipped_summary(source: str, problems: Sequence[RowProblem | dict], shown: int = 3) -> str:
    """'<source>: N row(s) skipped: 5 x audio file not found, 3 x image: OSError; first: line 3 (row 1): ...', or ''
    when nothing was skipped: what a job says whenever it reads or precomputes data that had bad rows."""
    problems = [p if isinstance(p, RowProblem) else RowProblem(**p) for p in problems]
    if not problems:
        return ""
    counts = collections.Counter(problem.kind for problem in problems)
    kinds = ", ".join(f"{count} x {kind}" for kind, count in counts.most_common())
    first = "; ".join(str(problem) for problem in problems[:shown])
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return f"{source}: {len(problems)} row(s) skipped: {kinds}; first: {first}{more}"


def split_label(label: str) -> list[str]:
    """The synonyms of a comma-separated label, stripped, empties dropped ("a, b," -> ["a", "b"])."""
    return [word.strip() for word in label.split(",") if word.strip()]


def _resolve(path: str, base: Path) -> str:
    path = os.path.expanduser(path.strip())
    return os.path.normpath(path if os.path.isabs(path) else base / path)


def _file_problem(kind: str, path: str) -> str | None:
    if not os.path.exists(path):
        return f"{kind} file not found: {path}"
    if not os.path.isfile(path):
        return f"{kind} path is not a file: {path}"
    if not os.access(path, os.R_OK):
        return f"{kind} file not readable: {path}"
    if os.path.getsize(path) == 0:
        return f"{kind} file is empty: {path}"
    return None


def _row_problems(record: dict, base: Path) -> tuple[list[str], dict]:
    problems, resolved = [], {}
    for column, kind in (("img_path", "image"), ("wav_path", "audio")):
        value = (record.get(column) or "").strip()
        if not value:
            problems.append(f"empty {column}")
            continue
        resolved[column] = _resolve(value, base)
        problem = _file_problem(kind, resolved[column])
        if problem:
            problems.append(problem)
    if not split_label(record.get("label") or ""):
        problems.append("empty label")
    if not (record.get("caption") or "").strip():
        problems.append("empty caption")
    return problems, resolved


def read_manifest(path: str | os.PathLike) -> tuple[list[Row], list[RowProblem]]:
    """All rows of a manifest split into usable rows and problems (every bad row, each with all its reasons)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    base = path.resolve().parent
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [name.strip() for name in (reader.fieldnames or [])]
            missing = [name for name in REQUIRED_COLUMNS if name not in columns]
            if missing:
                raise ManifestError(
                    f"{path}: missing column(s) {missing}; the header must contain {list(REQUIRED_COLUMNS)}, "
                    f"found {columns}"
                )
            reader.fieldnames = columns
            rows, problems = [], []
            for row_id, record in enumerate(reader):
                line = reader.line_num  # the line the row ends on (a quoted newline spans two)
                if None in record:
                    problems.append(RowProblem(row_id, line, f"{len(record[None])} more field(s) than the header"))
                    continue
                reasons, resolved = _row_problems(record, base)
                if reasons:
                    problems.append(RowProblem(row_id, line, "; ".join(reasons)))
                    continue
                rows.append(
                    Row(
                        row_id=row_id,
                        line=line,
                        image_path=resolved["img_path"],
                        audio_path=resolved["wav_path"],
                        label=record["label"].strip(),
                        caption=record["caption"].strip(),
                    )
                )
    except (UnicodeDecodeError, csv.Error) as error:
        raise ManifestError(f"{path}: not a UTF-8 CSV file ({error})") from error
    return rows, problems


def write_manifest(path: str | os.PathLike, records: list[dict]) -> None:
    """Write rows (dicts with the four required keys) as a manifest; paths are written as given."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=REQUIRED_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m data_pipelines.manifest MANIFEST.csv", file=sys.stderr)
        return 2
    rows, problems = read_manifest(argv[1])
    for problem in problems:
        print(problem)
    print(f"{len(rows)} usable row(s), {len(problems)} bad row(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
