"""Pre-training's augmentations as a jnp function of the batch, run inside the train step on the accelerator.

The host read path (data_pipelines/augment.py) runs the reference's augmentations with PIL and numpy: most of the
10 ms of a core it spends per example (docs/performance.md, "The feed"). With `data.augment_on = "device"` the host
hands over the raw record instead (uint8 pixels, float16 features, the count of real audio frames and a
per-example seed drawn from Grain's generator, so a resumed run draws the same augmentations) and this module
applies the same operations, with the same probabilities and parameter laws, inside the jitted step:

  image  RandomResizedCrop(scale (0.08, 1), ratio (3/4, 4/3), torchvision's 10 tries then a centre crop), resized
         with PIL's bilinear filter (a triangle widened by the downscale factor, weights normalised over the crop)
         as two weight-matrix products; RandomChoice[horizontal flip p 0.5, vertical flip p 0.15]; ColorJitter
         (0.075 each) with p 0.5, its four operations in a random order, each rounded to uint8 as PIL does
         (brightness, contrast, saturation exactly PIL's blends; hue through a float HSV round trip instead of PIL's
         uint8 HSV); then [0, 1] and the CLIP mean / std.
  audio  the feature-domain noise / circular shift / time stretch of docs/reference.md R2.3, each with p 0.2 in a
         random order, in float32 (the host works in float64); clips where none fires keep their features,
         floored at log(eps) as the host does. Padding frames stay padding.

What differs from the host path, and by how much, is measured in tests/test_device_augment.py: the crop boxes are
the host's for the same uniforms; resizing, brightness, contrast and saturation are within one uint8 level of PIL;
the hue shift within a few levels; the audio operations within 1e-4 of the host's float64 ones. The random streams
differ (jax.random instead of numpy), so a run's augmentations are not the host mode's draws.
"""

from __future__ import annotations

import fractions
import functools

import jax
import jax.numpy as jnp
import numpy as np

from synergy_jax import audio, augmentation

GAMMA_TRIES = 4
STRETCH_FRACTION = fractions.Fraction(augmentation.STRETCH_RATE).limit_denominator(1000)  # 17 / 20

RAW_FIELDS = ("image", "audio", "audio_frames", "augment_seed")  # what the host hands over in device mode


# ----------------------------------------------------------------------------------------------- image


def crop_box(area_u: jax.Array, ratio_u: jax.Array, top_u: jax.Array, left_u: jax.Array, width: int, height: int):
    """(left, top, w, h) int32 by torchvision's RandomResizedCrop.get_params from its uniforms: the first of the
    `CROP_TRIES` (area, log-ratio) draws whose box fits, placed by `top_u` / `left_u` in [0, 1); a centre crop
    of the clamped aspect when none fits."""
    scale_lo, scale_hi = augmentation.CROP_SCALE
    target_area = width * height * (scale_lo + (scale_hi - scale_lo) * area_u)
    log_lo, log_hi = np.log(augmentation.CROP_RATIO)
    aspect = jnp.exp(log_lo + (log_hi - log_lo) * ratio_u)
    w = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(fits)
    centre_left, centre_top, centre_w, centre_h = augmentation.centre_crop_box(width, height)
    found = fits[first]
    w = jnp.where(found, w[first], centre_w)
    h = jnp.where(found, h[first], centre_h)
    left = jnp.where(found, jnp.floor(left_u * (width - w + 1)), centre_left).astype(jnp.int32)
    top = jnp.where(found, jnp.floor(top_u * (height - h + 1)), centre_top).astype(jnp.int32)
    return left, top, w, h


def bilinear_weights(start: jax.Array, length: jax.Array, size_in: int, size_out: int) -> jax.Array:
    """(size_out, size_in) weights of PIL's bilinear resize of input rows [start, start + length) to size_out rows:
    a triangle filter widened by the downscale factor, normalised over the rows inside the crop."""
    scale = length / size_out
    support = jnp.maximum(scale, 1.0)
    centre = (jnp.arange(size_out) + 0.5) * scale  # in crop coordinates
    local = jnp.arange(size_in) - start
    inside = (local >= 0) & (local < length)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs((local[None, :] + 0.5 - centre[:, None]) / support))
    weights = jnp.where(inside[None, :], weights, 0.0)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def resized_crop(image: jax.Array, box, size: int) -> jax.Array:
    """Crop `box` (left, top, w, h) of a float (H, W, 3) image and resize it to (size, size, 3)."""
    left, top, w, h = box
    rows = bilinear_weights(top, h, image.shape[0], size)
    columns = bilinear_weights(left, w, image.shape[1], size)
    precision = jax.lax.Precision.HIGHEST
    horizontal = jnp.einsum("ow,hwc->hoc", columns, image, precision=precision)
    return jnp.einsum("oh,hwc->owc", rows, horizontal, precision=precision)


