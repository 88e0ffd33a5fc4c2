"""Audio decoding for the data pipelines: any file soundfile (or, failing that, librosa/audioread) reads, mixed
down to mono and resampled to the AST rate of 16 kHz.

The reference (dataset.py:143-144) does `librosa.load(path)` (-> 22.05 kHz, soxr_hq) and then
`librosa.resample(22050 -> 16000)` (soxr_hq again). We resample once, native rate -> 16 kHz, with the same soxr
'HQ' filter: one lossy step instead of two, and nothing between 8 and 11 kHz survives the second step anyway.
`reference_resampling=True` restores the two-step path for comparisons.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import soundfile
import soxr

TARGET_SAMPLE_RATE = 16_000
REFERENCE_LOAD_RATE = 22_050  # librosa.load's default rate, used by the reference before resampling to 16 kHz


class AudioDecodeError(ValueError):
    """A file that is not decodable audio (corrupt, empty, a text file named .wav, non-finite samples)."""


def _read_mono(path: str) -> tuple[np.ndarray, int]:
    """(samples,) float32 mono and the file's rate: libsndfile first, librosa's audioread fallback second.
    Raises AudioDecodeError for a file neither reads and for NaN or infinite samples (16-bit PCM, the common
    case, cannot hold any, so its samples are not scanned for them)."""
    try:
        with soundfile.SoundFile(path) as file:
            if file.subtype == "PCM_16":
                return _int16_to_mono(file.read(dtype="int16", always_2d=True)), int(file.samplerate)
            mono, rate = to_mono(file.read(dtype="float32", always_2d=True)), int(file.samplerate)
    except soundfile.LibsndfileError as sndfile_error:
        mono, rate = _read_with_librosa(path, sndfile_error)
    if not np.isfinite(mono).all():
        raise AudioDecodeError("audio has NaN or infinite samples")
    return mono, rate


def _read_with_librosa(path: str, sndfile_error: Exception) -> tuple[np.ndarray, int]:
    """(samples,) float32 mono and the rate of a format libsndfile lacks (m4a, ...), read by librosa/audioread."""
    try:
        import librosa  # slow import and numba compile: only for formats libsndfile lacks

        with warnings.catch_warnings():  # "PySoundFile failed", audioread deprecation: we report it ourselves
            warnings.simplefilter("ignore")
            mono, rate = librosa.load(path, sr=None, mono=True)
        return np.asarray(mono, np.float32), int(rate)
    except Exception as fallback_error:  # audioread raises several unrelated types
        detail = str(fallback_error) or "no decoder read it"  # audioread's NoBackendError has no message
        raise AudioDecodeError(
            f"cannot decode audio: {sndfile_error} (librosa fallback: {type(fallback_error).__name__}: {detail})"
        ) from fallback_error


def _int16_to_mono(samples: np.ndarray) -> np.ndarray:
    """16-bit PCM (samples, channels) -> float32 mono, equal to the bit to `to_mono` of libsndfile's float32
    samples (sample x 2^-15): those products and their sums are exact in float32, so the channels can be summed as
    integers and scaled once, before the same division by the channel count. It skips libsndfile's slower float
    conversion loop and a float32 copy of every channel, and runs as one compiled pass without the GIL
    (`fbank_kernels.int16_mono`; docs/performance.md, "The feed")."""
    from synergy_jax import fbank_kernels  # numba: imported by the processes that decode audio, not by all

    mono = np.empty(samples.shape[0], np.float32)
    fbank_kernels.int16_mono(samples, mono)
    return mono


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(samples, channels) -> (samples,) by averaging channels, as librosa.to_mono.

    Channels are summed column by column: numpy's `mean(axis=1)` over a handful of interleaved channels runs a
    tiny reduction per sample (10 ms for 10 s of 44.1 kHz stereo, 3x the resampling). Up to 7 channels the
    sum is in numpy's own order, so the result is the same to the bit (but for the sign of an exact zero)."""
    channels = samples.shape[1]
    if channels == 1:
        return samples[:, 0]
    total = samples[:, 0].astype(np.float32)  # a copy: the sum accumulates in place
    for channel in range(1, channels):
        total += samples[:, channel]
    return total / np.float32(channels)


def resample(waveform: np.ndarray, rate: int, target_rate: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """soxr 'HQ' resampling (= librosa's default res_type 'soxr_hq'); float32 in, float32 out."""
    if rate == target_rate:
        return np.ascontiguousarray(waveform, np.float32)
    return soxr.resample(np.ascontiguousarray(waveform, np.float32), rate, target_rate, quality="HQ")


def load_audio(
    path: str | os.PathLike, target_rate: int = TARGET_SAMPLE_RATE, reference_resampling: bool = False
) -> np.ndarray:
    """Mono float32 waveform at `target_rate`. Raises AudioDecodeError for anything that is not usable audio."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioDecodeError(f"no such file: {path}")
    waveform, rate = _read_mono(path)
    if waveform.size == 0:
        raise AudioDecodeError("audio file has no samples")
    if reference_resampling:
        waveform = resample(waveform, rate, REFERENCE_LOAD_RATE)
        rate = REFERENCE_LOAD_RATE
    return resample(waveform, rate, target_rate)
