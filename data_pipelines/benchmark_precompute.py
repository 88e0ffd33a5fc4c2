"""Throughput of the audio front-end: the reference's per-sample path against precompute + the Grain read path.

    python -m data_pipelines.benchmark_precompute [--clips=48 --seconds=10 --rate=44100 --workers=2]
    python -m data_pipelines.benchmark_precompute --manifest=data/train.csv --limit=200

On the same files (a manifest's, or generated VGGSound-like clips: 10 s stereo WAV at 44.1 kHz and 640x360 JPEG
frames), it times
  reference   per sample, every epoch (dataset.py:143-149): librosa.load (-> 22.05 kHz, soxr_hq), librosa.resample
              (-> 16 kHz), Kaldi fbank + pad/normalise (our numpy fbank, equal to ASTFeatureExtractor; the
              torchaudio one the reference called is not faster per clip), audio only
  ours        the same audio work with our loader (one soxr resampling step instead of two)
  precompute  once: decode, resample, fbank, float16, PNG image, ArrayRecord write, in 1 and --workers processes
  read path   every epoch: Grain train pipeline over the shards (record decode, image + feature augmentation,
              prompt, tokenise, batch), in this process
and prints clips/s for each. BLAS is pinned to one thread per process for every path (fair on small machines).
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import soundfile  # noqa: E402
from PIL import Image  # noqa: E402

from data_pipelines import audio_io  # noqa: E402
from data_pipelines import manifest as manifest_lib  # noqa: E402
from data_pipelines import precompute  # noqa: E402
from synergy_jax import audio  # noqa: E402


def make_clips(folder: Path, count: int, seconds: float, rate: int) -> Path:
    """VGGSound-like inputs: stereo tones + noise WAVs and noisy 640x360 JPEG frames, plus their manifest."""
    rng = np.random.default_rng(0)
    rows = []
    t = np.arange(int(seconds * rate)) / rate
    for i in range(count):
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
        stereo = np.stack(
            [tone + 0.05 * rng.standard_normal(t.size), tone * 0.5 + 0.05 * rng.standard_normal(t.size)], 1
        )
        soundfile.write(folder / f"{i}.wav", stereo.astype(np.float32), rate, subtype="PCM_16")
        frame = np.clip(rng.normal(128, 40, (360, 640, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(frame).save(folder / f"{i}.jpg", quality=90)
        rows.append({"img_path": f"{i}.jpg", "wav_path": f"{i}.wav", "label": "tone, beep", "caption": "A tone."})
    path = folder / "bench.csv"
    manifest_lib.write_manifest(path, rows)
    return path


def reference_audio_path(path: str) -> np.ndarray:
    import librosa

    wave, rate = librosa.load(path)  # 22.05 kHz mono, soxr_hq
    wave = librosa.resample(wave, orig_sr=rate, target_sr=16_000)
    return audio.ast_features(wave)


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:8.1f} clips/s  ({seconds:6.2f} s for {count})"


def main(argv) -> None:
    from absl import flags

    del argv
    options = flags.FLAGS
    work = Path(tempfile.mkdtemp(prefix="bench_precompute_"))
    try:
        manifest = (
            Path(options.manifest)
            if options.manifest
            else make_clips(work, options.clips, options.seconds, options.rate)
        )
        rows, _ = manifest_lib.read_manifest(manifest)
        rows = rows[: options.limit] if options.limit else rows
        subset = work / "subset.csv"
        manifest_lib.write_manifest(
            subset,
            [
                {"img_path": r.image_path, "wav_path": r.audio_path, "label": r.label, "caption": r.caption}
                for r in rows
            ],
        )
        print(f"{len(rows)} clips from {manifest}")

        reference_audio_path(rows[0].audio_path)  # librosa's numba compilation is not part of the per-clip cost
        start = time.perf_counter()
        for row in rows:
            reference_audio_path(row.audio_path)
        reference = time.perf_counter() - start
        print(f"reference per-sample audio (librosa 22.05k -> 16k -> fbank), 1 process: {_rate(len(rows), reference)}")
        start = time.perf_counter()
        for row in rows:
            audio.ast_features(audio_io.load_audio(row.audio_path))
        ours = time.perf_counter() - start
        print(f"our audio decode (soundfile, soxr native -> 16k, fbank), 1 process:    {_rate(len(rows), ours)}")

        timings = {}
        for workers in sorted({0, options.workers}):
            out = work / f"out{workers}"
            start = time.perf_counter()
            precompute.precompute(subset, out, precompute.PrecomputeConfig(), workers=workers, progress=False)
            timings[workers] = time.perf_counter() - start
            label = "1 process" if workers == 0 else f"{workers} worker processes (+ start-up)"
            print(f"precompute once (audio + image + write), {label}: {_rate(len(rows), timings[workers])}")

        from data_pipelines import pipeline
        from data_pipelines.demo import train_tokenizer

        train_tokenizer([row.caption for row in rows] * 5 + ["a video of a tone"], work / "tokenizer", vocab_size=300)
        config = pipeline.PipelineConfig(
            data_dir=str(work / "out0"),
            split="subset",
            batch_size=min(8, len(rows)),
            train=True,
            tokenizer=str(work / "tokenizer"),
            text_mode="prompt",
            process_index=0,
            process_count=1,
        )
        iterator = iter(pipeline.build_dataset(config))
        next(iterator)
        batches = max(1, len(rows) // config.batch_size)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        read = time.perf_counter() - start
        examples = batches * config.batch_size
        print(f"read path per epoch (Grain, decode + augment + tokenise), 1 process: {_rate(examples, read)}")
        print(
            f"audio front-end per epoch: reference {len(rows) / reference:.1f} clips/s vs read path "
            f"{examples / read:.1f} clips/s (image work included in ours only)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("manifest", None, "Benchmark on this manifest's files instead of generated clips.")
    flags.DEFINE_integer("limit", 0, "Use at most this many rows (0: all).")
    flags.DEFINE_integer("clips", 48, "Generated clips.")
    flags.DEFINE_float("seconds", 10.0, "Generated clip length.")
    flags.DEFINE_integer("rate", 44_100, "Generated clips' sample rate.")
    flags.DEFINE_integer("workers", 2, "Precompute worker processes.")
    app.run(main)
