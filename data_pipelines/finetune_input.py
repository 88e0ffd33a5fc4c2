"""Grain input pipelines for fine-tuning: image, audio and text-pair classification (docs/reference.md R5).

    train: positions 0..n-1 of `indices` -> shuffle (seeded, reshuffled every epoch) -> repeat forever -> decode +
           augment + features, seeded per global position -> this process's rows of every global batch -> batch
    eval:  this process's positions (p, p + P, ...) -> padded to whole batches -> decode + features, never augmented
           -> batch with `valid` and `row_id`

`batch_size` is the batch *per process*, as `pipeline.PipelineConfig.batch_size`: the global batch is
`batch_size * process_count`. In training, the data order and every augmentation draw depend only on the seed and
the global position, so process p's rows of global batch b are the same whatever the process count (the processes'
batches concatenated in process order are the one-process batch of the same global size), and an iterator state
resumes on any process count with the same global batch. Evaluation slices as `pipeline.build_dataset`'s eval path
(positions p::P, padded with `parallel.padded_length`).

A batch is a dict of numpy arrays:
    image           float32 (B, S, S, 3)       NHWC, normalised (CLIP mean/std, or the reference's per dataset)
    audio           float32 (B, frames, mel)   AST features of the (augmented) 16 kHz waveform
    input_ids       int32   (B, max_length)    text pair, padded to max_length and truncated
    attention_mask  int32   (B, max_length)
    label           int32   (B,)               float32 for regression sets (STS-B); 0 on invalid eval rows
    valid           bool    (B,)               eval only: False on padding and on unreadable examples
    row_id          int64   (B,)               eval only: position in `indices`; -1 on padding

Image transforms (docs/reference.md R5.1, the reference's `FT_image_task.py`): Resize((S, S)) ->
RandomChoice[HorizontalFlip p_h, VerticalFlip p_v] -> RandomApply(ColorJitter(s, s, s, s), p_j) -> [0, 1] ->
normalise; eval: Resize -> [0, 1] -> normalise. p_h / p_v / s / p_j per dataset (`IMAGE_PRESETS`, chosen by
`config.dataset`; other datasets get 'standard'). No random crop, unlike pre-training (R2.2). Normalization 'clip'
(default) uses CLIP mean/std for every dataset, train and eval; 'reference' restores the reference's per-dataset
statistics, including Pets' train/eval mismatch (bug 41).

Audio: the reference's waveform `audio_augment` with the fine-tuning values (R5.2, R2.3, `utils.py`), see
`augment_waveform`; then `audio.ast_features`. The reference's stretch "rate 0.15" made every stretched clip 6.7x
longer, so the 1024-frame AST input only saw its first ~1.5 s (bug 43); here the rate is drawn from [0.85, 1.15]
(`WaveformAugment.reference_stretch=True` restores the fixed 0.15).

Unreadable examples (a corrupt or missing file): decoding is caught per example, reported once per example (a
logging warning naming the example and the error), and remembered, so later epochs do not decode it again.
Training substitutes another example drawn with the element's own rng (deterministic, resumable; its label comes
with it), so batches keep their size and no step count shifts. Evaluation never substitutes: the row is a blank
input with `valid=False` and its real `row_id` (>= 0, unlike padding), and `EvalInput.unreadable` lists them, so
the job can report them instead of silently scoring on fewer examples. More than `max_unreadable` (a fraction of
`indices`) unreadable examples stop the input with a DatasetError: a wrong folder must not train on 3 files.
Why not filter at setup: that decodes every file once more before step 0 (minutes for audio) and needs the
processes to agree on the result; why not skip in the map: batches would change size and positions would shift.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from data_pipelines import augment
from data_pipelines.downstream import DatasetError
from synergy_jax import audio, augmentation, parallel, text

log = logging.getLogger(__name__)

MODALITIES = ("image", "audio", "text")
NORMALIZATIONS = ("clip", "reference")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
CLIP = (tuple(augmentation.CLIP_MEAN.tolist()), tuple(augmentation.CLIP_STD.tolist()))  # pre-training's own
SUBSTITUTE_TRIES = 16  # training draws at most this many replacements for an unreadable example


@dataclasses.dataclass(frozen=True)
class ImagePreset:
    """One dataset's fine-tuning image transform in the reference, and its (mean, std) for train and eval."""

    hflip_p: float = augmentation.HFLIP_P
    vflip_p: float = augmentation.VFLIP_P
    jitter: float = augmentation.JITTER
    jitter_p: float = augmentation.JITTER_P
    train_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # None: no reference normalisation
    eval_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None


