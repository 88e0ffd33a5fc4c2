"""Precompute a manifest into ArrayRecord shards: decode every row once instead of every epoch.

    python -m data_pipelines.precompute --manifest=data/train.csv --out=data/precomputed [--workers=8]

Per usable row, one record (see `records.py`): the image resized to 224x224 exactly as the reference
(`Resize((224, 224))` = PIL bilinear with antialiasing, aspect ratio squashed) and stored as raw pixels (or
`--image_format=png|jpeg`), the AST features (1024 x 128, normalised, float16), label, caption and row id.

Output in `--out`, for a split named after the manifest (`train.csv` -> `train`, or `--split`):
  train-00000.array_record ...     shards of `--shard_size` manifest rows each
  train-00000.array_record.json    per-shard sidecar: rows written, rows skipped and why, sha256, fingerprint
  train.json                       metadata: counts, front-end parameters, every skipped row and why, shards,
                                   a content hash; written last, and the pipelines read only the shards it lists

Robustness: a row whose image or audio is missing, unreadable or corrupt (text file named .wav, truncated PNG,
...) is skipped and reported, and the run goes on; the exit status is non-zero only when no row is usable.
Resumable: a shard is written under a temporary name and renamed when complete, then its sidecar is written the
same way; a rerun keeps every shard whose sidecar matches the current inputs and settings (fingerprint) and
redoes the rest, so an interrupted run never leaves a half-written shard that is taken as good.
One run per output split at a time.

Speed: on one machine, `--workers` processes; the CLI restarts itself once with glibc's malloc told to keep freed
memory (`synergy_jax.host_memory`, `glibc_keep`), and shards are uncompressed unless `--compression=zstd`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines import audio_io, records
from data_pipelines.manifest import ManifestError, Row, RowProblem, read_manifest, skipped_summary
from synergy_jax import audio, distributed, host_memory
from synergy_jax.errors import SetupError

SHARD_SUFFIX = ".array_record"
SIDECAR_SUFFIX = ".json"
IMAGE_FORMATS = ("png", "jpeg", "raw")
# ArrayRecord writer options by --compression. Group 1: cheap random access for shuffling. None by default: the
# float16 features hardly compress, and ArrayRecord's writer compresses while holding the GIL, which stalls
# precompute's other threads; zstd level 1 (as small as the default level 3, a third of its write time) is for
# disks where bytes per epoch matter (docs/performance.md, "Stop 28").
WRITER_OPTIONS = {"none": "group_size:1,uncompressed", "zstd": "group_size:1,zstd:1"}
MALLOC = "glibc_keep"  # the malloc a precompute process restarts with (synergy_jax/host_memory.py)


@dataclasses.dataclass(frozen=True)
class PrecomputeConfig:
    """What a record depends on besides its input files; part of every shard's fingerprint."""

    image_size: int = 224
    image_format: str = "raw"  # raw pixels: nothing to encode now or decode every epoch
    jpeg_quality: int = 95
    fbank: audio.FbankConfig = audio.FbankConfig()
    reference_resampling: bool = False  # True: native -> 22.05 kHz -> 16 kHz, as the reference
    shard_size: int = 1024

    def __post_init__(self):
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.shard_size < 1 or self.image_size < 1:
            raise ValueError("shard_size and image_size must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class PrecomputeError(SetupError):
    """Nothing usable came out (every row was bad), or the manifest itself is unusable."""


# ----------------------------------------------------------------------------------------------- one row (workers)


def load_image(path: str, size: int) -> Image.Image:
    """RGB image resized to size x size as torchvision's Resize((size, size)) on a PIL image (bilinear)."""
    with Image.open(path) as image:
        image.load()  # decode fully now: a truncated file raises here, not later in a training worker
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert would copy an RGB image
        return rgb.resize((size, size), Image.Resampling.BILINEAR)


def encode_image(image: Image.Image, image_format: str, jpeg_quality: int) -> bytes | np.ndarray:
    """PNG / JPEG bytes, or for `raw` the uint8 pixels themselves (147 KiB at 224 x 224): no encoding now and no
    decoding every epoch (docs/performance.md)."""
    if image_format == "raw":
        return np.asarray(image, np.uint8)
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=1)  # lossless; level 1 is 5x faster than 6, ~10% larger
    else:
        image.save(buffer, format="JPEG", quality=jpeg_quality)
    return buffer.getvalue()


