"""Training-time augmentation, seeded by the numpy Generator Grain hands each element.

Image (numpy/PIL, the reference's torchvision pipeline, docs/reference.md R2.2, with torchvision's PIL-backend
algorithms): Resize((S, S)) -> RandomResizedCrop(S, scale (0.08, 1), ratio (3/4, 4/3), bilinear) ->
RandomChoice[HorizontalFlip p 0.5, VerticalFlip p 0.15] -> RandomApply(ColorJitter(0.075 x 4), p 0.5) ->
[0, 1] -> CLIP mean/std. Evaluation does Resize -> [0, 1] -> CLIP mean/std only.

Audio (feature domain; the reference augments the waveform, docs/reference.md R2.3 step 3, before the fbank we precompute).
Each of its four operations is drawn independently with p = 0.2, in a random order, as `utils.audio_augment`:
  white noise x + 0.005 N(0, 1)  ->  add the noise's exact expected mel power (through DC removal, pre-emphasis,
                                     window, FFT and filters), drawn per frame and bin from a Gamma law with the
                                     exact mean and variance of that power; signal x noise cross terms (zero mean)
                                     are ignored
  circular shift by 10 %         ->  roll the real frames by round(0.1 x frames) (exact up to the one frame that
                                     straddles the wrap point and the sub-frame remainder)
  time stretch rate 0.85         ->  resample the real frames' power along time by 1/0.85 (linear interpolation),
                                     then truncate to the fixed length as the reference's extractor would; pitch is
                                     kept, as the phase vocoder keeps it
  polarity inversion -x          ->  nothing: |FFT(-x)|^2 = |FFT(x)|^2, so it never changed the reference's features
Padded frames stay padding.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageEnhance

from synergy_jax import audio
from synergy_jax.augmentation import (
    AUDIO_P,
    CLIP_MEAN,
    CLIP_STD,
    CROP_RATIO,
    CROP_SCALE,
    CROP_TRIES,
    HFLIP_P,
    JITTER,
    JITTER_P,
    SHIFT_FRACTION,
    STRETCH_RATE,
    VFLIP_P,
    centre_crop_box,
    noise_mel_statistics,
)


# ----------------------------------------------------------------------------------------------- image


def resize(image: Image.Image, size: int) -> Image.Image:
    """torchvision Resize((size, size)) on a PIL image: bilinear, aspect ratio squashed."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BILINEAR)


def to_normalized_array(image: Image.Image) -> np.ndarray:
    """ToTensor + Normalize(CLIP mean, std), kept channels-last: (H, W, 3) float32.

    The same three float32 operations as `(x / 255 - mean) / std`, so the same values, done in place on rows of
    W x 3 with the per-channel constants tiled along the row: broadcasting the (3,) constants over (H, W, 3) runs
    numpy's inner loop three elements at a time, which made this the read path's costliest step."""
    pixels = np.array(image, np.float32)
    rows = pixels.reshape(pixels.shape[0], -1)
    mean, std = _channel_rows(pixels.shape[1])
    rows /= np.float32(255.0)
    rows -= mean
    rows /= std
    return pixels


@functools.lru_cache(maxsize=8)
def _channel_rows(width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.tile(CLIP_MEAN, width), np.tile(CLIP_STD, width)


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, w, h) by torchvision's RandomResizedCrop.get_params: 10 tries, then a centre crop."""
    area = width * height
    log_ratio = np.log(CROP_RATIO)
    for _ in range(CROP_TRIES):
        target_area = area * rng.uniform(*CROP_SCALE)
        aspect = np.exp(rng.uniform(*log_ratio))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    return centre_crop_box(width, height)


def adjust_hue(image: Image.Image, hue: float) -> Image.Image:
    """torchvision's PIL adjust_hue: shift the HSV hue byte (wrapping), hue in [-0.5, 0.5]."""
    h, s, v = image.convert("HSV").split()
    shifted = np.asarray(h) + np.uint8(int(hue * 255) % 256)  # uint8 arithmetic wraps modulo 256
    return Image.merge("HSV", (Image.fromarray(shifted, "L"), s, v)).convert("RGB")