# `FT_image_task.py` get_FT_set (docs/reference.md R5.1, bug 41): CIFAR 0.5 / 0.5; Flowers CIFAR-100-like stats;
# Pets trains on CLIP stats and evaluates on ImageNet stats; ImageNet weaker jitter applied less often.
_FLOWERS = ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276))
_IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
IMAGE_PRESETS = {
    "standard": ImagePreset(),  # R2.2's flip/jitter values without the crop; no reference normalisation
    "cifar10": ImagePreset(train_stats=(HALF, HALF), eval_stats=(HALF, HALF)),
    "cifar100": ImagePreset(train_stats=(HALF, HALF), eval_stats=(HALF, HALF)),
    "flowers102": ImagePreset(0.25, 0.05, 0.05, 0.25, train_stats=_FLOWERS, eval_stats=_FLOWERS),
    "pets": ImagePreset(train_stats=CLIP, eval_stats=_IMAGENET),
    "imagenet": ImagePreset(jitter=0.05, jitter_p=0.33, train_stats=_IMAGENET, eval_stats=_IMAGENET),
}
PRESET_ALIASES = {"oxford_flowers102": "flowers102", "oxford_iiit_pet": "pets", "imagenet2012": "imagenet"}


def image_preset(dataset: str) -> tuple[str, ImagePreset]:
    """(preset name, preset) of a dataset name: ours ('cifar10'), TFDS's ('oxford_iiit_pet') or the reference's
    ('CIFAR-10', 'Flowers-102'); any other dataset (a folder, the demo) gets 'standard'."""
    key = dataset.lower().replace("-", "")
    key = PRESET_ALIASES.get(key, key)
    return (key, IMAGE_PRESETS[key]) if key in IMAGE_PRESETS else ("standard", IMAGE_PRESETS["standard"])


@dataclasses.dataclass(frozen=True)
class WaveformAugment:
    """The reference's `audio_augment` arguments; defaults are the fine-tuning scripts' (R5.2, bug 43)."""

    noise_std: float = 0.001  # x + noise_std N(0, 1)
    shift_fraction: float = 0.1  # circular shift by int(len * fraction) samples
    stretch_rate: float = 0.15  # the stretch: a rate drawn from [1 - s, 1 + s] (> 1 faster, < 1 slower)
    p: float = 0.333  # each of the four operations, in a random order
    # True: the reference's fixed librosa rate = stretch_rate (0.15: every stretched clip 6.7x longer, so only its
    # first ~15 % survives the frame cut; bug 43). The default reads the rate as the +-15 % it was meant to be.
    reference_stretch: bool = False


