"""Times the reference's own per-example input path, in the reference's pinned environment.

`python -m data_pipelines.benchmark_precompute --reference_python=.venv-reference/bin/python` runs this script on
the benchmark's files and prints its rates beside ours; it can also run alone:

    python3 -m venv .venv-reference
    .venv-reference/bin/pip install torch==2.0.1 torchaudio==2.0.2 torchvision==0.15.2 transformers==4.39.2 \
        librosa==0.10.0 'numpy<2'
    .venv-reference/bin/python experiments/torch_reference_data.py --manifest=data/train.csv

It needs only those packages (docs/reference.md, first paragraph), not JAX or this project. For every row of the
manifest it runs, on one thread, what the reference's pre-training `Dataset` computes for an example every epoch
(docs/reference.md R2.2-R2.3):
  audio     librosa.load (-> 22.05 kHz mono, soxr_hq), librosa.resample (-> 16 kHz), ASTFeatureExtractor with its
            AST defaults, which runs torchaudio's Kaldi fbank, pads to 1024 frames and normalises;
  example   the JPEG frame through the reference's torchvision train transform (Resize, RandomResizedCrop, one
            flip, ColorJitter at p 0.5, ToTensor, Normalize), and the audio path with `audio_augment` (noise,
            shift, time stretch, polarity; shuffled with Python's random, each at p 0.2) before the extractor.
The caption's tokenisation is left out (the RoBERTa vocabulary is on the hub), so `example` is a lower bound.
Prints one JSON object: the row count, seconds over all rows for each path, and the packages' versions.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def manifest_rows(path: Path, limit: int) -> list[tuple[Path, Path]]:
    """(image, audio) paths of a manifest CSV (columns img_path, wav_path), relative ones against its folder."""
    with path.open(newline="") as handle:
        rows = [(path.parent / row["img_path"], path.parent / row["wav_path"]) for row in csv.DictReader(handle)]
    return rows[:limit] if limit else rows


def reference_image_transform():
    """main_pretraining.py:102-116, used for train, validation and test alike."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize((224, 224)),
        transforms.RandomResizedCrop(224),
        transforms.RandomChoice([transforms.RandomHorizontalFlip(p=0.5), transforms.RandomVerticalFlip(p=0.15)]),
        transforms.RandomApply([transforms.ColorJitter(0.075, 0.075, 0.075, 0.075)], p=0.5),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])  # fmt: skip


def audio_augment(wave, apply_rate=0.2, noise_rate=0.005, shift_rate=0.1, stretch_rate=0.85):
    """utils.py:53-80: the four waveform ops, shuffled with Python's random, each applied at `apply_rate`."""
    import librosa
    import numpy as np

    ops = [lambda x: x + noise_rate * np.random.randn(len(x)),
           lambda x: np.roll(x, int(len(x) * shift_rate)),
           lambda x: librosa.effects.time_stretch(x, rate=stretch_rate),
           lambda x: -x]  # fmt: skip
    random.shuffle(ops)
    for op in ops:
        if random.random() < apply_rate:
            wave = op(wave)
    return wave


def reference_audio(path: Path, extractor, augment: bool):
    """dataset.py:142-149: decode at librosa's default 22.05 kHz, resample to 16 kHz, (augment,) fbank."""
    import librosa

    wave, rate = librosa.load(path)
    wave = librosa.resample(wave, orig_sr=rate, target_sr=16_000)
    if augment:
        wave = audio_augment(wave)
    return extractor(wave, sampling_rate=16_000, return_tensors="pt")["input_values"]


def reference_example(image_path: Path, audio_path: Path, extractor, transform):
    from PIL import Image

    with Image.open(image_path) as image:
        pixels = transform(image.convert("RGB"))
    return pixels, reference_audio(audio_path, extractor, augment=True)


def timed(function, rows) -> float:
    start = time.perf_counter()
    for row in rows:
        function(*row)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, required=True, help="CSV with img_path and wav_path columns.")
    parser.add_argument("--limit", type=int, default=0, help="Use at most this many rows (0: all).")
    args = parser.parse_args()
    import librosa
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    rows = manifest_rows(args.manifest, args.limit)
    extractor = transformers.ASTFeatureExtractor()
    transform = reference_image_transform()
    features = reference_audio(rows[0][1], extractor, augment=False)  # numba compilation, FFT plans
    assert tuple(features.shape) == (1, 1024, 128), features.shape
    for dtype in (np.float32, np.float64):  # numba compiles per dtype; the noise op makes the waveform float64
        librosa.effects.time_stretch(np.zeros(16_000, dtype), rate=0.85)
    seconds = {
        "audio": timed(lambda image, audio: reference_audio(audio, extractor, augment=False), rows),
        "example": timed(lambda image, audio: reference_example(image, audio, extractor, transform), rows),
    }
    versions = {name: module.__version__ for name, module in
                (("torch", torch), ("transformers", transformers), ("librosa", librosa))}  # fmt: skip
    print(json.dumps({"rows": len(rows), "seconds": seconds, "versions": versions}))


if __name__ == "__main__":
    main()
