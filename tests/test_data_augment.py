"""The reference's image augmentation (numpy/PIL) and the feature-domain audio augmentation."""

import numpy as np
import pytest
from PIL import Image

from data_pipelines import augment
from synergy_jax import audio, augmentation

SMALL = audio.FbankConfig(max_frames=256, num_mel_bins=64)


def test_random_resized_crop_box_follows_torchvision_ranges():
    rng = np.random.default_rng(0)
    boxes = [augment.random_resized_crop_box(rng, 224, 224) for _ in range(2000)]
    for left, top, w, h in boxes:
        assert 0 <= left and left + w <= 224 and 0 <= top and top + h <= 224
    areas = np.array([w * h for _, _, w, h in boxes]) / 224**2
    ratios = np.array([w / h for _, _, w, h in boxes])
    assert areas.min() >= 0.07 and areas.max() <= 1.0 and np.ptp(areas) > 0.8
    assert ratios.min() >= 0.74 and ratios.max() <= 1.35
    # A very wide image cannot fit most crops: the fallback is the centred crop at the widest allowed ratio.
    assert augment.random_resized_crop_box(np.random.default_rng(1), 1000, 10) == (493, 0, 13, 10)


def test_flip_and_jitter_rates_match_the_reference():
    """RandomChoice[HFlip .5, VFlip .15] -> P(h) = .25, P(v) = .075; ColorJitter fires with p .5."""
    base = np.zeros((8, 8, 3), np.uint8)
    base[0, 1] = 255  # a marker pixel: its position reveals the flip
    image = Image.fromarray(base)
    draws, counts = 3000, {"h": 0, "v": 0}
    rng = np.random.default_rng(0)
    original = augment.CROP_SCALE
    try:
        augment.CROP_SCALE = (1.0, 1.0)  # full-image crops so that only the flips move the marker
        for _ in range(draws):
            out = np.asarray(augment.augment_image(image, 8, rng)).sum(axis=2)
            row, col = np.unravel_index(out.argmax(), out.shape)
            counts["h"] += (row, col) == (0, 6)
            counts["v"] += (row, col) == (7, 1)
    finally:
        augment.CROP_SCALE = original
    assert abs(counts["h"] / draws - 0.25) < 0.03 and abs(counts["v"] / draws - 0.075) < 0.02


def test_color_jitter_and_hue():
    red = Image.new("RGB", (4, 4), (200, 0, 0))
    shifted = np.asarray(augment.adjust_hue(red, 1 / 3))[0, 0]
    assert shifted[1] > 150 and shifted[0] < 30  # a third of the hue circle: red -> green
    backwards = np.asarray(augment.adjust_hue(red, -1 / 3))[0, 0]
    assert backwards[2] > 150 and backwards[0] < 30  # negative shifts wrap around: red -> blue
    gray = Image.new("RGB", (4, 4), (100, 120, 140))
    jittered = [np.asarray(augment.color_jitter(gray, np.random.default_rng(i)), np.float32) for i in range(20)]
    deltas = [np.abs(j - np.asarray(gray, np.float32)).max() for j in jittered]
    # Strength 0.075 (the reference's): mean 12.1, max 25 over these draws; half or double the strength gives a
    # mean of 5.8 or 22.4 and fails.
    assert 8 < np.mean(deltas) < 17 and max(deltas) < 32


def test_normalisation_is_clip_statistics():
    image = Image.new("RGB", (2, 2), (255, 0, 128))
    expected = (np.array([1.0, 0.0, 128 / 255]) - augmentation.CLIP_MEAN) / augmentation.CLIP_STD
    np.testing.assert_allclose(augment.to_normalized_array(image)[1, 1], expected, rtol=1e-6)


@pytest.mark.parametrize("width, height", [(224, 224), (7, 3), (1, 5)])
def test_normalisation_equals_torchvision_formula_bit_for_bit(width, height):
    """ToTensor then Normalize, written the obvious way, against the row-wise in-place version."""
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    formula = (pixels.astype(np.float32) / np.float32(255.0) - augmentation.CLIP_MEAN) / augmentation.CLIP_STD
    out = augment.to_normalized_array(Image.fromarray(pixels))
    assert out.dtype == np.float32 and out.shape == (height, width, 3)
    np.testing.assert_array_equal(out, formula)


def test_hue_shift_wraps_every_byte_like_torchvision():
    """torchvision's PIL adjust_hue: (h + int(hue * 255)) mod 256 on the HSV hue byte, for positive and negative
    shifts and every hue value."""
    hues = np.arange(256, dtype=np.uint8).reshape(16, 16)
    saturation = np.full_like(hues, 255)
    image = Image.merge("HSV", [Image.fromarray(c, "L") for c in (hues, saturation, saturation)]).convert("RGB")
    for hue in (-0.5, -0.2, 0.075, 0.49):
        shifted = ((np.asarray(image.convert("HSV"))[..., 0].astype(np.int32) + int(hue * 255)) % 256).astype(np.uint8)
        expected = Image.merge("HSV", [Image.fromarray(shifted, "L"), *image.convert("HSV").split()[1:]]).convert("RGB")
        np.testing.assert_array_equal(np.asarray(augment.adjust_hue(image, hue)), np.asarray(expected))