@dataclasses.dataclass(frozen=True)
class FinetuneInputConfig:
    """What a fine-tuning input does; sizes and presets as the reference per dataset (R5.1-R5.3)."""

    modality: str  # 'image' | 'audio' | 'text'
    image_size: int = 224
    fbank: audio.FbankConfig | None = dataclasses.field(default_factory=audio.FbankConfig)  # audio only
    max_length: int = 128  # GLUE: 64 (CoLA), 96 (SST-2), 128, 160 (MNLI, QNLI); R5.3
    dataset: str = ""  # picks the image preset (`image_preset`); '' or an unknown name: 'standard'
    normalization: str = "clip"  # 'reference': the preset's per-dataset statistics (bug 41)
    augment: bool = True  # training only; evaluation never augments
    waveform_augment: WaveformAugment = dataclasses.field(default_factory=WaveformAugment)
    seed: int = 0
    read_threads: int = 4
    prefetch: int = 8  # batches buffered ahead (at least read_threads)
    max_unreadable: float = 0.01  # fraction of `indices` that may be unreadable before the input stops

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.modality == "audio" and self.fbank is None:
            raise ValueError("an audio input needs fbank (the tower's audio.FbankConfig)")
        if self.modality == "image" and self.normalization == "reference" and self.preset.train_stats is None:
            raise ValueError(f"dataset {self.dataset!r} has no reference normalization; the reference fine-tuned "
                             f"{sorted(k for k, v in IMAGE_PRESETS.items() if v.train_stats)}")  # fmt: skip

    @property
    def preset(self) -> ImagePreset:
        return image_preset(self.dataset)[1]

    def image_stats(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) float32 of the train or eval images under this config's normalization."""
        stats = CLIP
        if self.normalization == "reference":
            stats = self.preset.train_stats if train else self.preset.eval_stats
        return np.asarray(stats[0], np.float32), np.asarray(stats[1], np.float32)


# ----------------------------------------------------------------------------------------------- image


def finetune_image(image: Image.Image, size: int, preset: ImagePreset, rng: np.random.Generator) -> Image.Image:
    """The reference's fine-tuning train transform up to ToTensor: resize, one flip choice, maybe jitter (R5.1)."""
    image = augment.resize(image, size)
    if rng.random() < 0.5:  # RandomChoice picks one flip uniformly; it then fires with its own p
        if rng.random() < preset.hflip_p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif rng.random() < preset.vflip_p:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if rng.random() < preset.jitter_p:
        image = augment.color_jitter(image, rng, preset.jitter)
    return image