def process_row(row: Row, config: PrecomputeConfig) -> tuple[bytes | None, str | None]:
    """(record bytes, None) for a good row, (None, reason) for a bad one. Never raises for bad input files."""
    try:
        image = encode_image(load_image(row.image_path, config.image_size), config.image_format, config.jpeg_quality)
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        return None, f"image {row.image_path}: {type(error).__name__}: {error}"
    try:
        waveform = audio_io.load_audio(row.audio_path, config.fbank.sample_rate, config.reference_resampling)
    except Exception as error:  # AudioDecodeError, and whatever else a decoder throws on garbage
        return None, f"audio {row.audio_path}: {type(error).__name__}: {error}"
    frames = int(min(audio.num_frames(waveform.size, config.fbank), config.fbank.max_frames))
    if frames == 0:
        return None, f"audio {row.audio_path}: shorter than one {config.fbank.frame_length}-sample frame"
    features = audio.ast_features(waveform, config.fbank)
    return records.encode_example(row.row_id, row.label, row.caption, image, features, frames), None


# ----------------------------------------------------------------------------------------------- shards (parent)


def split_name(manifest: str | os.PathLike) -> str:
    return Path(manifest).stem


def shard_path(out: Path, split: str, index: int) -> Path:
    return out / f"{split}-{index:05d}{SHARD_SUFFIX}"


def sidecar_path(shard: Path) -> Path:
    return shard.with_name(shard.name + SIDECAR_SUFFIX)


def metadata_path(out: str | os.PathLike, split: str) -> Path:
    return Path(out) / f"{split}.json"


def _file_signature(path: str) -> list:
    stat = os.stat(path)
    return [path, stat.st_size, stat.st_mtime_ns]


