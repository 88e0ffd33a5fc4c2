"""The AST front-end against transformers' ASTFeatureExtractor, and audio decoding/resampling."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile
import soxr

from data_pipelines import audio_io
from helpers import ROOT
from synergy_jax import audio

FIXTURES = Path(__file__).parent / "fixtures"
TOLERANCE = 1e-4  # the numerics contract for the audio front-end (after normalisation)


def _load_fixture_script():
    spec = importlib.util.spec_from_file_location("make_audio_fixtures", FIXTURES / "make_audio_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    fixture = np.load(FIXTURES / "audio" / "ast_extractor.npz")
    clips = _load_fixture_script().reference_clips()
    names = [str(name) for name in fixture["names"]]
    assert set(names) == set(clips), "fixture and clip generator disagree: regenerate the fixture"
    for name in names:
        stats = fixture[f"{name}/wave_stats"]
        wave = clips[name].astype(np.float64)
        np.testing.assert_allclose([wave.size, wave.sum(), np.square(wave).sum()], stats, rtol=1e-9, atol=1e-6)
    return fixture, clips, names


def _assert_matches(fixture, name, features):
    assert features.shape == (1024, 128) and features.dtype == np.float32
    rows = fixture[f"{name}/frames"]
    np.testing.assert_allclose(features[rows], fixture[f"{name}/values"], atol=TOLERANCE, rtol=0, err_msg=name)
    features = features.astype(np.float64)
    np.testing.assert_allclose(features.mean(axis=1), fixture[f"{name}/frame_means"], atol=TOLERANCE, err_msg=name)
    np.testing.assert_allclose(features.mean(axis=0), fixture[f"{name}/bin_means"], atol=TOLERANCE, err_msg=name)


def test_fixture_covers_the_required_cases(reference):
    _, clips, _ = reference
    frames = {name: int(audio.num_frames(wave.size)) for name, wave in clips.items()}
    assert min(frames.values()) == 0 and frames["one_frame"] == 1
    assert frames["tone_10s"] == 998 and frames["exact_1024_frames"] == 1024 and frames["one_frame_over"] == 1025
    assert frames["long_12s"] > 1024
    assert not clips["silent_3s"].any() and abs(clips["dc_offset_2s"].mean() - 0.5) < 0.01


def test_numpy_features_match_transformers(reference):
    fixture, clips, names = reference
    for name in names:
        _assert_matches(fixture, name, audio.ast_features(clips[name]))


def test_batched_jnp_features_match_transformers(reference):
    fixture, clips, names = reference
    batch = np.zeros((len(names), max(clip.size for clip in clips.values())), np.float32)
    for row, name in enumerate(names):
        batch[row, : clips[name].size] = clips[name]
        batch[row, clips[name].size :] = 0.7  # junk after the end must not leak into the features
    lengths = np.array([clips[name].size for name in names])
    features = np.asarray(jax.jit(audio.ast_features_batch)(batch, lengths))
    for row, name in enumerate(names):
        _assert_matches(fixture, name, features[row])


def test_padding_is_zero_log_mel_and_truncation_keeps_the_start():
    config = audio.FbankConfig(max_frames=64, num_mel_bins=32)
    wave = np.sin(np.arange(8000) * 0.05).astype(np.float32)  # 48 frames
    features = audio.ast_features(wave, config)
    assert features.shape == (64, 32)
    np.testing.assert_allclose(features[48:], audio.normalize(0.0, config))
    longer = np.concatenate([wave, np.ones(20000, np.float32)])
    np.testing.assert_allclose(audio.ast_features(longer, config)[:47], features[:47], atol=1e-6)
    np.testing.assert_allclose(audio.denormalize(audio.normalize(features, config), config), features, atol=1e-5)


@pytest.mark.parametrize("subtype, channels", [("PCM_16", 2), ("PCM_16", 3), ("PCM_16", 1), ("PCM_24", 2), ("FLOAT", 2)])
def test_decoding_equals_libsndfile_float_samples_bit_for_bit(tmp_path, subtype, channels):
    """16-bit PCM is read as int16 and scaled by 2^-15 ourselves; every format must give libsndfile's own float32
    samples, mixed down and resampled, to the bit (full-scale values and both extremes included)."""
    rng = np.random.default_rng(channels)
    samples = rng.uniform(-1, 1, (22_050, channels)).astype(np.float32)
    samples[:4] = [[-1.0] * channels, [1.0] * channels, [0.0] * channels, [-(2.0**-15)] * channels]
    path = tmp_path / f"clip_{subtype}.wav"
    soundfile.write(path, samples, 22_050, subtype=subtype)
    libsndfile, rate = soundfile.read(path, dtype="float32", always_2d=True)
    expected = audio_io.resample(audio_io.to_mono(libsndfile), rate)
    np.testing.assert_array_equal(audio_io.load_audio(path), expected)


def test_load_audio_mixes_down_and_resamples(tmp_path):
    rate = 44_100
    t = np.arange(rate) / rate
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "stereo.flac"
    soundfile.write(path, np.stack([left, right], axis=1).astype(np.float32), rate, subtype="PCM_24")
    wave = audio_io.load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1 and wave.size == 16_000
    expected = soxr.resample(((left + right) / 2).astype(np.float32), rate, 16_000, quality="HQ")
    np.testing.assert_allclose(wave, expected, atol=1e-5)
    # The reference's two-step path (native -> 22.05 kHz -> 16 kHz) is close to but not the same as one step.
    two_step = audio_io.load_audio(path, reference_resampling=True)
    assert two_step.size == 16_000 and 0 < np.abs(two_step - wave)[1000:-1000].max() < 1e-2


@pytest.mark.parametrize(
    "content, reason",
    [(b"caption: a dog barking\n", "cannot decode"), (b"", "cannot decode"), (None, "no such file")],
)
def test_load_audio_rejects_non_audio(tmp_path, content, reason):
    path = tmp_path / "clip.wav"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(audio_io.AudioDecodeError, match=reason) as caught:
        audio_io.load_audio(path)
    assert not str(caught.value).endswith(": )")  # every part of the message says something


def test_load_audio_rejects_truncated_header_and_empty_audio(tmp_path):
    good = tmp_path / "good.wav"
    soundfile.write(good, np.zeros(1600, np.float32), 16_000)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(good.read_bytes()[:30])
    with pytest.raises(audio_io.AudioDecodeError):
        audio_io.load_audio(broken)
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), 16_000)
    with pytest.raises(audio_io.AudioDecodeError, match="no samples"):
        audio_io.load_audio(empty)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE"])
def test_load_audio_rejects_non_finite_float_samples(tmp_path, subtype, bad):
    """Float formats can store NaN and infinities (16-bit PCM cannot, and is not scanned): none reaches the
    fbank."""
    samples = np.zeros((1600, 2), np.float32)
    samples[1000, 1] = bad
    path = tmp_path / "clip.wav"
    soundfile.write(path, samples, 16_000, subtype=subtype)
    with pytest.raises(audio_io.AudioDecodeError, match="NaN or infinite"):
        audio_io.load_audio(path)


def test_the_librosa_fallback_rejects_non_finite_samples_too(tmp_path, monkeypatch):
    """A format libsndfile cannot read goes to librosa; what that returns is checked like libsndfile's floats."""
    fake_librosa = type(sys)("librosa")
    fake_librosa.load = lambda path, sr, mono: (np.array([0.0, np.nan, 0.5], np.float32), 16_000)
    monkeypatch.setitem(sys.modules, "librosa", fake_librosa)
    path = tmp_path / "clip.m4a"
    path.write_bytes(b"\x00\x00\x00\x18ftypM4A not really")
    with pytest.raises(audio_io.AudioDecodeError, match="NaN or infinite"):
        audio_io.load_audio(path)