def _to_uint8_levels(image: jax.Array) -> jax.Array:
    """PIL's float -> uint8 of its blends: truncate, clip to [0, 255]."""
    return jnp.clip(jnp.trunc(image), 0.0, 255.0)


def _luma(image: jax.Array) -> jax.Array:
    """PIL's RGB -> L conversion (fixed-point ITU-R 601-2 weights, rounded), as float levels (H, W)."""
    levels = image.astype(jnp.int32)
    luma = (levels[..., 0] * 19595 + levels[..., 1] * 38470 + levels[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(jnp.float32)


def _blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
    return _to_uint8_levels(degenerate + factor * (image - degenerate))


def _degenerate(image: jax.Array, operation: jax.Array | int) -> jax.Array:
    """The image ColorJitter's blend `operation` mixes with (PIL's ImageEnhance): black for brightness (0), the
    rounded mean luma for contrast (1), the luma for saturation (2)."""
    luma = _luma(image)
    degenerate = jnp.where(operation == 0, 0.0, jnp.where(operation == 1, jnp.floor(jnp.mean(luma) + 0.5), luma))
    return jnp.broadcast_to(degenerate[..., None], image.shape)


def brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(_degenerate(image, 0), image, factor)


def contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(_degenerate(image, 1), image, factor)


def saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(_degenerate(image, 2), image, factor)


def hue(image: jax.Array, shift: jax.Array) -> jax.Array:
    """Rotate the hue by `shift` turns (float HSV; PIL quantises H, S to bytes, so they differ by a few levels)."""
    rgb = image / 255.0
    high, low = jnp.max(rgb, axis=-1), jnp.min(rgb, axis=-1)
    chroma = high - low
    safe = jnp.where(chroma > 0, chroma, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    sector = jnp.where(high == r, ((g - b) / safe) % 6.0,
                       jnp.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))  # fmt: skip
    turns = (sector / 6.0 + shift) % 1.0
    # HSV -> RGB with the same value and chroma: channel n = v - c * clip(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6
    k = (jnp.array([5.0, 3.0, 1.0]) + 6.0 * turns[..., None]) % 6.0
    out = high[..., None] - chroma[..., None] * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
    return jnp.round(out * 255.0)


def color_jitter(image: jax.Array, key: jax.Array, strength: float = augmentation.JITTER) -> jax.Array:
    """ColorJitter(strength x 4): factors first, the four operations in a random order (torchvision's order).

    The hue shift (the costly one) runs once, between the blends drawn before it and those drawn after: a `switch`
    per position would, under `vmap`, compute all four operations at all four positions."""
    factor_key, hue_key, order_key = jax.random.split(key, 3)
    factors = jax.random.uniform(factor_key, (3,), minval=1 - strength, maxval=1 + strength)
    shift = jnp.trunc(jax.random.uniform(hue_key, (), minval=-strength, maxval=strength) * 255.0) / 255.0  # PIL's byte
    order = jax.random.permutation(order_key, 4)
    hue_position = jnp.argmax(order == 3)
    before = _blends(image, order, factors, jnp.arange(4) < hue_position)
    return _blends(hue(before, shift), order, factors, jnp.arange(4) > hue_position)


def _blends(image: jax.Array, order: jax.Array, factors: jax.Array, active: jax.Array) -> jax.Array:
    """The brightness / contrast / saturation blends of `order` at the `active` positions, in order (each is
    PIL's blend with another degenerate image: black, the mean luma, the luma)."""
    for position in range(4):
        operation = order[position]
        blended = _blend(_degenerate(image, operation), image, factors[jnp.minimum(operation, 2)])
        image = jnp.where(active[position] & (operation != 3), blended, image)
    return image


def augment_image(pixels: jax.Array, key: jax.Array) -> jax.Array:
    """uint8 (S, S, 3) -> the reference's training transform, normalised float32 (S, S, 3)."""
    size = pixels.shape[0]
    crop_key, flip_key, jitter_key = jax.random.split(key, 3)
    area_u, ratio_u = jax.random.uniform(crop_key, (2, augmentation.CROP_TRIES))
    top_u, left_u = jax.random.uniform(jax.random.fold_in(crop_key, 1), (2,))
    box = crop_box(area_u, ratio_u, top_u, left_u, pixels.shape[1], pixels.shape[0])
    image = jnp.round(resized_crop(pixels.astype(jnp.float32), box, size))
    choose_horizontal, flip_u, jitter_u = jax.random.uniform(flip_key, (3,))
    horizontal = (choose_horizontal < 0.5) & (flip_u < augmentation.HFLIP_P)
    vertical = (choose_horizontal >= 0.5) & (flip_u < augmentation.VFLIP_P)
    image = jnp.where(horizontal, image[:, ::-1], image)
    image = jnp.where(vertical, image[::-1], image)
    image = jnp.where(jitter_u < augmentation.JITTER_P, color_jitter(image, jitter_key), image)
    return normalize_image(image)


def normalize_image(levels: jax.Array) -> jax.Array:
    """ToTensor + Normalize(CLIP mean, std) of uint8 levels, channels last."""
    return (levels.astype(jnp.float32) / 255.0 - augmentation.CLIP_MEAN) / augmentation.CLIP_STD


# ----------------------------------------------------------------------------------------------- audio


def unit_gamma(key: jax.Array, shape: jax.Array, tries: int = GAMMA_TRIES) -> jax.Array:
    """Gamma(shape, scale 1 / shape) draws (mean 1), one per element of `shape`, by Marsaglia and Tsang's method
    with a fixed number of candidates: jax.random.gamma's per-element rejection loop took 1.8 s for one batch of
    8 x 1024 x 128 on one CPU core. Shapes under 1 draw at shape + 1 and scale by U^(1 / shape). Each candidate is
    accepted with probability over 0.95 for shape >= 1; when all `tries` fail (under 1e-5) the draw is the mean."""
    boosted = jnp.maximum(shape, 1.0)
    boosted = jnp.where(shape < 1.0, shape + 1.0, boosted)
    d = boosted - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)
    normal_key, uniform_key, boost_key = jax.random.split(key, 3)
    x = jax.random.normal(normal_key, (tries, *shape.shape))
    log_u = jnp.log(jax.random.uniform(uniform_key, (tries, *shape.shape), minval=jnp.finfo(jnp.float32).tiny))
    v = (1.0 + c * x) ** 3
    accepted = (v > 0) & (log_u < 0.5 * x**2 + d - d * v + d * jnp.log(jnp.where(v > 0, v, 1.0)))
    draw = boosted
    for candidate in reversed(range(tries)):  # the first accepted, by selects: a gather read 40 GB a v5e step
        draw = jnp.where(accepted[candidate], d * v[candidate], draw)
    boost = jax.random.uniform(boost_key, shape.shape, minval=jnp.finfo(jnp.float32).tiny) ** (1.0 / shape)
    return jnp.where(shape < 1.0, draw * boost, draw) / shape


def add_noise(power: jax.Array, gamma: jax.Array, config: audio.FbankConfig) -> jax.Array:
    """power + the white noise's mel power, from unit-mean Gamma draws `gamma` (frames, bins)."""
    mean, _ = augmentation.noise_mel_statistics(config)
    return power + jnp.asarray(mean, jnp.float32) * gamma


def shift(power: jax.Array, frames: jax.Array) -> jax.Array:
    """Roll the first `frames` rows by s = round(0.1 x frames), as np.roll of the real frames: rows s.. come from a
    roll of the whole array by s, rows ..s from a roll by s - frames (two dynamic slices: a gather of rows by
    index costs TPUs far more, 40x in the compiled augmentation's bytes)."""
    offset = jnp.round(augmentation.SHIFT_FRACTION * frames).astype(jnp.int32)
    rows = jnp.arange(power.shape[0])[:, None]
    return jnp.where(rows < offset, jnp.roll(power, offset - frames, axis=0), jnp.roll(power, offset, axis=0))


def stretch(power: jax.Array, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Resample the first `frames` rows along time by 1 / 0.85 (linear), cut to the fixed length: (power, frames).

    Output row i reads rows floor(i x 17 / 20) and the next, with fraction (i x 17 mod 20) / 20: every 20 output
    rows come from 17 input rows and the one after, by one fixed (20, 18) interpolation matrix (exact fractions;
    float32 positions near row 870 would be off by 6e-5). No gather by row index (TPUs run those row by row) and no
    20-way concatenation (XLA:CPU ran that at 300 ns an element). Rows past the last real frame read that frame."""
    numerator, denominator = STRETCH_FRACTION.numerator, STRETCH_FRACTION.denominator
    rows, bins = power.shape
    groups = -(-rows // denominator)
    padded = jnp.pad(power, ((0, groups * numerator + 1 - min(rows, groups * numerator + 1)), (0, 0)))
    grouped = padded[: groups * numerator].reshape(groups, numerator, bins)
    following = padded[numerator : groups * numerator + 1 : numerator][:, None]  # each group's next row
    extended = jnp.concatenate([grouped, following], axis=1)  # (groups, 18, bins)
    stretched = jnp.einsum("ok,gkb->gob", _interpolation(numerator, denominator), extended,
                           precision=jax.lax.Precision.HIGHEST).reshape(-1, bins)[:rows]  # fmt: skip
    last = jax.lax.dynamic_slice_in_dim(power, frames - 1, 1, axis=0)
    past_last = (np.arange(rows) * numerator // denominator >= frames - 1)[:, None]
    length = jnp.minimum(jnp.round(frames / augmentation.STRETCH_RATE).astype(jnp.int32), rows)
    return jnp.where(past_last, last, stretched), length


@functools.lru_cache(maxsize=4)
def _interpolation(numerator: int, denominator: int) -> np.ndarray:
    """(denominator, numerator + 1) float32: output row r of a group = (1 - f) x input row floor(r n / d) + f x the
    next, f = (r n mod d) / d."""
    weights = np.zeros((denominator, numerator + 1), np.float32)
    for r in range(denominator):
        lower, fraction = divmod(r * numerator, denominator)
        weights[r, lower] += np.float32(1 - fraction / denominator)
        weights[r, lower + 1] += np.float32(fraction / denominator)
    return weights


def augment_features(features: jax.Array, frames: jax.Array, key: jax.Array, config: audio.FbankConfig,
                     p: float = augmentation.AUDIO_P) -> jax.Array:  # fmt: skip
    """(max_frames, bins) stored AST features (float16) -> augmented float32 features, padding kept."""
    features = features.astype(jnp.float32)
    order_key, fire_key, gamma_key = jax.random.split(key, 3)
    _, gamma_shape = augmentation.noise_mel_statistics(config)
    gamma_shape = jnp.asarray(gamma_shape, jnp.float32)
    gamma = unit_gamma(gamma_key, jnp.broadcast_to(gamma_shape, features.shape))
    fires = (jax.random.uniform(fire_key, (4,)) < p) & (frames > 0)
    order = jax.random.permutation(order_key, 4)
    power = jnp.exp(audio.denormalize(features, config))
    length = frames
    for position in range(4):  # operation 3, polarity inversion, leaves the power spectrum as it is
        operation, fire = order[position], fires[position]
        noisy = add_noise(power, gamma, config)
        shifted = shift(power, length)
        stretched, stretched_length = stretch(power, length)
        changed = jnp.select([operation == 0, operation == 1, operation == 2], [noisy, shifted, stretched], power)
        power = jnp.where(fire & (operation != 3), changed, power)
        length = jnp.where(fire & (operation == 2), stretched_length, length)
    changed_any = jnp.any(fires & (order != 3))
    floored = audio.normalize(jnp.log(jnp.maximum(power, audio.FLOAT32_EPS)), config)
    kept = jnp.maximum(features, np.float32(audio.normalize(np.log(audio.FLOAT32_EPS), config)))
    out = jnp.where(changed_any, floored, kept)
    return jnp.where(jnp.arange(features.shape[0])[:, None] < length, out, np.float32(config.padding_value))


# ----------------------------------------------------------------------------------------------- batch


def augment_batch(batch: dict, config: audio.FbankConfig, audio_p: float = augmentation.AUDIO_P) -> dict:
    """A raw training batch (`RAW_FIELDS`: uint8 images, float16 features, real frame counts, uint32 (2,) seeds)
    -> the model's batch, each example augmented with its own key. Other fields pass through."""
    keys = jax.vmap(jax.random.wrap_key_data)(batch["augment_seed"])
    split = jax.vmap(jax.random.split)(keys)
    image_keys, audio_keys = split[:, 0], split[:, 1]
    augmented = {
        "image": jax.vmap(augment_image)(batch["image"], image_keys),
        "audio": jax.vmap(functools.partial(augment_features, config=config, p=audio_p))(
            batch["audio"], batch["audio_frames"], audio_keys),
    }  # fmt: skip
    rest = {name: value for name, value in batch.items() if name not in RAW_FIELDS}
    return jax.lax.stop_gradient({**rest, **augmented})
