"""The compiled inner loops of the host AST front-end (`audio.log_mel`, and the mixdown of 16-bit PCM that
`data_pipelines.audio_io` decodes), run without the GIL.

Why compiled: written as numpy, these steps are a dozen small array operations per block of frames, each taking
and dropping the GIL, so threads computing the features of different clips ran one at a time (1.0-1.06x on two
threads, docs/performance.md). Each kernel here handles a whole clip with the GIL released; the FFT between them
is numpy's, which releases it too. The arithmetic is float64, as the numpy steps were; only the order of a few
sums differs (a frame's mean, a filter's energy): about 1e-15 in float64, at most an ulp of the float32 features.

Compiled on first use and cached where numba finds a writable place (next to this file, the user's cache folder,
or `NUMBA_CACHE_DIR`), so later processes load the machine code; where there is none (a read-only install without
a writable home) each process compiles them again instead of failing on import.
"""

from __future__ import annotations

import numba
import numpy as np


def _compiled(function):
    """`function` compiled to run without the GIL, cached on disk where numba can (module docstring)."""
    try:
        return numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(function)


@_compiled
def emphasised_frames(waveform, hop, preemphasis, window, out):
    """Fill `out[i, :len(window)]` (float64) with frame i = waveform[i * hop : i * hop + len(window)], its mean
    removed, pre-emphasised (the first sample against itself, Kaldi's convention) and windowed, and the columns
    past the window with zeros, the FFT's padding (so `out` may come from np.empty). Compiled code has no bounds
    checks, so the shapes are checked first (a ValueError)."""
    length = window.size
    if out.shape[1] < length or (out.shape[0] > 0 and (out.shape[0] - 1) * hop + length > waveform.size):
        raise ValueError("emphasised_frames: `out` has more frames, or narrower rows, than the waveform gives")
    for i in range(out.shape[0]):
        start = i * hop
        total = 0.0
        for j in range(length):
            total += waveform[start + j]
        mean = total / length
        previous = waveform[start] - mean
        out[i, 0] = previous * (1.0 - preemphasis) * window[0]
        for j in range(1, length):
            current = waveform[start + j] - mean
            out[i, j] = (current - preemphasis * previous) * window[j]
            previous = current
        for j in range(length, out.shape[1]):
            out[i, j] = 0.0


MEL_BLOCK = 16  # frames whose energies mel_energies sums side by side (two AVX-512 registers of float64)


@_compiled
def mel_energies(spectrum, starts, stops, weights, floor, out):
    """out[i, m] = max(sum over bins k in [starts[m], stops[m]) of weights[m, k - starts[m]] |spectrum[i, k]|^2,
    floor): each triangular filter reads only the few bins it spans. The frames go MEL_BLOCK at a time, their
    powers stored bin-major, so one filter's sums over a block are independent lanes of vector instructions;
    each sum still adds its terms in bin order. Shapes are checked first (a ValueError)."""
    fits = out.shape[0] == spectrum.shape[0] and out.shape[1] == starts.size == stops.size == weights.shape[0]
    for m in range(starts.size):
        fits = fits and 0 <= starts[m] and stops[m] <= spectrum.shape[1] and stops[m] - starts[m] <= weights.shape[1]
    if not fits:
        raise ValueError("mel_energies: the filters' bands, `weights` and `out` do not fit the spectrum")
    power = np.zeros((spectrum.shape[1], MEL_BLOCK))  # a short last block's spare lanes sum zeros, not garbage
    energy = np.empty(MEL_BLOCK)
    for first in range(0, spectrum.shape[0], MEL_BLOCK):
        count = min(MEL_BLOCK, spectrum.shape[0] - first)
        for f in range(count):
            for k in range(spectrum.shape[1]):
                value = spectrum[first + f, k]
                power[k, f] = value.real * value.real + value.imag * value.imag
        for m in range(starts.size):
            energy[:] = 0.0
            for k in range(starts[m], stops[m]):
                weight = weights[m, k - starts[m]]
                for f in range(MEL_BLOCK):
                    energy[f] += weight * power[k, f]
            for f in range(count):
                out[first + f, m] = max(energy[f], floor)


@_compiled
def int16_mono(samples, out):
    """out[i] (float32) = the mean over channels of samples[i, :] x 2^-15 (int16, (samples, channels)): the
    channels summed as integers (exact), scaled once, then divided by the channel count, in one pass over the
    clip. Why this equals libsndfile's float samples mixed down: `audio_io._int16_to_mono`. Shapes are checked
    first (a ValueError)."""
    if out.shape[0] != samples.shape[0] or samples.shape[1] == 0:
        raise ValueError("int16_mono: `out` must have one value per sample, and the samples a channel")
    scale, channels = np.float32(2.0**-15), samples.shape[1]
    count = np.float32(channels)
    if channels == 2:  # the common case, as a loop without an inner one: compiled to vector instructions
        for i in range(samples.shape[0]):
            out[i] = np.float32(np.int32(samples[i, 0]) + np.int32(samples[i, 1])) * scale / count
    else:
        for i in range(samples.shape[0]):
            total = np.int32(samples[i, 0])
            for channel in range(1, channels):
                total += np.int32(samples[i, channel])
            out[i] = np.float32(total) * scale / count