@pytest.mark.parametrize("channels", [1, 2, 3, 6, 7])
def test_mixdown_is_numpy_mean_to_the_bit(channels):
    samples = np.random.default_rng(channels).standard_normal((44_100, channels)).astype(np.float32)
    mono = audio_io.to_mono(samples)
    assert mono.dtype == np.float32 and mono.shape == (44_100,)
    np.testing.assert_array_equal(mono, samples.mean(axis=1, dtype=np.float32))


@pytest.mark.parametrize("config", [audio.FbankConfig(), audio.FbankConfig(num_mel_bins=64, fft_length=1024)])
def test_banded_mel_filters_are_the_dense_filter_bank(config):
    starts, stops, weights = audio.banded_mel_filter_bank(config)
    dense = np.zeros((config.num_mel_bins, config.fft_length // 2 + 1))
    for m, (start, stop) in enumerate(zip(starts, stops)):
        dense[m, start:stop] = weights[m, : stop - start]
        assert not weights[m, stop - start :].any()
    np.testing.assert_array_equal(dense, audio.mel_filter_bank(config).T)


def _numpy_log_mel(waveform, config):
    """The front-end's float64 steps as plain numpy over all frames at once, with the dense filter bank."""
    count = int(audio.num_frames(waveform.size, config))
    frames = np.lib.stride_tricks.sliding_window_view(waveform, config.frame_length)[:: config.hop_length][:count]
    frames = frames - frames.mean(axis=1, keepdims=True, dtype=np.float64)
    emphasised = np.empty_like(frames)
    np.multiply(frames[:, :-1], -config.preemphasis, out=emphasised[:, 1:])
    emphasised[:, 1:] += frames[:, 1:]
    emphasised[:, 0] = frames[:, 0] * (1.0 - config.preemphasis)
    emphasised *= audio.hann_window(config.frame_length)
    spectrum = np.fft.rfft(emphasised, n=config.fft_length, axis=1)
    power = np.square(spectrum.real) + np.square(spectrum.imag)
    return np.log(np.maximum(power @ audio.mel_filter_bank(config), audio.FLOAT32_EPS)).astype(np.float32)


@pytest.mark.parametrize("frames", [1, 2, 63, 1024, 1030])
@pytest.mark.parametrize("offset", [0.0, 0.5])  # a DC offset: what the per-frame mean removal is for
def test_compiled_log_mel_equals_the_numpy_steps(frames, offset):
    config = audio.FbankConfig()
    samples = config.frame_length + (frames - 1) * config.hop_length + 100  # + a partial frame that is dropped
    wave = offset + 0.2 * np.random.default_rng(frames).standard_normal(samples).astype(np.float32)
    features = audio.log_mel(wave.astype(np.float32), config)
    assert features.shape == (min(frames, config.max_frames), config.num_mel_bins) and features.dtype == np.float32
    expected = _numpy_log_mel(wave.astype(np.float32), config)[: config.max_frames]
    np.testing.assert_allclose(features, expected, rtol=0, atol=2e-6)  # float64 sums in another order, then float32


def test_the_compiled_kernels_are_compiled_to_release_the_gil():
    """Threads computing different clips' features run side by side only if every kernel drops the GIL."""
    from synergy_jax import fbank_kernels

    for kernel in (fbank_kernels.emphasised_frames, fbank_kernels.mel_energies, fbank_kernels.int16_mono):
        assert kernel.targetoptions.get("nogil") is True, kernel


def test_log_mel_takes_any_layout_and_dtype_and_no_whole_frame():
    config = audio.FbankConfig()
    wave = 0.1 * np.random.default_rng(3).standard_normal(2 * 4000)
    np.testing.assert_array_equal(audio.log_mel(wave[::2], config), audio.log_mel(wave[::2].copy(), config))
    np.testing.assert_array_equal(audio.log_mel(wave, config), audio.log_mel(wave.astype(np.float32), config))
    assert audio.log_mel(wave[: config.frame_length - 1], config).shape == (0, config.num_mel_bins)


@pytest.mark.parametrize("frames", [1, 15, 16, 17, 33])
def test_mel_energies_add_each_filters_terms_in_bin_order_to_the_bit(frames):
    """The kernel sums 16 frames side by side: each energy must still be the plain sum in bin order, whatever the
    frame's place in its block (a short last block included)."""
    from synergy_jax import fbank_kernels

    config = audio.FbankConfig()
    starts, stops, weights = audio.banded_mel_filter_bank(config)
    rng = np.random.default_rng(frames)
    bins = config.fft_length // 2 + 1
    spectrum = rng.standard_normal((frames, bins)) + 1j * rng.standard_normal((frames, bins))
    spectrum[0, :] *= 1e-6  # energies under the floor in the first frame
    out = np.full((frames, config.num_mel_bins), np.nan)
    fbank_kernels.mel_energies(spectrum, starts, stops, weights, 1e-3, out)
    power = spectrum.real * spectrum.real + spectrum.imag * spectrum.imag
    expected = np.empty_like(out)
    for i in range(frames):
        for m, (start, stop) in enumerate(zip(starts, stops)):
            energy = 0.0
            for k in range(start, stop):
                energy += float(weights[m, k - start]) * float(power[i, k])
            expected[i, m] = max(energy, 1e-3)
    np.testing.assert_array_equal(out, expected)


def test_emphasised_frames_zero_the_fft_padding_of_any_buffer():
    """log_mel hands the kernel np.empty memory: the columns past the frame must come back zero, not as found."""
    from synergy_jax import fbank_kernels

    config = audio.FbankConfig()
    window = audio.hann_window(config.frame_length).astype(np.float64)
    wave = np.random.default_rng(0).standard_normal(config.frame_length + 2 * config.hop_length).astype(np.float32)
    out = np.full((3, config.fft_length), np.nan)
    fbank_kernels.emphasised_frames(wave, config.hop_length, 0.97, window, out)
    assert np.isfinite(out).all() and not out[:, config.frame_length :].any()
    assert out[:, 1 : config.frame_length - 1].all()  # the window is zero at both ends only


def test_the_kernels_refuse_shapes_that_would_read_or_write_out_of_bounds():
    from synergy_jax import fbank_kernels

    config = audio.FbankConfig()
    window, wave = audio.hann_window(config.frame_length).astype(np.float64), np.zeros(config.frame_length, np.float32)
    with pytest.raises(ValueError, match="more frames"):  # two frames asked of a one-frame waveform
        fbank_kernels.emphasised_frames(wave, config.hop_length, 0.97, window, np.zeros((2, config.fft_length)))
    starts, stops, weights = audio.banded_mel_filter_bank(config)
    spectrum = np.zeros((3, int(stops.max()) - 1), np.complex128)  # one bin short: the top filter reads past it
    with pytest.raises(ValueError, match="do not fit"):
        fbank_kernels.mel_energies(spectrum, starts, stops, weights, 1e-7, np.zeros((3, config.num_mel_bins)))
    with pytest.raises(ValueError, match="one value per sample"):
        fbank_kernels.int16_mono(np.zeros((5, 2), np.int16), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="a channel"):  # no channel to read
        fbank_kernels.int16_mono(np.zeros((5, 0), np.int16), np.zeros(5, np.float32))


def test_the_kernels_compile_without_a_writable_cache_folder(tmp_path):
    """Where numba finds nowhere to cache (a read-only install, no writable home), importing the kernels must not
    fail: they are compiled in the process instead."""
    script = (
        "import numba.core.caching as caching, numpy as np\n"
        "caching.CacheImpl._locator_classes = []  # no writable place anywhere\n"
        "from synergy_jax import audio, fbank_kernels\n"
        "assert type(fbank_kernels.emphasised_frames._cache).__name__ == 'NullCache'\n"
        "np.save('features.npy', audio.log_mel(np.sin(np.arange(16000, dtype=np.float32) / 7)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    expected = audio.log_mel(np.sin(np.arange(16000, dtype=np.float32) / 7))
    np.testing.assert_array_equal(np.load(tmp_path / "features.npy"), expected)
