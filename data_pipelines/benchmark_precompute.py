"""Throughput of the audio front-end: the reference's per-sample path against precompute + the Grain read path.

    python -m data_pipelines.benchmark_precompute [--clips=48 --seconds=10 --rate=44100 --workers=2 --threads=2]
    python -m data_pipelines.benchmark_precompute --manifest=data/train.csv --limit=200
    python -m data_pipelines.benchmark_precompute --reference_python=.venv-reference/bin/python

On the same files (a manifest's, or generated VGGSound-like clips: 10 s stereo WAV at 44.1 kHz and 640x360 JPEG
frames), it times
  reference   per sample, every epoch (dataset.py:143-149): librosa.load (-> 22.05 kHz, soxr_hq), librosa.resample
              (-> 16 kHz), Kaldi fbank + pad/normalise, audio only. With --reference_python (a venv holding the
              reference's pinned torch, torchaudio, torchvision, transformers and librosa) it is the reference's own
              code, run by experiments/torch_reference_data.py on the same files, and the yardstick of the
              "x reference" column; in this process it runs with our numpy fbank (equal to ASTFeatureExtractor's
              output) instead of torchaudio's
  reference example
              the reference's whole pre-training example: the above plus its waveform augmentation (librosa's time
              stretch included) and the JPEG frame decoded, resized and augmented (its torchvision transform in
              the pinned venv, our PIL equivalents here)
  ours        the same audio work with our loader (one soxr resampling step instead of two)
  decoding    our image decode + resize and audio decode + resample alone: precompute cannot be faster
  precompute  once: decode, resample, fbank, float16, raw image, ArrayRecord write: one process on one thread,
              one process on --threads threads, --workers processes
  read path   every epoch: Grain train pipeline over the shards (record decode, image + feature augmentation,
              prompt, tokenise, batch), in this process on 1 and --threads threads, for two epochs of the clips
              and at least --read_seconds, its shuffle spanning a VGGSound-sized split of the clips repeated
              (see DatasetSized); and with the augmentation
              left to the train step (`augment_on='device'`), whose cost on this machine's JAX device is printed
Every path but the read path runs over the clips repeated: as many passes as make the fastest of them last about
`--pass_seconds` (1 s). It prints clips/s for each beside the reference's, then the feed a Base step needs on a
v5e-8 host at 45 % MFU (from its FLOP count) and how many read-path processes reach it. BLAS is pinned to one
thread per process for every path (fair on small machines). This process restarts once with precompute's malloc
(glibc keeping freed memory, `host_memory`); the pinned reference runs without it, as its users start it.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import soundfile  # noqa: E402
from PIL import Image  # noqa: E402

from data_pipelines import audio_io, augment  # noqa: E402
from data_pipelines import manifest as manifest_lib  # noqa: E402
from data_pipelines import precompute  # noqa: E402
from synergy_jax import audio, augmentation, cli, errors, host_memory  # noqa: E402

READ_PATH_INDEX_SPACE = 200_000  # records the read path's shuffle spans (a VGGSound-sized split; see DatasetSized)
PINNED_REFERENCE_SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "torch_reference_data.py"


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
        Image.fromarray(video_frame(rng)).save(folder / f"{i}.jpg", quality=90)
        rows.append({"img_path": f"{i}.jpg", "wav_path": f"{i}.wav", "label": "tone, beep", "caption": "A tone."})
    path = folder / "bench.csv"
    manifest_lib.write_manifest(path, rows)
    return path


def video_frame(rng: np.random.Generator, height: int = 360, width: int = 640) -> np.ndarray:
    """A (height, width, 3) uint8 frame with a video frame's detail: a smooth random scene (a few gradients and
    waves per channel) plus sensor noise of 6 levels. Its JPEG at quality 90 takes about 2.5 bits a pixel, as natural
    frames do (70 KB here); white noise took 5.6 (160 KB) and twice the decoding time of a real frame."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = []
    for _ in range(3):
        scene = rng.uniform(60, 190) + rng.uniform(-60, 60) * x + rng.uniform(-60, 60) * y
        for _ in range(4):
            frequency, phase = rng.uniform(2, 40, 2), rng.uniform(0, 2 * np.pi)
            scene = scene + rng.uniform(5, 30) * np.sin(2 * np.pi * (frequency[0] * x + frequency[1] * y) + phase)
        channels.append(scene)
    frame = np.stack(channels, axis=-1) + rng.normal(0, 6, (height, width, 3))
    return np.clip(frame, 0, 255).astype(np.uint8)


