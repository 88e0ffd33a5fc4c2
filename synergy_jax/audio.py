"""The AST audio front-end: Kaldi log-mel filter banks exactly as transformers' `ASTFeatureExtractor`.

What pretrained AST checkpoints expect (and what the reference computed per sample with torchaudio's
`compliance.kaldi.fbank(..., window_type='hanning', num_mel_bins=128)`): 16 kHz mono waveform in [-1, 1] ->
frames of 25 ms (400 samples) every 10 ms (160), only whole frames (`snip_edges`) -> per-frame DC removal ->
pre-emphasis 0.97 (first sample against itself) -> symmetric Hann window -> zero-pad to a 512-point FFT -> power
spectrum -> 128 triangular filters equally spaced on the Kaldi mel scale (1127 ln(1 + f/700)) from 20 Hz to
Nyquist -> natural log floored at float32 eps. Then pad with zeros (before normalising) or truncate to 1024 frames
and normalise with the AudioSet statistics: (x + 4.2677393) / (2 * 4.5689974). Padded frames therefore hold
4.2677393 / 9.1379948 = 0.467.

Two implementations of the same maths, checked against the same transformers fixtures:
`ast_features` (numpy, one clip, for data workers) and `ast_features_batch` (jnp, a padded batch with lengths,
jittable). Pure functions: no file I/O here (that is `data_pipelines.audio_io`).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # torch.finfo(torch.float).eps, Kaldi's log floor


@dataclasses.dataclass(frozen=True)
class FbankConfig:
    """Front-end parameters; defaults are ASTFeatureExtractor's (= torchaudio Kaldi defaults + AST's choices)."""

    sample_rate: int = 16_000
    frame_length: int = 400  # 25 ms
    hop_length: int = 160  # 10 ms
    fft_length: int = 512  # Kaldi rounds the frame up to a power of two
    num_mel_bins: int = 128
    max_frames: int = 1024  # 10.24 s of hops
    low_freq: float = 20.0
    high_freq: float = 0.0  # Kaldi convention: <= 0 means Nyquist + high_freq
    preemphasis: float = 0.97
    mean: float = -4.2677393  # AudioSet statistics used by every AST checkpoint
    std: float = 4.5689974

    def __post_init__(self):
        if self.fft_length < self.frame_length:
            raise ValueError(f"fft_length {self.fft_length} < frame_length {self.frame_length}")
        if not 0 <= self.low_freq < self.upper_freq <= self.sample_rate / 2:
            raise ValueError(f"mel range [{self.low_freq}, {self.upper_freq}] Hz outside (0, Nyquist]")

    @property
    def upper_freq(self) -> float:
        return self.high_freq if self.high_freq > 0 else self.sample_rate / 2 + self.high_freq

    @property
    def samples_for_max_frames(self) -> int:
        """Waveform samples that the first `max_frames` frames read; anything later is truncated away."""
        return self.frame_length + (self.max_frames - 1) * self.hop_length

    @property
    def padding_value(self) -> float:
        """The normalised value of a padded (all-zero log-mel) frame."""
        return normalize(0.0, self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def for_tower(cls, tower) -> "FbankConfig":
        """The front-end an AST tower config takes: its frames (`max_length`) and mel bins, AST's defaults else."""
        return cls(max_frames=tower.max_length, num_mel_bins=tower.num_mel_bins)


def num_frames(num_samples, config: FbankConfig = FbankConfig()):
    """Whole frames in a clip (Kaldi snip_edges): 0 for clips shorter than one frame. Works on arrays."""
    whole = 1 + (np.asarray(num_samples) - config.frame_length) // config.hop_length
    return np.where(np.asarray(num_samples) >= config.frame_length, whole, 0)


def _kaldi_mel(freq):
    return 1127.0 * np.log(1.0 + np.asarray(freq, np.float64) / 700.0)


@functools.lru_cache(maxsize=8)
def mel_filter_bank(config: FbankConfig = FbankConfig()) -> np.ndarray:
    """(fft_length // 2 + 1, num_mel_bins) float64 Kaldi filters (torchaudio `get_mel_banks`), Nyquist bin 0."""
    num_fft_bins = config.fft_length // 2
    mel_low, mel_high = _kaldi_mel(config.low_freq), _kaldi_mel(config.upper_freq)
    delta = (mel_high - mel_low) / (config.num_mel_bins + 1)
    left = mel_low + np.arange(config.num_mel_bins)[:, None] * delta
    center, right = left + delta, left + 2 * delta
    fft_mel = _kaldi_mel(config.sample_rate / config.fft_length * np.arange(num_fft_bins))[None, :]
    up, down = (fft_mel - left) / (center - left), (right - fft_mel) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))  # (mels, fft bins)
    banks = np.pad(banks, ((0, 0), (0, 1)))  # the Nyquist bin carries no weight in Kaldi
    banks = np.ascontiguousarray(banks.T)
    banks.flags.writeable = False
    return banks