def shard_fingerprint(rows: list[Row], config: PrecomputeConfig) -> str:
    """Changes when any input row, input file (size, mtime) or setting of the shard changes."""
    content = {
        "format": records.FORMAT_VERSION,
        "config": config.to_dict(),
        "rows": [
            [row.row_id, row.label, row.caption, _file_signature(row.image_path), _file_signature(row.audio_path)]
            for row in rows
        ],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _write_json_atomically(path: Path, content: dict) -> None:
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(content, indent=1, sort_keys=True))
    os.replace(temporary, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def finished_sidecar(shard: Path, fingerprint: str) -> dict | None:
    """The sidecar of a complete shard written from these inputs and settings, else None."""
    try:
        sidecar = json.loads(sidecar_path(shard).read_text())
    except (OSError, ValueError):
        return None
    if sidecar.get("fingerprint") != fingerprint or not shard.is_file():
        return None
    if shard.stat().st_size != sidecar.get("bytes"):
        return None
    return sidecar


def _remove_leftovers(out: Path, split: str, keep: set[Path]) -> None:
    """Delete temporary files of interrupted runs, and shards (+ sidecars) that are not finished and current."""
    pattern = re.compile(
        re.escape(split) + r"-\d{5}" + re.escape(SHARD_SUFFIX) + r"(" + re.escape(SIDECAR_SUFFIX) + r")?(\.tmp-\d+)?"
    )
    for path in out.iterdir():
        match = pattern.fullmatch(path.name)
        shard = out / (path.name.split(SHARD_SUFFIX)[0] + SHARD_SUFFIX)
        if match and (match.group(2) or shard not in keep):
            path.unlink()


def write_shard(shard: Path, rows: list[Row], results, fingerprint: str, on_row=lambda skipped: None,
                compression: str = "none") -> dict:
    """Consume one result per row, write the complete shard under a temporary name, then rename; sidecar last."""
    from array_record.python.array_record_module import ArrayRecordWriter

    temporary = shard.with_name(f"{shard.name}.tmp-{os.getpid()}")
    writer = ArrayRecordWriter(str(temporary), WRITER_OPTIONS[compression])
    written, skipped = [], []
    try:
        for row in rows:
            data, reason = next(results)
            if data is None:
                skipped.append(RowProblem(row.row_id, row.line, reason).to_dict())
            else:
                writer.write(data)
                written.append(row.row_id)
            on_row(data is None)
    finally:
        writer.close()
    os.replace(temporary, shard)
    sidecar = {
        "fingerprint": fingerprint,
        "row_ids": written,
        "skipped": skipped,
        "num_records": len(written),
        "bytes": shard.stat().st_size,
        "sha256": _sha256(shard),
    }
    _write_json_atomically(sidecar_path(shard), sidecar)
    return sidecar


def shard_compressions(shards: list[Path], sidecars: list[dict]) -> list[str]:
    """The compressions (keys of WRITER_OPTIONS) the non-empty shards hold, read from the shards: a rerun keeps
    every finished shard whatever its compression (its records are the same), so a split can hold both."""
    return sorted({_compression_of(shard) for shard, sidecar in zip(shards, sidecars) if sidecar["num_records"]})


def _compression_of(shard: Path) -> str:
    """The WRITER_OPTIONS key whose options the shard was written with (else its writer options as recorded)."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(shard))
    written = set(reader.writer_options_string().split(","))
    reader.close()
    matches = [name for name, options in WRITER_OPTIONS.items() if set(options.split(",")) <= written]
    return matches[0] if matches else ",".join(sorted(written))


BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _single_threaded_children():
    """Workers get one BLAS thread each: N processes x N spinning BLAS threads made fbank 20x slower here."""
    saved = {name: os.environ.get(name) for name in BLAS_THREAD_VARIABLES}
    os.environ.update({name: "1" for name in BLAS_THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# Items `_threaded_map` keeps submitted per thread ahead of its consumer (4 ran no faster: docs/performance.md).
QUEUED_PER_THREAD = 2


def _threaded_map(function, items: list, threads: int):
    """`map(function, items)` in order, on a pool of `threads` threads with at most QUEUED_PER_THREAD x `threads`
    items submitted and not yet consumed.

    Decoding, resampling, the FFT and PNG coding release the GIL, so one process keeps several cores busy; the
    bound keeps memory flat however long the manifest is."""
    if threads <= 1:
        yield from map(function, items)
        return
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= QUEUED_PER_THREAD * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _results(rows: list[Row], config: PrecomputeConfig, workers: int, threads: int = 1):
    """Ordered (record, reason) results for `rows`, computed in `workers` processes (0: in this process, on
    `threads` threads)."""
    work = functools.partial(process_row, config=config)
    if workers == 0 or not rows:
        yield from _threaded_map(work, rows, threads)
        return
    with _single_threaded_children():
        # spawn: the parent may hold jax threads; a Ctrl-C is the parent's to handle (it stops the pool)
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=distributed.ignore_interrupts)
    with pool:
        yield from pool.imap(work, rows, chunksize=2)


def _row_progress(split: str, total: int, done: int, skipped: int, shown: bool):
    """A progress bar over a manifest's rows, and the `on_row(was_skipped)` that advances it and counts skips."""
    from synergy_jax import progress as progress_bar

    bar = progress_bar.bar(total=total, initial=done, desc=f"precompute {split}", unit="row", disable=not shown)
    skipped_so_far = [skipped]

    def on_row(was_skipped: bool) -> None:
        skipped_so_far[0] += was_skipped
        bar.update(1)
        bar.set_postfix(skipped=skipped_so_far[0], refresh=False)

    return bar, on_row


def precompute(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    config: PrecomputeConfig = PrecomputeConfig(),
    *,
    split: str | None = None,
    workers: int = 0,
    threads: int = 1,
    progress: bool = True,
    compression: str = "none",
) -> dict:
    """Precompute one manifest; returns the metadata it wrote. Raises PrecomputeError if no row is usable.

    Rows are computed in `workers` processes, or with `workers=0` in this process on `threads` threads; shards
    are written with `compression` (a key of WRITER_OPTIONS; readers need not know it)."""
    if compression not in WRITER_OPTIONS:
        raise ValueError(f"compression={compression!r}: must be one of {', '.join(WRITER_OPTIONS)}")

    split = split or split_name(manifest)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, manifest_problems = read_manifest(manifest)
    chunks = [rows[start : start + config.shard_size] for start in range(0, len(rows), config.shard_size)]
    shards = [shard_path(out, split, index) for index in range(len(chunks))]
    fingerprints = [shard_fingerprint(chunk, config) for chunk in chunks]
    sidecars = [finished_sidecar(shard, fp) for shard, fp in zip(shards, fingerprints)]
    # Until the new metadata is written the split is unfinished: an interrupted rerun must not leave the old
    # metadata describing a mix of old and new shards.
    metadata_path(out, split).unlink(missing_ok=True)
    _remove_leftovers(out, split, keep={s for s, sidecar in zip(shards, sidecars) if sidecar is not None})
    todo = [index for index, sidecar in enumerate(sidecars) if sidecar is None]

    started = time.perf_counter()
    skipped = len(manifest_problems) + sum(len(s["skipped"]) for s in sidecars if s)
    bar, on_row = _row_progress(split, len(rows), len(rows) - sum(len(chunks[i]) for i in todo), skipped, progress)
    results = _results([row for index in todo for row in chunks[index]], config, workers, threads)
    try:
        for index in todo:
            sidecars[index] = write_shard(shards[index], chunks[index], results, fingerprints[index], on_row,
                                          compression)  # fmt: skip
    finally:
        results.close()  # stops the worker pool if a shard failed
        bar.close()

    metadata = build_metadata(manifest, split, config, rows, manifest_problems, shards, sidecars)
    metadata["seconds"] = round(time.perf_counter() - started, 3)
    metadata["malloc"] = host_memory.describe()  # what this run's speed depended on
    metadata["compression"] = shard_compressions(shards, sidecars)
    metadata["rows_computed_this_run"] = sum(len(chunks[i]) for i in todo)
    _write_json_atomically(metadata_path(out, split), metadata)
    if summary := skipped_summary(str(manifest), metadata["skipped"]):
        print(f"{summary} (every one: {metadata_path(out, split)})", file=sys.stderr, flush=True)
    if metadata["num_examples"] == 0:
        raise PrecomputeError(
            f"{manifest}: no usable row ({metadata['num_skipped']} skipped); see {metadata_path(out, split)}"
        )
    return metadata


def build_metadata(manifest, split, config, rows, manifest_problems, shards, sidecars) -> dict:
    skipped = [problem.to_dict() for problem in manifest_problems]
    skipped += [problem for sidecar in sidecars for problem in sidecar["skipped"]]
    skipped.sort(key=lambda problem: problem["row_id"])
    shard_entries = [
        {"file": shard.name} | {key: sidecar[key] for key in ("num_records", "bytes", "sha256")}
        for shard, sidecar in zip(shards, sidecars)
    ]
    written_ids = {row_id for sidecar in sidecars for row_id in sidecar["row_ids"]}
    labels = sorted({row.label for row in rows if row.row_id in written_ids})
    frontend = {
        "fbank": config.fbank.to_dict(),
        "feature_dtype": str(records.AUDIO_DTYPE),
        "sample_rate": config.fbank.sample_rate,
        "resampling": "soxr HQ, native -> 22050 -> 16000 Hz"
        if config.reference_resampling
        else "soxr HQ, native -> 16000 Hz",
        "image_size": config.image_size,
        "image_format": config.image_format,
        "image_resize": "PIL bilinear (antialiased) to image_size x image_size, aspect ratio squashed",
    }
    content_hash = hashlib.sha256(
        json.dumps(
            {"shards": shard_entries, "frontend": frontend, "format": records.FORMAT_VERSION}, sort_keys=True
        ).encode()
    ).hexdigest()
    return {
        "format_version": records.FORMAT_VERSION,
        "split": split,
        "manifest": os.path.abspath(manifest),
        "num_manifest_rows": len(rows) + len(manifest_problems),
        "num_examples": len(written_ids),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "labels": labels,
        "shards": shard_entries,
        "frontend": frontend,
        "config": config.to_dict(),
        "content_hash": content_hash,
    }


# ----------------------------------------------------------------------------------------------- reading back


def load_metadata(out: str | os.PathLike, split: str) -> dict:
    """The metadata of a finished precompute, with its shards checked to exist at the recorded sizes."""
    path = metadata_path(out, split)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run `python -m data_pipelines.precompute --manifest=<{split}.csv> --out={out}`"
        )
    metadata = json.loads(path.read_text())
    if metadata.get("format_version") != records.FORMAT_VERSION:
        raise ValueError(f"{path}: format version {metadata.get('format_version')}, expected {records.FORMAT_VERSION}")
    for shard in metadata["shards"]:
        file = Path(out) / shard["file"]
        if not file.is_file():
            raise FileNotFoundError(f"{path} lists shard {shard['file']}, which is missing: re-run precompute")
        size, recorded = file.stat().st_size, shard.get("bytes")  # None: metadata from before sizes were recorded
        if recorded is not None and size != recorded:
            raise ValueError(f"{file} has {size} bytes, its metadata {recorded} (truncated or replaced): re-run "
                             "precompute")  # fmt: skip
    return metadata