def reference_audio_path(path: str) -> np.ndarray:
    import librosa

    wave, rate = librosa.load(path)  # 22.05 kHz mono, soxr_hq
    wave = librosa.resample(wave, orig_sr=rate, target_sr=16_000)
    return audio.ast_features(wave)


def reference_training_example(row, rng: np.random.Generator) -> None:
    """What the reference's Dataset computes for one pre-training example, every epoch (docs/reference.md R2.2,
    R2.3): the audio path above with its waveform augmentation, and the image decoded and augmented. The image
    ops are ours, which are the PIL algorithms torchvision's run on a PIL image; the caption's tokenisation is
    left out, so this is a lower bound on the reference's cost."""
    with Image.open(row.image_path) as image:
        image = image.convert("RGB")
    augment.to_normalized_array(augment.augment_image(image, 224, rng))
    import librosa

    wave, rate = librosa.load(row.audio_path)
    wave = librosa.resample(wave, orig_sr=rate, target_sr=16_000)
    audio.ast_features(reference_waveform_augment(wave, rng))


def reference_waveform_augment(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The reference's `audio_augment`: noise, circular shift, time stretch, polarity, shuffled, each at p 0.2."""
    import librosa

    ops = (lambda x: x + augmentation.NOISE_STD * rng.standard_normal(x.size).astype(np.float32),
           lambda x: np.roll(x, int(augmentation.SHIFT_FRACTION * x.size)),
           lambda x: librosa.effects.time_stretch(x, rate=augmentation.STRETCH_RATE),
           lambda x: -x)  # fmt: skip
    for op in rng.permutation(len(ops)):
        if rng.random() < augmentation.AUDIO_P:
            wave = ops[op](wave)
    return wave


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:8.1f} clips/s  ({seconds:6.2f} s for {count})"


def _timed(function, *args, **kwargs) -> float:
    start = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - start


def passes_needed(rows, threads: int, seconds: float) -> int:
    """Passes over the clips that make the fastest path (our audio path on `threads` threads) take about
    `seconds`. One pass over a few dozen clips is over in 0.1-0.5 s for our paths and precompute, a window in which
    thread start-up and first touches of memory move the rate by up to 50 % from run to run (docs/performance.md).
    The pass is timed twice unless the first already lasts `seconds`, and the faster counts: the first pays the
    first touches."""
    our_audio_path(rows[0])  # first-call caches (filter bank, FFT plans)
    timed_pass = lambda: _timed(_drain, precompute._threaded_map(our_audio_path, rows, threads))  # noqa: E731
    one_pass = timed_pass()
    if one_pass < seconds:
        one_pass = min(one_pass, timed_pass())
    return max(1, math.ceil(seconds / one_pass))


def _drain(results) -> None:
    """Runs an iterable's work, keeping none of its results: holding hundreds of clips' outputs would time the
    first touches of that memory as well."""
    for _ in results:
        pass


def time_per_clip_paths(rows, threads: int) -> dict[str, float]:
    """Seconds, over every row in this process, for: the reference's per-sample audio path, its whole training
    example, our audio decode + fbank (on one thread, and on `threads` as precompute runs it: the per-process
    figure for the same work as the reference's audio path), and our decoding alone (image + audio: what
    precompute cannot go below)."""
    import librosa

    rng = np.random.default_rng(0)
    reference_audio_path(rows[0].audio_path)  # librosa's numba compilation is not part of the per-clip cost
    librosa.effects.time_stretch(np.zeros(16_000, np.float32), rate=augmentation.STRETCH_RATE)
    our_audio_path(rows[0])  # first-call caches (filter bank, FFT plans)
    timings = {
        "reference": _timed(_drain, (reference_audio_path(row.audio_path) for row in rows)),
        "reference example": _timed(_drain, (reference_training_example(row, rng) for row in rows)),
        "ours": _timed(_drain, (our_audio_path(row) for row in rows)),
        "ours, threads": _timed(_drain, precompute._threaded_map(our_audio_path, rows, threads)),
        "decoding": _timed(_drain, ((precompute.load_image(row.image_path, 224), audio_io.load_audio(row.audio_path))
                                    for row in rows)),  # fmt: skip
    }
    for path, seconds in timings.items():
        print(f"per clip, {path}: {_rate(len(rows), seconds)}")
    return timings


def our_audio_path(row) -> np.ndarray:
    """Precompute's audio work for one row: decode, mix down, resample, fbank, pad and normalise."""
    return audio.ast_features(audio_io.load_audio(row.audio_path))


