"""The reference's training augmentations: their parameters (docs/reference.md R2.2, R2.3) and the white noise's
mel statistics, shared by the two implementations, data_pipelines/augment.py (on the host, PIL and numpy) and
synergy_jax/device_augment.py (inside the train step). numpy only: host processes import it without JAX."""

from __future__ import annotations

import functools

import numpy as np

from synergy_jax import audio

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10
HFLIP_P, VFLIP_P = 0.5, 0.15
JITTER_P, JITTER = 0.5, 0.075

AUDIO_P = 0.2
NOISE_STD, SHIFT_FRACTION, STRETCH_RATE = 0.005, 0.1, 0.85


def centre_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, w, h): RandomResizedCrop's box when none of its tries fits, the centre crop of the whole image
    at its aspect clamped to `CROP_RATIO`."""
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@functools.lru_cache(maxsize=8)
def noise_mel_statistics(config: audio.FbankConfig, noise_std: float = NOISE_STD) -> tuple[np.ndarray, np.ndarray]:
    """(mean, Gamma shape) per mel bin of white noise's mel power through the exact Kaldi front-end.

    With G the linear map samples -> one-sided DFT of a frame (DC removal, pre-emphasis, window, zero-padded FFT)
    and b a mel filter, the energy is a Gaussian quadratic form: mean = s^2 sum_k b_k C_kk and
    variance = s^4 b^T (|C|^2 + |S|^2) b with C = G G^H, S = G G^T (bins are correlated through the window).
    The Gamma law with that mean and variance stands in for the exact distribution.
    """
    n = config.frame_length
    dc_removal = np.eye(n) - np.full((n, n), 1.0 / n)
    preemphasis = np.eye(n) - config.preemphasis * np.eye(n, k=-1)
    preemphasis[0, 0] = 1.0 - config.preemphasis
    frontend = audio.hann_window(n).astype(np.float64)[:, None] * (preemphasis @ dc_removal)
    dft = np.exp(-2j * np.pi * np.outer(np.arange(config.fft_length // 2 + 1), np.arange(n)) / config.fft_length)
    g = dft @ frontend
    c, s = g @ g.conj().T, g @ g.T
    banks = audio.mel_filter_bank(config)
    mean = noise_std**2 * banks.T @ np.real(np.diag(c))
    variance = noise_std**4 * np.einsum("km,kl,lm->m", banks, np.abs(c) ** 2 + np.abs(s) ** 2, banks)
    shape = np.where(mean > 0, mean**2 / np.maximum(variance, 1e-300), 1.0)
    return mean, shape