def shard_paths(out: str | os.PathLike, metadata: dict) -> list[str]:
    """Paths of the non-empty shards a metadata file lists (empty shards hold only skipped rows)."""
    return [str(Path(out) / shard["file"]) for shard in metadata["shards"] if shard["num_records"] > 0]


# ----------------------------------------------------------------------------------------------- CLI


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("manifest", None, "Manifest CSV (img_path, wav_path, label, caption).", required=True)
    flags.DEFINE_string("out", None, "Output folder for shards and metadata.", required=True)
    flags.DEFINE_string("split", None, "Split name (default: the manifest's file name without extension).")
    flags.DEFINE_integer("workers", max(1, (os.cpu_count() or 1) - 1), "Decoding processes (0: in this process).")
    flags.DEFINE_integer("threads", 2, "Rows in flight on threads when --workers=0.")
    flags.DEFINE_integer("shard_size", PrecomputeConfig.shard_size, "Manifest rows per shard.")
    flags.DEFINE_integer("image_size", PrecomputeConfig.image_size, "Stored image side (pixels).")
    flags.DEFINE_enum("image_format", "raw", IMAGE_FORMATS, "Stored image encoding (raw: pixels, the fastest to read).")
    flags.DEFINE_integer("max_frames", audio.FbankConfig.max_frames, "AST frames (10 ms each) per clip.")
    flags.DEFINE_integer("mel_bins", audio.FbankConfig.num_mel_bins, "Mel bins.")
    flags.DEFINE_bool("reference_resampling", False, "Resample via 22.05 kHz as the reference did.")
    flags.DEFINE_enum("compression", "none", list(WRITER_OPTIONS), "Shard compression (zstd: 9-18 % smaller, "
                      "slower to write and read).")