def time_precompute(subset: Path, rows, work: Path, workers: int, threads: int,
                    compression: str = "none") -> dict[str, float]:
    """Seconds to precompute the subset: one process on one thread, one process on `threads` threads, and
    `workers` processes (start-up included), writing `compression` shards. The first run's shards stay for the read
    path (their records are the clips' repeated; a record costs the read path the same wherever it sits); the
    others are deleted once timed."""
    timings = {}
    precompute.process_row(rows[0], precompute.PrecomputeConfig())  # warm the first-call caches
    runs = (("1 process, 1 thread", dict(workers=0, threads=1)),
            (f"1 process, {threads} threads", dict(workers=0, threads=threads)),
            (f"{workers} worker processes (+ start-up)", dict(workers=workers)))  # fmt: skip
    for run, (label, options) in enumerate(runs):
        out = work / ("shards" if run == 0 else f"out-{run}")
        timings[label] = _timed(precompute.precompute, subset, out, precompute.PrecomputeConfig(), **options,
                                progress=False, compression=compression)  # fmt: skip
        print(f"precompute once (audio + image + write), {label}: {_rate(len(rows), timings[label])}")
        if run > 0:
            shutil.rmtree(out)
    return timings


def time_read_path(work: Path, rows, threads: int, augment_on: str, min_seconds: float) -> float:
    """Clips/s of the Grain training pipeline over the first precompute's shards, in this process, read for two
    epochs of the clips and at least `min_seconds`; with `augment_on='device'` the examples leave the host
    unaugmented (the train step augments them)."""
    import grain  # 2 s to import: not in the precompute workers, which import this module again

    from data_pipelines import pipeline
    from data_pipelines.demo import train_tokenizer

    train_tokenizer([row.caption for row in rows] * 5 + ["a video of a tone"], work / "tokenizer", vocab_size=300)
    config = pipeline.PipelineConfig(data_dir=str(work / "shards"), split="subset", batch_size=min(8, len(rows)),
                                     train=True, tokenizer=str(work / "tokenizer"), text_mode="prompt",
                                     read_threads=threads, process_index=0, process_count=1,
                                     augment_on=augment_on)  # fmt: skip
    records = grain.sources.ArrayRecordDataSource(precompute.shard_paths(config.data_dir, precompute.load_metadata(
        config.data_dir, config.split)))  # fmt: skip
    iterator = iter(pipeline.build_dataset(config, source=DatasetSized(records, READ_PATH_INDEX_SPACE)))
    next(iterator)
    batches, seconds = _read_for(iterator, max(4, 2 * len(rows) // config.batch_size), min_seconds)
    examples = batches * config.batch_size
    print(f"read path per epoch (Grain: decode + augment on the {augment_on} + tokenise), 1 process, {threads} "
          f"thread(s): {_rate(examples, seconds)}")
    return examples / seconds


def _read_for(iterator, batches: int, min_seconds: float) -> tuple[int, float]:
    """Takes at least `batches` batches from `iterator`, and more until `min_seconds` have passed: two epochs of
    the benchmark's few clips are too short a window for a steady rate when the device augments
    (docs/performance.md). Returns the batches taken and the seconds they took."""
    start, taken = time.perf_counter(), 0
    while taken < batches or time.perf_counter() - start < min_seconds:
        next(iterator)
        taken += 1
    return taken, time.perf_counter() - start


class DatasetSized:
    """`records` seen as a dataset of `length` records (record i is records[i % len(records)]): Grain's index
    shuffle costs about 1.2 ms an element over 24 records and 5 us over 200,000, so the read path over a
    benchmark's few dozen clips would time that rather than what a real dataset costs."""

    def __init__(self, records, length: int):
        self.records, self.length = records, max(length, len(records))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.records[index % len(self.records)]


def time_device_augmentation(batch_size: int = 8) -> float:
    """Seconds per example of the train step's augmentation (`device_augment.augment_batch`) on JAX's default
    device here, at 224 px and 1024 x 128 features: what `augment_on='device'` moves onto the accelerator."""
    import jax

    from synergy_jax import device_augment, parallel

    rng = np.random.default_rng(0)
    fbank = audio.FbankConfig()
    batch = {"image": rng.integers(0, 256, (batch_size, 224, 224, 3), dtype=np.uint8),
             "audio": rng.normal(size=(batch_size, fbank.max_frames, fbank.num_mel_bins)).astype(np.float16),
             "audio_frames": np.full(batch_size, 998, np.int32),
             "augment_seed": rng.integers(0, 2**32, (batch_size, 2), dtype=np.uint32)}  # fmt: skip
    augment = parallel.shared_jit(device_augment.augment_batch, jax.default_backend(), ("config",))
    jax.block_until_ready(augment(batch, config=fbank))
    seconds = min(_timed(lambda: jax.block_until_ready(augment(batch, config=fbank))) for _ in range(3))
    print(f"the step's augmentation on this machine's {jax.default_backend()}: {1e3 * seconds / batch_size:.1f} ms "
          f"an example (batch of {batch_size})")
    return seconds / batch_size


def feed_needed(mfu: float, chip_tflops: float, chips: int) -> float:
    """Samples/s a host must feed a Base step (bf16, no remat) running at `mfu` on `chips` chips: the FLOP count
    of one sample's forward + backward (3 x forward; synergy_jax/flops.py) against the chips' peak."""
    from synergy_jax import flops
    from synergy_jax.models import synergy

    per_sample = flops.train_flops_per_sample(synergy.preset_config("base").forward_flops(), remat=False)
    return mfu * chip_tflops * 1e12 * chips / per_sample


def time_pinned_reference(python: str, subset: Path, count: int) -> dict:
    """Seconds of the reference's own audio path and whole example over the subset's rows, timed by
    experiments/torch_reference_data.py under `python` (a venv with the reference's pinned packages); `count`:
    the subset's rows, which it must have timed."""
    command = [python, str(PINNED_REFERENCE_SCRIPT), f"--manifest={subset}"]
    rerun = f"run `{python} {PINNED_REFERENCE_SCRIPT} --manifest=<a manifest CSV>` to see its output"
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False,
                                env=host_memory.as_shipped(os.environ))  # fmt: skip
    except OSError as error:
        raise errors.SetupError(f"--reference_python={python} cannot be run ({error}); give the python of a venv "
                                f"made as experiments/torch_reference_data.py's docstring says") from error
    if result.returncode != 0:
        last = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "no message")
        raise errors.SetupError(f"the reference's input path failed under --reference_python={python} (exit "
                                f"{result.returncode}: {last.strip()}); {rerun}")
    try:
        timed = json.loads(result.stdout.strip().splitlines()[-1])
        seconds, rows = timed["seconds"], timed["rows"]
        audio_seconds, example_seconds = float(seconds["audio"]), float(seconds["example"])
    except (IndexError, ValueError, KeyError, TypeError):
        raise errors.SetupError(f"--reference_python={python} did not print the timings' JSON; {rerun}") from None
    if rows != count:
        raise errors.SetupError(f"the reference's input path timed {rows} rows of {count}; {rerun}")
    versions = ", ".join(f"{name} {version}" for name, version in timed.get("versions", {}).items())
    print(f"the reference's own input path ({versions}): audio {_rate(rows, audio_seconds)}; "
          f"whole example {_rate(rows, example_seconds)}")
    return {"audio": audio_seconds, "example": example_seconds}


