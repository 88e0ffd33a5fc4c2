"""Manifest validation, precompute robustness (bad rows), resumability and the CLI's exit status."""

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from data_pipelines import audio_io, precompute, records
from data_pipelines.manifest import ManifestError, read_manifest, write_manifest
from helpers import glibc_reads_every_tunable
from synergy_jax import audio, host_memory

TINY = precompute.PrecomputeConfig(image_size=32, fbank=audio.FbankConfig(max_frames=64, num_mel_bins=32), shard_size=2)
REPO = Path(__file__).resolve().parents[1]


def _good_files(folder: Path, name: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    image = folder / f"{name}.png"
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(image)
    wav = folder / f"{name}.wav"
    soundfile.write(wav, (0.3 * rng.standard_normal(8000)).astype(np.float32), 8000)
    return {
        "img_path": image.name,
        "wav_path": wav.name,
        "label": f"thing {seed}, item {seed}",
        "caption": f"A thing {seed}.",
    }


def _good_manifest(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "train.csv"
    write_manifest(manifest, [_good_files(folder, f"ok{i}", i) for i in range(count)])
    return manifest


@pytest.fixture()
def bad_manifest(tmp_path):
    """A manifest with two good rows around one row of every kind of damage; returns (path, expected reasons)."""
    good = [_good_files(tmp_path, "good0", 0), _good_files(tmp_path, "good1", 1)]
    template = _good_files(tmp_path, "base", 2)
    (tmp_path / "noise.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + np.random.default_rng(0).bytes(200))
    (tmp_path / "text.wav").write_text("this is a caption, not audio\n")
    png = (tmp_path / "base.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "not_image.png").write_text("hello")
    soundfile.write(tmp_path / "tiny.wav", np.zeros(100, np.float32), 16000)
    good[1]["img_path"] = str(tmp_path / "good1.png")  # absolute paths work too
    rows = [
        good[0],
        {**template, "img_path": "missing.png"},
        {**template, "wav_path": "missing.wav"},
        {**template, "label": " , "},
        {**template, "caption": "   "},
        {**template, "wav_path": "noise.wav"},
        {**template, "wav_path": "text.wav"},
        {**template, "img_path": "truncated.png"},
        {**template, "img_path": "empty.png"},
        {**template, "img_path": "not_image.png"},
        {**template, "wav_path": "tiny.wav"},
        good[1],
    ]
    expected = {
        1: "image file not found",
        2: "audio file not found",
        3: "empty label",
        4: "empty caption",
        5: "audio .*noise.wav",
        6: "audio .*text.wav",
        7: "image .*truncated.png.*truncated",
        8: "image file is empty",
        9: "image .*not_image.png.*UnidentifiedImageError",
        10: "shorter than one 400-sample frame",
    }
    manifest = tmp_path / "mixed.csv"
    write_manifest(manifest, rows)
    return manifest, expected


def test_manifest_reports_every_bad_row_with_its_line(bad_manifest):
    manifest, expected = bad_manifest
    rows, problems = read_manifest(manifest)
    cheap = {row_id: reason for row_id, reason in expected.items() if "not found" in reason or "empty" in reason}
    assert {p.row_id: p.line for p in problems} == {row_id: row_id + 2 for row_id in cheap}
    for problem in problems:
        assert cheap[problem.row_id] in problem.reason
    assert [row.row_id for row in rows] == sorted(set(range(12)) - set(cheap))
    assert all(os.path.isabs(row.image_path) and os.path.isabs(row.audio_path) for row in rows)


def test_manifest_rejects_missing_columns_and_extra_fields(tmp_path):
    (tmp_path / "a.csv").write_text("img_path,wav_path,caption\nx.png,x.wav,hi\n")
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['label'\]"):
        read_manifest(tmp_path / "a.csv")
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "absent.csv")
    (tmp_path / "b.csv").write_text("img_path,wav_path,label,caption\nx.png,x.wav,dog,a dog,EXTRA\n")
    _, problems = read_manifest(tmp_path / "b.csv")
    assert len(problems) == 1 and problems[0].line == 2 and "more field" in problems[0].reason


def test_precompute_skips_and_reports_bad_rows(bad_manifest, tmp_path):
    manifest, expected = bad_manifest
    metadata = precompute.precompute(manifest, tmp_path / "out", TINY, progress=False)
    assert metadata["num_examples"] == 2 and metadata["num_manifest_rows"] == 12
    reasons = {entry["row_id"]: entry["reason"] for entry in metadata["skipped"]}
    assert set(reasons) == set(expected)
    for row_id, pattern in expected.items():
        assert re.search(pattern, reasons[row_id]), (row_id, reasons[row_id])
    assert all(entry["line"] == entry["row_id"] + 2 for entry in metadata["skipped"])
    on_disk = json.loads(precompute.metadata_path(tmp_path / "out", "mixed").read_text())
    assert on_disk["skipped"] == metadata["skipped"] and on_disk["content_hash"] == metadata["content_hash"]
    examples = _read_examples(tmp_path / "out", "mixed")
    assert [example["row_id"] for example in examples] == [0, 11]
    for example, name in zip(examples, ["good0", "good1"]):
        expected_audio = audio.ast_features(audio_io.load_audio(manifest.parent / f"{name}.wav"), TINY.fbank)
        assert example["audio"].shape == (64, 32) and example["audio"].dtype == np.float16
        np.testing.assert_allclose(example["audio"], expected_audio, atol=2e-3)  # float16 storage
        assert example["audio_frames"] == 64  # 1 s = 98 frames, capped at max_frames
        assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8  # raw, the default
        original = Image.open(manifest.parent / f"{name}.png").convert("RGB")
        expected_image = original.resize((32, 32), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(example["image"], np.asarray(expected_image))


def _read_examples(out, split):
    from array_record.python.array_record_module import ArrayRecordReader

    metadata = precompute.load_metadata(out, split)
    examples = []
    for path in precompute.shard_paths(out, metadata):
        reader = ArrayRecordReader(path)
        examples += [records.decode_example(data) for data in reader.read_all()]
        reader.close()
    return examples


def _shard_state(out: Path) -> dict:
    return {path.name: (path.stat().st_mtime_ns, path.stat().st_ino) for path in sorted(out.iterdir())}


def test_interrupted_run_resumes_without_trusting_partial_shards(tmp_path, monkeypatch):
    manifest = _good_manifest(tmp_path / "data", 6)  # 3 shards of 2 rows
    out = tmp_path / "out"
    real_process_row = precompute.process_row
    calls = []

    def dies_on_fourth_row(row, config):
        calls.append(row.row_id)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as a Ctrl-C or a kill would, in the middle of shard 1
        return real_process_row(row, config)

    monkeypatch.setattr(precompute, "process_row", dies_on_fourth_row)
    with pytest.raises(KeyboardInterrupt):
        precompute.precompute(manifest, out, TINY, progress=False)
    names = {path.name for path in out.iterdir()}
    assert {"train-00000.array_record", "train-00000.array_record.json"} <= names
    assert "train-00001.array_record" not in names and "train.json" not in names
    assert any(name.startswith("train-00001.array_record.tmp-") for name in names)  # the half-written shard
    # A crash between a shard's rename and its sidecar leaves an unconfirmed shard: it must not be trusted either.
    (out / "train-00002.array_record").write_bytes(b"half a shard")
    finished = _shard_state(out)["train-00000.array_record"]

    monkeypatch.setattr(precompute, "process_row", real_process_row)
    metadata = precompute.precompute(manifest, out, TINY, progress=False)
    assert metadata["rows_computed_this_run"] == 4 and metadata["num_examples"] == 6
    assert _shard_state(out)["train-00000.array_record"] == finished  # kept, not rewritten
    assert not [path for path in out.iterdir() if ".tmp-" in path.name]

    clean = precompute.precompute(manifest, tmp_path / "clean", TINY, progress=False)
    assert metadata["shards"] == clean["shards"] and metadata["content_hash"] == clean["content_hash"]
    assert [e["row_id"] for e in _read_examples(out, "train")] == list(range(6))

    again = precompute.precompute(manifest, out, TINY, progress=False)
    assert again["rows_computed_this_run"] == 0 and again["content_hash"] == clean["content_hash"]


def test_changed_inputs_or_settings_recompute_only_what_changed(tmp_path):
    manifest = _good_manifest(tmp_path / "data", 4)
    out = tmp_path / "out"
    precompute.precompute(manifest, out, TINY, progress=False)
    before = _shard_state(out)
    soundfile.write(tmp_path / "data" / "ok3.wav", np.zeros(4000, np.float32), 8000)  # row 3 lives in shard 1
    metadata = precompute.precompute(manifest, out, TINY, progress=False)
    after = _shard_state(out)
    assert metadata["rows_computed_this_run"] == 2
    assert after["train-00000.array_record"] == before["train-00000.array_record"]
    assert after["train-00001.array_record"] != before["train-00001.array_record"]
    raw = _read_examples(out, "train")[0]
    for image_format, file_format in (("png", "PNG"), ("jpeg", "JPEG")):
        encoded = precompute.precompute(manifest, out, dataclasses.replace(TINY, image_format=image_format), progress=False)
        assert encoded["rows_computed_this_run"] == 4 and encoded["frontend"]["image_format"] == image_format
        example = _read_examples(out, "train")[0]
        assert Image.open(io.BytesIO(example["image"])).format == file_format
        decoded = np.asarray(records.image_of(example))
        if image_format == "png":  # lossless: the same pixels as the raw record
            np.testing.assert_array_equal(decoded, raw["image"])
        else:
            assert decoded.shape == raw["image"].shape
            assert np.corrcoef(decoded.ravel(), raw["image"].ravel())[0, 1] > 0.7  # lossy, but the same picture


def test_an_interrupted_rerun_leaves_no_stale_metadata_and_a_truncated_shard_is_caught(tmp_path, monkeypatch):
    manifest = _good_manifest(tmp_path / "data", 4)
    out = tmp_path / "out"
    precompute.precompute(manifest, out, TINY, progress=False)
    soundfile.write(tmp_path / "data" / "ok3.wav", np.zeros(4000, np.float32), 8000)  # shard 1 must be redone

    def interrupted(row, config):
        raise KeyboardInterrupt

    monkeypatch.setattr(precompute, "process_row", interrupted)
    with pytest.raises(KeyboardInterrupt):
        precompute.precompute(manifest, out, TINY, progress=False)
    with pytest.raises(FileNotFoundError, match="run `python -m data_pipelines.precompute"):
        precompute.load_metadata(out, "train")  # the old metadata no longer describes the shards on disk
    monkeypatch.undo()
    precompute.precompute(manifest, out, TINY, progress=False)
    shard = out / "train-00001.array_record"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated or replaced"):
        precompute.load_metadata(out, "train")


def test_worker_processes_and_threads_give_the_same_shards(tmp_path):
    manifest = _good_manifest(tmp_path / "data", 7)
    serial = precompute.precompute(manifest, tmp_path / "serial", TINY, workers=0, progress=False)
    parallel = precompute.precompute(manifest, tmp_path / "parallel", TINY, workers=2, progress=False)
    threaded = precompute.precompute(manifest, tmp_path / "threads", TINY, workers=0, threads=3, progress=False)
    assert serial["shards"] and sum(shard["num_records"] for shard in serial["shards"]) == 7, serial["shards"]
    assert parallel["shards"] == serial["shards"] == threaded["shards"]  # sizes and sha256: same bytes, same order


def test_the_thread_pool_keeps_order_and_a_bounded_number_of_items_in_flight():
    """Results come back in input order, and no more than QUEUED_PER_THREAD x threads items are ever submitted
    ahead of the consumer, so memory stays flat however long the manifest is."""
    started = []

    def slow_for_the_first(item):
        started.append(item)
        time.sleep(0.05 if item == 0 else 0.0)  # the head of the queue finishes last
        return item * item

    threads, items = 2, list(range(40))
    results = precompute._threaded_map(slow_for_the_first, items, threads)
    assert next(results) == 0
    assert len(started) <= precompute.QUEUED_PER_THREAD * threads
    assert list(results) == [item * item for item in items[1:]]


def test_shards_are_uncompressed_or_zstd_level_1_with_one_record_per_chunk_and_read_the_same(tmp_path):
    from array_record.python.array_record_module import ArrayRecordReader

    manifest = _good_manifest(tmp_path / "data", 2)
    records_by_compression = {}
    for compression, expected in (("none", "uncompressed"), ("zstd", "zstd:1")):
        out = tmp_path / compression
        options = {} if compression == "none" else {"compression": compression}  # "none" is the default
        metadata = precompute.precompute(manifest, out, TINY, workers=0, progress=False, **options)
        assert metadata["compression"] == [compression]
        reader = ArrayRecordReader(str(next(out.glob(f"*{precompute.SHARD_SUFFIX}"))))
        written = reader.writer_options_string().split(",")
        assert expected in written and "group_size:1" in written, written
        records_by_compression[compression] = reader.read_all()
    assert records_by_compression["none"] == records_by_compression["zstd"]
    # a rerun keeps the finished shards whatever their compression, and the metadata says what they hold
    again = precompute.precompute(manifest, tmp_path / "zstd", TINY, workers=0, progress=False)
    assert again["rows_computed_this_run"] == 0 and again["compression"] == ["zstd"]
    with pytest.raises(ValueError, match="compression='lz4': must be one of none, zstd"):
        precompute.precompute(manifest, tmp_path / "lz4", TINY, workers=0, progress=False, compression="lz4")


def _cli(manifest, out):
    environment = host_memory.as_shipped(os.environ)  # as users start it: tests/conftest.py chose the jobs' malloc
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipelines.precompute",
            f"--manifest={manifest}",
            f"--out={out}",
            "--workers=0",
            "--image_size=32",
            "--max_frames=64",
            "--mel_bins=32",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env=environment,
    )


def test_cli_exit_status(bad_manifest, tmp_path):
    manifest, expected = bad_manifest
    result = _cli(manifest, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    if glibc_reads_every_tunable():  # the CLI restarted with precompute's malloc
        assert json.loads((tmp_path / "out" / "mixed.json").read_text())["malloc"].startswith(
            "glibc malloc, keeping freed memory")
    assert "2 examples" in result.stdout and f"{len(expected)} row(s) skipped" in result.stdout
    # Summarised by cause, with the first rows by their CSV line, and where every one is listed:
    assert f"{manifest}: {len(expected)} row(s) skipped: 2 x audio: AudioDecodeError, 1 x image file not found" in result.stderr
    assert "1 x image: OSError" in result.stderr and "1 x audio: shorter than one 400-sample frame" in result.stderr
    assert "first: line 3 (row 1): image file not found" in result.stderr and "and 7 more" in result.stderr
    assert f"(every one: {tmp_path / 'out' / 'mixed.json'})" in result.stderr
    assert "\r" not in result.stderr  # stderr is a pipe: progress as whole lines, no redrawn frames
    assert "precompute mixed: 7/7 row [" in result.stderr  # the rows the manifest check let through

    only_bad = tmp_path / "only_bad.csv"
    write_manifest(only_bad, [{"img_path": "truncated.png", "wav_path": "text.wav", "label": "x", "caption": "y"}])
    (tmp_path / "truncated.png").write_bytes((manifest.parent / "truncated.png").read_bytes())
    (tmp_path / "text.wav").write_text("not audio")
    result = _cli(only_bad, tmp_path / "out")
    assert result.returncode == 2 and "no usable row" in result.stderr
    assert json.loads((tmp_path / "out" / "only_bad.json").read_text())["num_examples"] == 0

    misspelled = subprocess.run([sys.executable, "-m", "data_pipelines.precompute", f"--manfest={manifest}"],
                                capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert misspelled.returncode == 2 and "Unknown command line flag 'manfest'" in misspelled.stderr
    assert "Traceback" not in misspelled.stderr


def test_a_job_that_precomputes_says_why_rows_were_skipped(bad_manifest, tmp_path, capfd):
    from data_pipelines import sources
    from experiments.configs import pretrain as configs

    manifest, expected = bad_manifest
    config = configs.get_config("demo").data
    config.demo, config.dir, config.tokenizer = False, str(tmp_path / "pre"), "t"
    config.train_manifest = config.eval_manifest = str(manifest)
    config.image_size, config.max_frames, config.mel_bins = 32, 64, 32
    data = sources.prepare(config, tmp_path)
    assert data.train_metadata["num_examples"] == 2
    stderr = capfd.readouterr().err
    assert f"{manifest}: {len(expected)} row(s) skipped: 2 x audio: AudioDecodeError" in stderr
    assert "first: line 3 (row 1): image file not found" in stderr