def _run(argv) -> None:
    """absl entry point: exit 2 for a bad flag, an unusable manifest or no surviving row, 0 otherwise."""
    from absl import flags

    from synergy_jax import cli

    cli.refuse_positional(argv)
    options = flags.FLAGS
    config = PrecomputeConfig(
        image_size=options.image_size,
        image_format=options.image_format,
        fbank=audio.FbankConfig(max_frames=options.max_frames, num_mel_bins=options.mel_bins),
        reference_resampling=options.reference_resampling,
        shard_size=options.shard_size,
    )
    try:
        metadata = precompute(options.manifest, options.out, config, split=options.split, workers=options.workers,
                              threads=options.threads, compression=options.compression)  # fmt: skip
    except (ManifestError, PrecomputeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)  # bad input, as the jobs' exit 2
    print(
        f"{metadata['split']}: {metadata['num_examples']} examples in {len(metadata['shards'])} shard(s), "
        f"{metadata['num_skipped']} row(s) skipped, {metadata['rows_computed_this_run']} computed this run "
        f"in {metadata['seconds']:.1f} s -> {metadata_path(options.out, metadata['split'])}"
    )


if __name__ == "__main__":
    from absl import app

    from synergy_jax import cli

    host_memory.use_fast_malloc(default=MALLOC)
    _define_flags()
    app.run(_run, flags_parser=cli.parse_flags_or_exit)  # a bad flag exits 2 in one line, as the jobs