def report(count: int, seconds: dict[str, float], timings: dict[str, float], reads: dict[tuple[str, int], float],
           pinned: dict[str, float] | None, augmenting: float | None, threads: int) -> None:
    """The table: every path's clips/s and its ratio to the reference's per-sample audio path, which is the
    pinned reference's own run when there is one."""
    reference = pinned["audio"] if pinned else seconds["reference"]
    print(f"\n{'path':64s} {'clips/s':>9s} {'x reference':>12s}")
    lines = [("reference per-sample audio, its pinned venv (torchaudio fbank)", pinned["audio"])] if pinned else []
    lines += [("reference per-sample audio (librosa, our fbank), 1 process", seconds["reference"]),
              ("our audio decode + fbank, 1 thread", seconds["ours"]),
              (f"our audio decode + fbank, 1 process, {threads} threads (precompute's pool)", seconds["ours, threads"]),
              ("decoding alone (image + audio: precompute's floor), 1 thread", seconds["decoding"])]  # fmt: skip
    lines += [(f"precompute (audio + image), {label}", value) for label, value in timings.items()]
    for label, value in lines:
        print(f"{label:64s} {count / value:9.1f} {reference / value:12.2f}")
    for (augment_on, threads), rate in reads.items():
        label = f"read path, 1 process, {threads} thread(s), augmentation on the {augment_on}"
        print(f"{label:64s} {rate:9.1f} {rate * reference / count:12.2f}")
    examples = {"its pinned venv": pinned["example"]} if pinned else {}
    examples["this process, our image ops and fbank"] = seconds["reference example"]
    best = {on: max(rate for (mode, _), rate in reads.items() if mode == on) for on, _ in reads}
    for where, example in examples.items():
        print(f"The reference's whole training example (+ waveform augmentation, image decode + augmentation; "
              f"{where}) runs at {count / example:.1f} examples/s; the read path is "
              + ", ".join(f"{rate * example / count:.2f}x that augmenting on the {on}" for on, rate in best.items()))
    needed = feed_needed(0.45, 197.0, 8)
    print(f"A Base step at 45 % MFU on a v5e-8 host (8 x 197 bf16 TFLOP/s) takes {needed:.0f} samples/s: "
          + ", ".join(f"{math.ceil(needed / rate)} read-path processes at {rate:.0f} clips/s each augmenting on the "
                      f"{on}" for on, rate in best.items())
          + f" (pipeline.PipelineConfig.workers); this machine has {os.cpu_count()} cores.")
    if augmenting is not None:
        print(f"Augmenting on the device moves {1e3 * augmenting:.1f} ms an example into the step on this machine's "
              "default JAX device (on an accelerator, unmeasured here, it runs inside the step's program).")