def normalize(image: Image.Image, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """ToTensor + Normalize(mean, std), channels-last: (H, W, 3) float32."""
    return (np.asarray(image, np.float32) / 255.0 - mean) / std


# ----------------------------------------------------------------------------------------------- audio

STFT_FFT, STFT_HOP = 2048, 512  # librosa.effects.time_stretch's defaults (stft n_fft, hop n_fft // 4)


def _hann(n: int) -> np.ndarray:
    """scipy.signal.get_window('hann', n, fftbins=True): the periodic Hann window librosa uses."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)


def _stft(y: np.ndarray) -> np.ndarray:
    """librosa.stft(y) with its defaults (centred frames, zero padding), as (frames, bins) complex64 like librosa's
    for a float32 signal (computed in float64, stored in complex64)."""
    padded = np.pad(y.astype(np.float64), STFT_FFT // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, STFT_FFT)[::STFT_HOP]
    return np.fft.rfft(frames * _hann(STFT_FFT), axis=1).astype(np.complex64)


def _phase_vocoder(spec: np.ndarray, rate: float) -> np.ndarray:
    """librosa.phase_vocoder on (frames, bins): magnitudes interpolated at steps of `rate` frames, phase advanced
    by each frame pair's measured instantaneous frequency. Angles and phase increments are computed once per input
    frame (they depend on the frame pair only); the running phase is accumulated in float32 as librosa does (its
    rounding is audible in the result: float64 accumulation differs by ~10 % on a stretched 5 s clip)."""
    steps = np.arange(0, spec.shape[0], rate, dtype=np.float64)
    padded = np.concatenate([spec, np.zeros((2, spec.shape[1]), spec.dtype)])
    angles, magnitudes = np.angle(padded), np.abs(padded)
    lower = steps.astype(np.int64)
    alpha = np.mod(steps, 1.0)[:, None]
    magnitude = (1.0 - alpha) * magnitudes[lower] + alpha * magnitudes[lower + 1]
    advance = STFT_HOP * 2 * np.pi * np.arange(spec.shape[1]) / STFT_FFT
    dphase = angles[1:] - angles[:-1] - advance
    dphase -= 2.0 * np.pi * np.round(dphase / (2.0 * np.pi))
    increments = (advance + dphase)[lower]
    phase = np.empty((len(steps), spec.shape[1]), np.float32)
    phase[0] = angles[0]
    for t in range(1, len(steps)):
        phase[t] = phase[t - 1] + increments[t - 1]  # float64 sum stored in float32: librosa's `phase_acc +=`
    return (magnitude * (np.cos(phase) + 1j * np.sin(phase))).astype(np.complex64)


def _istft(spec: np.ndarray, length: int) -> np.ndarray:
    """librosa.istft(spec.T, length=length): overlap-add of windowed frames / the summed squared window."""
    frames = min(spec.shape[0], math.ceil((length + 2 * (STFT_FFT // 2)) / STFT_HOP))
    window = _hann(STFT_FFT)
    chunks = (np.fft.irfft(spec[:frames], n=STFT_FFT, axis=1) * window).reshape(frames, -1, STFT_HOP)
    parts = STFT_FFT // STFT_HOP
    signal = np.zeros((frames + parts - 1, STFT_HOP))
    weight = np.zeros_like(signal)
    for j in range(parts):  # frame k covers hop blocks k .. k + parts - 1
        signal[j : j + frames] += chunks[:, j]
        weight[j : j + frames] += window[j * STFT_HOP : (j + 1) * STFT_HOP] ** 2
    start = STFT_FFT // 2
    signal, weight = signal.reshape(-1)[start : start + length], weight.reshape(-1)[start : start + length]
    nonzero = weight > np.finfo(np.float32).tiny
    signal[nonzero] /= weight[nonzero]
    return np.pad(signal, (0, length - signal.size))


def time_stretch(y: np.ndarray, rate: float) -> np.ndarray:
    """librosa.effects.time_stretch(y, rate=rate) in numpy: round(len / rate) samples, pitch kept (R2.3)."""
    if y.size == 0:
        return y.astype(np.float64)
    return _istft(_phase_vocoder(_stft(y), rate), round(y.size / rate))


def _apply(op: int, y: np.ndarray, rng: np.random.Generator, params: WaveformAugment) -> np.ndarray:
    if op == 0:  # add_white_noise
        return y + params.noise_std * rng.standard_normal(y.size)
    if op == 1:  # shift_data: np.roll by int(len * rate)
        return np.roll(y, int(y.size * params.shift_fraction))
    if op == 2:  # stretch_data
        rate = params.stretch_rate if params.reference_stretch else rng.uniform(1 - params.stretch_rate,
                                                                                 1 + params.stretch_rate)
        return time_stretch(y, rate)
    return -y  # minus_sound (no effect on fbank features: the power spectrum is sign-blind)


def augment_waveform(y: np.ndarray, rng: np.random.Generator, params: WaveformAugment | None = None) -> np.ndarray:
    """The reference's `utils.audio_augment` (R2.3 step 3 with R5.2's values): the four operations (white noise,
    circular shift, phase-vocoder time stretch, polarity inversion) in a random order, each applied with
    probability p; seeded by `rng` instead of the global `random`/`np.random` state. float32 out."""
    params = params or WaveformAugment()
    y = np.asarray(y, np.float64)
    for op in rng.permutation(4):
        if rng.random() < params.p:
            y = _apply(int(op), y, rng, params)
    return y.astype(np.float32)


# ----------------------------------------------------------------------------------------------- text


def tokenize_pair(tokenizer, text_a: str, text_b: str | None, max_length: int) -> dict[str, np.ndarray]:
    """One (sentence, sentence | None) example as the reference's GLUE preprocessing (R5.3):
    `tokenizer(a, b, truncation=True, max_length=L, padding='max_length')`; int32 (L,) ids and mask."""
    encoded = text.tokenize(tokenizer, [text_a], max_length, None if text_b is None else [text_b])
    return {key: value[0] for key, value in encoded.items()}


# ----------------------------------------------------------------------------------------------- examples


class Unreadable:
    """Thread-safe record of the examples that failed to decode: each is logged once, and too many stop the run."""

    def __init__(self, set_name: str, limit: int):
        self.set_name = set_name
        self.limit = limit
        self.errors: dict[int, str] = {}
        self._lock = threading.Lock()

    def __contains__(self, index: int) -> bool:
        return index in self.errors

    def add(self, index: int, error: Exception) -> None:
        with self._lock:
            if index in self.errors:
                return
            self.errors[index] = f"{type(error).__name__}: {error}"
            count = len(self.errors)
        log.warning("%s: example %d is unreadable and is left out (%s); %d unreadable so far",
                    self.set_name, index, self.errors[index], count)  # fmt: skip
        if count > self.limit:
            shown = "; ".join(f"{i}: {e}" for i, e in list(self.errors.items())[:3])
            raise DatasetError(f"{self.set_name}: {count} unreadable examples, more than the {self.limit} allowed "
                               f"(max_unreadable): {shown}") from error  # fmt: skip


class ExampleReader:
    """Decodes example `index` of a set and turns it into model inputs (modality-specific, see module docstring)."""

    def __init__(self, examples_set, indices: np.ndarray, config: FinetuneInputConfig, tokenizer=None):
        self.set = examples_set
        self.config = config
        self.tokenizer = tokenizer
        labels = np.asarray(examples_set.labels)
        self.labels = labels.astype(np.float32 if np.issubdtype(labels.dtype, np.floating) else np.int32)
        name = getattr(examples_set, "name", type(examples_set).__name__)
        self.unreadable = Unreadable(str(name), max(1, math.floor(config.max_unreadable * len(indices))))
        if config.modality == "image":  # per config, not per example
            self.preset = config.preset
            self.stats = {train: config.image_stats(train=train) for train in (True, False)}

    def decode(self, index: int) -> Any | None:
        """The raw example (PIL image, waveform or text pair), or None when it cannot be read (recorded)."""
        if self.config.modality == "text":
            text_b = self.set.text_b
            return self.set.text_a[index], None if text_b is None else text_b[index]
        if index in self.unreadable:
            return None
        try:
            return self.set.examples[index]
        except Exception as error:  # noqa: BLE001 - any decoder failure; Unreadable stops the run past the limit
            self.unreadable.add(index, error)
            return None

    def inputs(self, raw, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        """Model inputs of a decoded example; `rng` None = evaluation (no augmentation)."""
        config = self.config
        augments = rng is not None and config.augment
        if config.modality == "image":
            if augments:
                image = finetune_image(raw, config.image_size, self.preset, rng)
            else:
                image = augment.resize(raw, config.image_size)
            return {"image": normalize(image, *self.stats[rng is not None])}
        if config.modality == "audio":
            wave = augment_waveform(raw, rng, config.waveform_augment) if augments else raw
            return {"audio": audio.ast_features(np.asarray(wave, np.float32), config.fbank)}
        return tokenize_pair(self.tokenizer, raw[0], raw[1], config.max_length)

    def blank(self) -> dict[str, np.ndarray]:
        """Inputs of an eval row without an example (padding, unreadable): cheap, finite, never decoded."""
        config = self.config
        if config.modality == "image":
            return {"image": np.zeros((config.image_size, config.image_size, 3), np.float32)}
        if config.modality == "audio":
            return {"audio": audio.ast_features(np.zeros(0, np.float32), config.fbank)}
        return tokenize_pair(self.tokenizer, "", None, config.max_length)


class TrainTransform:
    """Position in `indices` (+ Grain's per-element rng) -> one augmented training example with its label."""

    def __init__(self, reader: ExampleReader, indices: np.ndarray):
        self.reader = reader
        self.indices = indices

    def __call__(self, position: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        index = int(self.indices[position])
        raw = self.reader.decode(index)
        for _ in range(SUBSTITUTE_TRIES):  # an unreadable example: another one, drawn with this element's rng
            if raw is not None:
                break
            index = int(self.indices[rng.integers(len(self.indices))])
            raw = self.reader.decode(index)
        if raw is None:
            raise DatasetError(f"{self.reader.unreadable.set_name}: {SUBSTITUTE_TRIES} unreadable examples in a row")
        return {**self.reader.inputs(raw, rng), "label": self.reader.labels[index]}


class EvalTransform:
    """Position in `indices` (-1: padding) -> one unaugmented example with `valid`, `row_id` and its label.

    Invalid rows get label 0, a real class id, not -1: a gather at -1 (jnp.take_along_axis fills NaN) would make
    the masked per-row loss NaN, and NaN * 0 stays NaN.
    """

    def __init__(self, reader: ExampleReader, indices: np.ndarray):
        self.reader = reader
        self.indices = indices
        self._blank = None

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        position = int(position)
        raw = self.reader.decode(int(self.indices[position])) if position >= 0 else None
        if raw is None:
            if self._blank is None:
                self._blank = self.reader.blank()
            inputs = self._blank
        else:
            inputs = self.reader.inputs(raw, None)
        label = self.reader.labels[self.indices[position]] if raw is not None else self.reader.labels.dtype.type(0)
        return {**inputs, "label": label, "valid": np.bool_(raw is not None), "row_id": np.int64(position)}


# ----------------------------------------------------------------------------------------------- datasets


class ProcessRows(grain.MapDataset):
    """Process p's rows of every global batch of `parent`: rows [p L, (p + 1) L) of each block of G = P L."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._global = global_batch
        self._local = global_batch // process_count
        self._offset = process_index * self._local

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._local

    def __str__(self) -> str:
        return f"ProcessRows(global={self._global}, offset={self._offset}, local={self._local})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._local)
        return self._parent[batch * self._global + self._offset + row]


def _process_slice(process_index: int | None, process_count: int | None, batch_size: int) -> tuple[int, int]:
    """(index, count) of this process (default: JAX's)."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
    if batch_size < 1:
        raise ValueError(f"batch size (per process) must be positive, got {batch_size}")
    return process_index, process_count


def _setup(examples_set, indices, config: FinetuneInputConfig, tokenizer) -> tuple[np.ndarray, ExampleReader]:
    """Checked indices and the example reader; a text input needs a tokenizer (object or hub id / folder)."""
    modality = getattr(examples_set, "modality", "text")
    if modality != config.modality:
        raise ValueError(f"config.modality is {config.modality!r} but the set holds {modality!r} examples")
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size == 0:
        raise ValueError("no example indices")
    if indices.min() < 0 or indices.max() >= len(examples_set.labels):
        raise ValueError(f"indices outside 0..{len(examples_set.labels) - 1}")
    if config.modality == "text":
        if tokenizer is None:
            raise ValueError("a text input needs a tokenizer")
        tokenizer = text.load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    return indices, ExampleReader(examples_set, indices, config, tokenizer)


def _read_options(config: FinetuneInputConfig) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=config.read_threads,
                             prefetch_buffer_size=max(config.prefetch, config.read_threads))  # fmt: skip


def train_input(examples_set, indices: Sequence[int], config: FinetuneInputConfig, batch_size: int,
                process_index: int | None = None, process_count: int | None = None,
                tokenizer=None) -> grain.DatasetIterator:  # fmt: skip
    """This process's share of endless, shuffled, augmented training batches over `examples_set[indices]`.

    `batch_size` rows per process (global batch: `batch_size * process_count`). A resumable Grain iterator
    (`get_state()` / `set_state()`); batches run across epoch boundaries (reshuffled every epoch), so only the step
    count bounds a run.
    """
    index, count = _process_slice(process_index, process_count, batch_size)
    indices, reader = _setup(examples_set, indices, config, tokenizer)
    if len(indices) < batch_size * count:
        raise ValueError(f"{len(indices)} training examples, fewer than one global batch of {batch_size * count}")
    dataset = grain.MapDataset.range(len(indices)).seed(config.seed).shuffle().repeat(None)
    dataset = dataset.random_map(TrainTransform(reader, indices))  # rng of the global position: count-independent
    dataset = ProcessRows(dataset, batch_size * count, index, count).batch(batch_size, drop_remainder=True)
    return iter(dataset.to_iter_dataset(_read_options(config)))


class EvalInput:
    """Re-iterable eval batches (one pass per `iter`); `len` is the batch count, `unreadable` the positions in
    `indices` found unreadable so far on this process (their rows have valid False and row_id >= 0)."""

    def __init__(self, dataset: grain.IterDataset, batches: int, reader: ExampleReader, indices: np.ndarray):
        self.dataset = dataset
        self.batches = batches
        self.reader = reader
        self.indices = indices

    def __iter__(self):
        return iter(self.dataset)

    def __len__(self) -> int:
        return self.batches

    @property
    def unreadable(self) -> list[int]:
        bad = set(self.reader.unreadable.errors)
        return [position for position, index in enumerate(self.indices) if int(index) in bad]


def eval_input(examples_set, indices: Sequence[int], config: FinetuneInputConfig, batch_size: int,
               process_index: int | None = None, process_count: int | None = None,
               tokenizer=None) -> EvalInput:  # fmt: skip
    """Every position of `indices` exactly once over all processes, unaugmented, in whole batches of `batch_size`
    rows per process, the same number on every process (padding rows: valid False, row_id -1)."""
    index, count = _process_slice(process_index, process_count, batch_size)
    indices, reader = _setup(examples_set, indices, config, tokenizer)
    mine = np.arange(len(indices))[index::count]
    length = parallel.padded_length(len(indices), batch_size, count)
    positions = np.concatenate([mine, np.full(length - len(mine), -1, np.int64)])
    dataset = grain.MapDataset.source(positions).map(EvalTransform(reader, indices)).batch(batch_size)
    return EvalInput(dataset.to_iter_dataset(_read_options(config)), length // batch_size, reader, indices)


# ----------------------------------------------------------------------------------------------- splits


def kfold_indices(folds: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) example indices of fold `k`: evaluate on fold k, train on every other fold (R5.2)."""
    folds = np.asarray(folds).reshape(-1)
    present = sorted(int(f) for f in np.unique(folds))
    if k not in present:
        raise ValueError(f"fold {k} not in the set (folds present: {present})")
    return np.flatnonzero(folds != k), np.flatnonzero(folds == k)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int,
                       regression_bins: int = 5) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(rest, held_out) sorted indices: `fraction` of the examples held out (e.g. to select epochs on instead
    of the evaluation split, bug 42), with every class in proportion. Float labels (regression) are stratified
    by quantile bins. Class shares are rounded by largest remainder, so the total is round(fraction * N)."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels).reshape(-1)
    if np.issubdtype(labels.dtype, np.floating):
        edges = np.quantile(labels, np.linspace(0, 1, regression_bins + 1)[1:-1])
        labels = np.searchsorted(edges, labels, side="right")
    classes, strata = np.unique(labels, return_inverse=True)
    sizes = np.bincount(strata, minlength=len(classes))
    quota = fraction * sizes
    take = np.floor(quota).astype(np.int64)
    extra = round(fraction * len(labels)) - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:max(extra, 0)]] += 1
    rng = np.random.default_rng(seed)
    held = [rng.permutation(np.flatnonzero(strata == c))[: take[c]] for c in range(len(classes))]
    held_out = np.sort(np.concatenate(held)).astype(np.int64)
    if len(held_out) == 0 or len(held_out) == len(labels):
        raise ValueError(f"a {fraction} hold-out of {len(labels)} examples leaves an empty part")
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out