def color_jitter(image: Image.Image, rng: np.random.Generator, strength: float = JITTER) -> Image.Image:
    """ColorJitter(b, c, s, h = strength): factors drawn first, the four ops applied in a random order."""
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, 3)
    hue = rng.uniform(-strength, strength)
    for op in rng.permutation(4):
        if op == 0:
            image = ImageEnhance.Brightness(image).enhance(brightness)
        elif op == 1:
            image = ImageEnhance.Contrast(image).enhance(contrast)
        elif op == 2:
            image = ImageEnhance.Color(image).enhance(saturation)
        else:
            image = adjust_hue(image, hue)
    return image


def augment_image(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """The reference's training image transform up to ToTensor (see module docstring)."""
    image = resize(image, size)
    left, top, w, h = random_resized_crop_box(rng, *image.size)
    image = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:  # RandomChoice picks one flip, which then fires with its own p
        if rng.random() < HFLIP_P:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif rng.random() < VFLIP_P:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if rng.random() < JITTER_P:
        image = color_jitter(image, rng)
    return image


# ----------------------------------------------------------------------------------------------- audio


def _add_noise(power: np.ndarray, rng: np.random.Generator, config: audio.FbankConfig) -> np.ndarray:
    mean, shape = noise_mel_statistics(config)
    return power + mean * rng.gamma(shape, 1.0 / shape, size=power.shape)


def _shift(power: np.ndarray) -> np.ndarray:
    return np.roll(power, int(round(SHIFT_FRACTION * power.shape[0])), axis=0)


def _stretch(power: np.ndarray, max_frames: int) -> np.ndarray:
    frames = power.shape[0]
    length = min(int(round(frames / STRETCH_RATE)), max_frames)
    position = np.minimum(np.arange(length) * STRETCH_RATE, frames - 1)
    lower = np.floor(position).astype(int)
    upper = np.minimum(lower + 1, frames - 1)
    fraction = (position - lower)[:, None]
    return (1 - fraction) * power[lower] + fraction * power[upper]


def augment_audio(
    features: np.ndarray, real_frames: int, rng: np.random.Generator, config: audio.FbankConfig, p: float = AUDIO_P
) -> np.ndarray:
    """Feature-domain version of the reference's `audio_augment` (see module docstring); float32 out.

    The power spectrum is formed only when an op that changes it fires (about half the clips at p = 0.2 have
    none); the others keep their stored features, with the floor and padding values of the full path."""
    features = np.asarray(features, np.float32)
    power = None
    for op in rng.permutation(4):
        if rng.random() >= p or real_frames == 0 or op == 3:  # op 3, polarity inversion: the same power spectrum
            continue
        if power is None:
            power = np.exp(audio.denormalize(features[:real_frames].astype(np.float64), config))
        if op == 0:
            power = _add_noise(power, rng, config)
        elif op == 1:
            power = _shift(power)
        else:
            power = _stretch(power, config.max_frames)
    if power is None:
        return _untouched(features, real_frames, config)
    log_mel = np.log(np.maximum(power, audio.FLOAT32_EPS))
    return audio.normalize(audio.pad_or_truncate(log_mel, features.shape[0]), config).astype(np.float32)


def _untouched(features: np.ndarray, real_frames: int, config: audio.FbankConfig) -> np.ndarray:
    """What the full path returns when no op fired: the features floored at log(eps), float32 padding after."""
    floor = np.float32(audio.normalize(np.log(audio.FLOAT32_EPS), config))
    out = np.empty_like(features)
    np.maximum(features[:real_frames], floor, out=out[:real_frames])
    out[real_frames:] = np.float32(config.padding_value)
    return out