def benchmark(options) -> None:
    """Generates (or reads) the clips, times every path on them and prints the table."""
    work = Path(tempfile.mkdtemp(prefix="bench_precompute_"))
    try:
        manifest = Path(options.manifest) if options.manifest else make_clips(work, options.clips, options.seconds,
                                                                             options.rate)  # fmt: skip
        rows, _ = manifest_lib.read_manifest(manifest)
        rows = rows[: options.limit] if options.limit else rows
        passes = passes_needed(rows, options.threads, options.pass_seconds)
        timed = rows * passes
        subset = work / "subset.csv"
        manifest_lib.write_manifest(subset, [{"img_path": r.image_path, "wav_path": r.audio_path, "label": r.label,
                                              "caption": r.caption} for r in timed])  # fmt: skip
        print(f"{len(rows)} clips from {manifest}, {passes} passes over them ({len(timed)} rows) for every path but "
              f"the read path; this process's malloc: {host_memory.describe()}; shards: {options.compression}")
        pinned = None
        if options.reference_python:
            pinned = time_pinned_reference(options.reference_python, subset, len(timed))
        seconds = time_per_clip_paths(timed, options.threads)
        timings = time_precompute(subset, timed, work, options.workers, options.threads, options.compression)
        reads = {(on, threads): time_read_path(work, rows, threads, on, options.read_seconds)
                 for on in ("host", "device") for threads in sorted({1, options.threads})}  # fmt: skip
        report(len(timed), seconds, timings, reads, pinned, time_device_augmentation(), options.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv) -> None:
    from absl import flags

    cli.refuse_positional(argv)
    cli.exit_on_setup_error(benchmark, flags.FLAGS)


if __name__ == "__main__":
    from absl import app, flags

    host_memory.use_fast_malloc(default=precompute.MALLOC)

    flags.DEFINE_string("manifest", None, "Benchmark on this manifest's files instead of generated clips.")
    flags.DEFINE_integer("limit", 0, "Use at most this many rows (0: all).")
    flags.DEFINE_integer("clips", 48, "Generated clips.")
    flags.DEFINE_float("seconds", 10.0, "Generated clip length.")
    flags.DEFINE_integer("rate", 44_100, "Generated clips' sample rate.")
    flags.DEFINE_integer("workers", 2, "Precompute worker processes.")
    flags.DEFINE_integer("threads", 2, "Threads of one precompute process, and Grain read threads.")
    flags.DEFINE_float("pass_seconds", 1.0, "Repeat the clips until the fastest per-clip path takes about this "
                       "long over them; every path but the read path times those passes.", lower_bound=0.0)
    flags.DEFINE_float("read_seconds", 3.0, "Time each read-path row over at least this many seconds.",
                       lower_bound=0.0)
    flags.DEFINE_enum("compression", "none", list(precompute.WRITER_OPTIONS), "Precompute's shard compression.")
    flags.DEFINE_string("reference_python", None, "Python of a venv with the reference's pinned packages: time its "
                        "own input path (experiments/torch_reference_data.py) and use it as the yardstick.")
    app.run(main, flags_parser=cli.parse_flags_or_exit)