def _clip(seconds=1.5, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    tones = np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * 2 * t) > 0) + 0.5 * np.sin(2 * np.pi * 2500 * t) * (
        t > 0.7
    )
    return (0.3 * tones + 0.001 * rng.standard_normal(t.size)).astype(np.float32)


def test_audio_augmentation_with_p_zero_is_identity_and_padding_stays_padding():
    features = audio.ast_features(_clip(), SMALL)
    frames = int(audio.num_frames(_clip().size, SMALL))
    same = augment.augment_audio(features, frames, np.random.default_rng(0), SMALL, p=0.0)
    np.testing.assert_allclose(same, features, atol=1e-5)
    for seed in range(10):
        out = augment.augment_audio(features, 100, np.random.default_rng(seed), SMALL, p=1.0)
        np.testing.assert_allclose(out[int(round(100 / 0.85)) :], SMALL.padding_value, atol=1e-6)


def test_feature_shift_matches_waveform_shift():
    wave = _clip()
    frames = int(audio.num_frames(wave.size, SMALL))
    power = np.exp(audio.log_mel(wave, SMALL).astype(np.float64))
    rolled = audio.log_mel(np.roll(wave, int(wave.size * 0.1)), SMALL)
    feature_rolled = np.log(augment._shift(power))
    shift = int(round(0.1 * frames))
    away_from_seams = [i for i in range(frames) if abs(i - shift) > 2 and i > 2 and i < frames - 3]
    shifted_error = np.median(np.abs(rolled[away_from_seams] - feature_rolled[away_from_seams]))
    unshifted_error = np.median(np.abs(rolled[away_from_seams] - np.log(power)[away_from_seams]))
    assert shifted_error < 0.3 and shifted_error < unshifted_error / 3


def test_feature_stretch_lengthens_by_one_over_rate_and_keeps_pitch():
    power = np.exp(audio.log_mel(_clip(), SMALL).astype(np.float64))
    stretched = augment._stretch(power, 10_000)
    assert stretched.shape == (round(power.shape[0] / 0.85), power.shape[1])
    np.testing.assert_array_equal(power.argmax(axis=1)[:5], stretched.argmax(axis=1)[:5])  # same spectral peak
    assert augment._stretch(power, 64).shape[0] == 64  # truncated to the fixed length


def test_noise_statistics_match_real_white_noise():
    noise = (0.005 * np.random.default_rng(0).standard_normal(16000 * 20)).astype(np.float32)
    config = audio.FbankConfig(max_frames=2000, num_mel_bins=64)
    power = np.exp(audio.log_mel(noise, config).astype(np.float64))
    mean, shape = augmentation.noise_mel_statistics(config)
    above_floor = mean > 20 * audio.FLOAT32_EPS
    ratio = power.mean(axis=0)[above_floor] / mean[above_floor]
    assert np.all(np.abs(ratio - 1) < 0.1), ratio
    shape_ratio = (power.mean(axis=0) ** 2 / power.var(axis=0))[above_floor] / shape[above_floor]
    assert abs(np.median(shape_ratio) - 1) < 0.1


@pytest.mark.parametrize("seed", range(3))
def test_feature_noise_raises_quiet_bins_like_waveform_noise(seed):
    wave = _clip(seed=seed)
    rng = np.random.default_rng(seed + 100)  # independent of the clip's own noise
    noisy_wave = audio.log_mel(wave + 0.005 * rng.standard_normal(wave.size).astype(np.float32), SMALL)
    power = np.exp(audio.log_mel(wave, SMALL).astype(np.float64))
    noisy_features = np.log(augment._add_noise(power, rng, SMALL))
    assert abs(np.mean(noisy_wave) - np.mean(noisy_features)) < 0.1
    assert np.mean(noisy_features) - np.log(power).mean() > 0.5


def test_audio_left_alone_is_what_the_full_path_gives():
    """A clip no op fires on skips the power spectrum: its features must equal the full exp/log round trip,
    floor at log(eps) and float32 padding included (float16 storage can sit just under the floor)."""
    features = audio.ast_features(_clip(), SMALL)
    frames = int(audio.num_frames(_clip().size, SMALL))
    floor = audio.normalize(np.log(audio.FLOAT32_EPS), SMALL)
    features[:5, :3] = floor - 1e-3  # below the floor, as float16 rounding can leave silence
    stored = features.astype(np.float16)
    power = np.exp(audio.denormalize(stored[:frames].astype(np.float64), SMALL))
    full = audio.normalize(audio.pad_or_truncate(np.log(np.maximum(power, audio.FLOAT32_EPS)), SMALL.max_frames), SMALL)
    left_alone = augment.augment_audio(stored, frames, np.random.default_rng(0), SMALL, p=0.0)
    assert left_alone.dtype == np.float32
    np.testing.assert_array_equal(left_alone, full.astype(np.float32))