@functools.lru_cache(maxsize=8)
def banded_mel_filter_bank(config: FbankConfig = FbankConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`mel_filter_bank` as bands: filter m is weights[m, : stops[m] - starts[m]] over FFT bins [starts[m],
    stops[m]). A filter spans a few bins (504 weights of 128 x 257 at AST's defaults); one may span none."""
    banks = mel_filter_bank(config).T  # (mels, fft bins)
    spans = [np.flatnonzero(row) for row in banks]
    starts = np.array([span[0] if span.size else 0 for span in spans], np.int64)
    stops = np.array([span[-1] + 1 if span.size else 0 for span in spans], np.int64)
    weights = np.zeros((len(spans), max(1, int((stops - starts).max()))))
    for m, (start, stop) in enumerate(zip(starts, stops)):
        weights[m, : stop - start] = banks[m, start:stop]
    for array in (starts, stops, weights):
        array.flags.writeable = False
    return starts, stops, weights


@functools.lru_cache(maxsize=8)
def hann_window(frame_length: int) -> np.ndarray:
    """torch.hann_window(periodic=False): torchaudio Kaldi's 'hanning' is the symmetric Hann window."""
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame_length) / (frame_length - 1))).astype(np.float32)
    window.flags.writeable = False
    return window


def normalize(log_mel, config: FbankConfig = FbankConfig()):
    """AudioSet normalisation as ASTFeatureExtractor: (x - mean) / (2 std)."""
    return (log_mel - config.mean) / (2.0 * config.std)


def denormalize(features, config: FbankConfig = FbankConfig()):
    """Inverse of `normalize`: AST features back to natural-log mel energies."""
    return features * (2.0 * config.std) + config.mean


def log_mel(waveform: np.ndarray, config: FbankConfig = FbankConfig()) -> np.ndarray:
    """(frames, num_mel_bins) float32 natural-log Kaldi fbank of a mono waveform, at most `max_frames` frames.

    float64 throughout like the reference (float32 FFT leakage shows in quiet bins). The framing and the mel
    projection are compiled kernels (`fbank_kernels`) and the FFT is numpy's: all three release the GIL, so
    data-loading threads compute features side by side."""
    from synergy_jax import fbank_kernels  # numba: imported by the processes that compute features, not by all

    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"expected a mono waveform (samples,), got shape {waveform.shape}")
    waveform = np.ascontiguousarray(waveform[: config.samples_for_max_frames])
    count = int(num_frames(waveform.size, config))
    if count == 0:
        return np.empty((0, config.num_mel_bins), np.float32)
    frames = np.empty((count, config.fft_length))  # the kernel zeroes the columns past the frame
    window = hann_window(config.frame_length).astype(np.float64)
    fbank_kernels.emphasised_frames(waveform, config.hop_length, config.preemphasis, window, frames)
    energies = np.empty((count, config.num_mel_bins))
    fbank_kernels.mel_energies(np.fft.rfft(frames, axis=1), *banded_mel_filter_bank(config), FLOAT32_EPS, energies)
    return np.log(energies, out=energies).astype(np.float32)


def pad_or_truncate(frames: np.ndarray, max_frames: int) -> np.ndarray:
    """Zero-pad (at the end) or cut a (frames, bins) array to exactly `max_frames` rows."""
    frames = frames[:max_frames]
    return np.pad(frames, ((0, max_frames - frames.shape[0]), (0, 0)))


def ast_features(waveform: np.ndarray, config: FbankConfig = FbankConfig()) -> np.ndarray:
    """(max_frames, num_mel_bins) float32 AST input of one 16 kHz mono clip = ASTFeatureExtractor's input_values."""
    return normalize(pad_or_truncate(log_mel(waveform, config), config.max_frames), config).astype(np.float32)


def ast_features_batch(waveforms, lengths, config: FbankConfig = FbankConfig()):
    """jnp version for a zero-padded batch: waveforms (B, samples), lengths (B,) -> (B, max_frames, bins) float32.

    Shapes are static, so it jits; frames that read past a clip's length are zeroed before normalising, exactly
    as the per-clip padding does. The mel projection runs at HIGHEST precision (TPUs default to bf16 passes).
    """
    import jax
    import jax.numpy as jnp

    waveforms = jnp.asarray(waveforms, jnp.float32)
    needed = config.samples_for_max_frames
    if waveforms.shape[1] < needed:
        waveforms = jnp.pad(waveforms, ((0, 0), (0, needed - waveforms.shape[1])))
    starts = np.arange(config.max_frames)[:, None] * config.hop_length
    frames = waveforms[:, starts + np.arange(config.frame_length)[None, :]]  # (B, max_frames, frame_length)
    frames = frames - frames.mean(axis=-1, keepdims=True)
    emphasised = jnp.concatenate(
        [frames[..., :1] * (1.0 - config.preemphasis), frames[..., 1:] - config.preemphasis * frames[..., :-1]],
        axis=-1,
    )
    spectrum = jnp.fft.rfft(emphasised * hann_window(config.frame_length), n=config.fft_length, axis=-1)
    power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
    energies = jnp.matmul(power, mel_filter_bank(config).astype(np.float32), precision=jax.lax.Precision.HIGHEST)
    logs = jnp.log(jnp.maximum(energies, FLOAT32_EPS))
    lengths = jnp.asarray(lengths)
    real_frames = jnp.where(lengths >= config.frame_length, 1 + (lengths - config.frame_length) // config.hop_length, 0)
    is_real = jnp.arange(config.max_frames)[None, :] < real_frames[:, None]
    return normalize(jnp.where(is_real[..., None], logs, 0.0), config).astype(jnp.float32)
