"""The compiled inner loops of the host AST front-end (`audio.log_mel`), run without the GIL.

Why compiled: written as numpy, these steps are a dozen small array operations per block of frames, each taking
and dropping the GIL, so threads computing the features of different clips ran one at a time (1.0-1.06x on two
threads, docs/performance.md). Each kernel here handles a whole clip with the GIL released; the FFT between them
is numpy's, which releases it too. The arithmetic is float64, as the numpy steps were; only the order of a few
sums differs (a frame's mean, a filter's energy), which moves the features by about 1e-15.

Compiled on first use and cached next to this file (numba `cache=True`), so later processes load the machine code.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def emphasised_frames(waveform, hop, preemphasis, window, out):
    """Fill `out[i, :len(window)]` (float64) with frame i = waveform[i * hop : i * hop + len(window)], its mean
    removed, pre-emphasised (the first sample against itself, Kaldi's convention) and windowed. Columns past the
    window are not touched: zeros there are the FFT's padding."""
    length = window.size
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


@numba.njit(nogil=True, cache=True)
def mel_energies(spectrum, starts, stops, weights, floor, out):
    """out[i, m] = max(sum over bins k in [starts[m], stops[m]) of weights[m, k - starts[m]] |spectrum[i, k]|^2,
    floor): each triangular filter reads only the few bins it spans."""
    power = np.empty(spectrum.shape[1])
    for i in range(spectrum.shape[0]):
        for k in range(spectrum.shape[1]):
            value = spectrum[i, k]
            power[k] = value.real * value.real + value.imag * value.imag
        for m in range(starts.size):
            energy = 0.0
            for k in range(starts[m], stops[m]):
                energy += weights[m, k - starts[m]] * power[k]
            out[i, m] = max(energy, floor)
