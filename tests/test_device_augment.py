"""The accelerator's augmentations (synergy_jax/device_augment.py) against the host's PIL / numpy ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from data_pipelines import augment as host
from synergy_jax import audio, augmentation
from synergy_jax import device_augment as device

FBANK = audio.FbankConfig()


def host_crop_box(area_u, ratio_u, top_u, left_u, width, height):
    """torchvision's get_params loop, as data_pipelines/augment.py runs it, fed the given uniforms."""
    area = width * height
    log_ratio = np.log(host.CROP_RATIO)
    for a, r in zip(area_u, ratio_u):
        target_area = area * (host.CROP_SCALE[0] + (host.CROP_SCALE[1] - host.CROP_SCALE[0]) * a)
        aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * r)
        w, h = int(round(np.sqrt(target_area * aspect))), int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(left_u * (width - w + 1)), int(top_u * (height - h + 1)), w, h
    in_ratio = width / height  # no try fits: a centre crop of the clamped aspect
    if in_ratio < host.CROP_RATIO[0]:
        w, h = width, int(round(width / host.CROP_RATIO[0]))
    elif in_ratio > host.CROP_RATIO[1]:
        w, h = int(round(height * host.CROP_RATIO[1])), height
    else:
        w, h = width, height
    return None, ((width - w) // 2, (height - h) // 2, w, h)


@pytest.mark.parametrize("width,height", [(224, 224), (64, 40), (30, 90)])
def test_crop_boxes_follow_torchvision_for_the_same_uniforms(width, height):
    rng = np.random.default_rng(width)
    fallbacks = 0
    for trial in range(300):
        area_u, ratio_u = rng.uniform(size=(2, 10))
        if trial % 10 == 0:  # boxes that never fit (wider than a tall image): the centre-crop fallback
            ratio_u[:] = 1.0 if width < height else 0.0
            area_u[:] = 1.0
        top_u, left_u = rng.uniform(size=2)
        box = tuple(int(v) for v in device.crop_box(area_u, ratio_u, top_u, left_u, width, height))
        expected = host_crop_box(area_u, ratio_u, top_u, left_u, width, height)
        if expected[0] is None:
            fallbacks += 1
            expected = expected[1]
        assert box == expected, (trial, box, expected)
    assert fallbacks > 0 or width == height


@pytest.mark.parametrize("box", [(0, 0, 48, 48), (5, 9, 20, 31), (30, 2, 11, 7), (1, 1, 46, 40)])
def test_resized_crop_is_pils_crop_and_bilinear_resize(box):
    rng = np.random.default_rng(sum(box))
    pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    left, top, w, h = box
    expected = np.asarray(Image.fromarray(pixels).crop((left, top, left + w, top + h)).resize((48, 48), Image.BILINEAR))
    ours = np.round(np.asarray(device.resized_crop(jnp.asarray(pixels, jnp.float32), jnp.asarray(box), 48)))
    assert np.abs(ours - expected).max() <= 1  # PIL rounds to uint8 between its two passes


def test_whole_image_crop_is_the_image():
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8).astype(np.float32)
    np.testing.assert_allclose(device.resized_crop(jnp.asarray(pixels), jnp.asarray((0, 0, 32, 32)), 32), pixels,
                               atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("factor", [0.925, 0.97, 1.03, 1.075])
def test_brightness_contrast_saturation_are_pils_blends(factor):
    rng = np.random.default_rng(1)  # a red-heavy image: its luma mean is far from its RGB mean
    pixels = np.stack([rng.integers(150, 256, (40, 40)), rng.integers(0, 120, (40, 40)), rng.integers(0, 60, (40, 40))],
                      axis=-1).astype(np.uint8)  # fmt: skip
    image = Image.fromarray(pixels)
    x = jnp.asarray(pixels, jnp.float32)
    for ours, enhancer in ((device.brightness, ImageEnhance.Brightness), (device.contrast, ImageEnhance.Contrast),
                           (device.saturation, ImageEnhance.Color)):  # fmt: skip
        expected = np.asarray(enhancer(image).enhance(factor)).astype(np.float32)
        difference = np.abs(np.asarray(ours(x, jnp.float32(factor))) - expected)
        assert difference.max() <= 1 and difference.mean() < 0.05, (ours.__name__, difference.max())


@pytest.mark.parametrize("shift", [-0.075, -0.02, 0.0, 0.05])
def test_hue_shift_is_close_to_pils(shift):
    pixels = np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    expected = np.asarray(host.adjust_hue(Image.fromarray(pixels), shift)).astype(np.float32)
    quantised = np.trunc(shift * 255) / 255
    ours = np.asarray(device.hue(jnp.asarray(pixels, jnp.float32), jnp.float32(quantised)))
    difference = np.abs(ours - expected)
    assert np.median(difference) <= 1 and np.percentile(difference, 99) <= 6, (difference.max(), difference.mean())
    if shift == 0.0:
        np.testing.assert_allclose(ours, pixels, atol=0.5)


@pytest.mark.parametrize("seed", range(6))
def test_color_jitter_applies_its_four_operations_once_each_in_the_drawn_order(seed):
    pixels = jnp.asarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3)), jnp.float32)
    key = jax.random.key(seed)
    factor_key, hue_key, order_key = jax.random.split(key, 3)  # the draws color_jitter makes, in its order
    factors = jax.random.uniform(factor_key, (3,), minval=1 - augmentation.JITTER, maxval=1 + augmentation.JITTER)
    shift = jnp.trunc(jax.random.uniform(hue_key, (), minval=-augmentation.JITTER, maxval=augmentation.JITTER) * 255.0) / 255.0
    expected = pixels
    for op in np.asarray(jax.random.permutation(order_key, 4)):
        operation = (device.brightness, device.contrast, device.saturation, device.hue)[op]
        expected = operation(expected, shift if op == 3 else factors[op])
    np.testing.assert_array_equal(jax.jit(device.color_jitter)(pixels, key), expected)


def test_normalisation_equals_the_hosts():
    pixels = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_allclose(device.normalize_image(jnp.asarray(pixels)),
                               host.to_normalized_array(Image.fromarray(pixels)), rtol=1e-6, atol=1e-6)  # fmt: skip


# ----------------------------------------------------------------------------------------------- audio


def stored_features(real_frames: int, seed: int = 0) -> np.ndarray:
    """float16 features as precompute stores them: a log-mel-like real part, padding after."""
    rng = np.random.default_rng(seed)
    log_mel = np.log(np.maximum(rng.gamma(0.5, 1e-3, (real_frames, FBANK.num_mel_bins)), audio.FLOAT32_EPS))
    return audio.normalize(audio.pad_or_truncate(log_mel, FBANK.max_frames), FBANK).astype(np.float16)


def host_power(features, frames):
    return np.exp(audio.denormalize(features[:frames].astype(np.float64), FBANK))


@pytest.mark.parametrize("frames", [997, 1024, 300])
def test_shift_and_stretch_equal_the_hosts(frames):
    features = stored_features(frames)
    power = jnp.exp(audio.denormalize(jnp.asarray(features, jnp.float32), FBANK))
    expected = host._shift(host_power(features, frames))
    np.testing.assert_allclose(np.asarray(device.shift(power, jnp.int32(frames)))[:frames], expected, rtol=2e-6)
    stretched, length = device.stretch(power, jnp.int32(frames))
    expected = host._stretch(host_power(features, frames), FBANK.max_frames)
    assert int(length) == expected.shape[0]
    np.testing.assert_allclose(np.asarray(stretched)[: int(length)], expected, rtol=2e-6)


def test_noise_adds_the_mean_noise_power_per_bin():
    power = jnp.zeros((FBANK.max_frames, FBANK.num_mel_bins))
    mean, _ = host.noise_mel_statistics(FBANK)
    np.testing.assert_allclose(device.add_noise(power, jnp.ones_like(power), FBANK)[5], mean, rtol=1e-6)


@pytest.mark.parametrize("shape", [0.994, 1.0, 1.35, 3.3])
def test_unit_gamma_draws_follow_the_gamma_law(shape):
    draws = np.asarray(device.unit_gamma(jax.random.key(7), jnp.full((200_000,), shape, jnp.float32)))
    exact = np.random.default_rng(0).gamma(shape, 1.0 / shape, 200_000)
    assert (draws > 0).all()
    assert abs(draws.mean() - 1.0) < 0.01 and abs(draws.var() - 1.0 / shape) < 0.03
    quantiles = [0.01, 0.1, 0.5, 0.9, 0.99]
    np.testing.assert_allclose(np.quantile(draws, quantiles), np.quantile(exact, quantiles), rtol=0.03, atol=2e-4)


def _features_with(operations: list[int], features, frames):
    """Device features with exactly `operations` firing in that order (the key's own draws patched)."""
    fires = np.zeros(4, bool)
    fires[: len(operations)] = True
    order = np.array(operations + [op for op in range(4) if op not in operations])
    with _patched_draws(order, fires):
        return np.asarray(device.augment_features(jnp.asarray(features), jnp.int32(frames), jax.random.key(0), FBANK))


class _patched_draws:
    """Make `augment_features` see a given operation order and firing pattern."""

    def __init__(self, order, fires):
        self.order, self.fires = order, fires

    def __enter__(self):
        self.permutation, self.uniform = jax.random.permutation, jax.random.uniform
        jax.random.permutation = lambda key, n: jnp.asarray(self.order)
        uniform = self.uniform
        jax.random.uniform = lambda key, shape, **kw: (
            jnp.where(jnp.asarray(self.fires), 0.0, 1.0) if shape == (4,) else uniform(key, shape, **kw))

    def __exit__(self, *exc):
        jax.random.permutation, jax.random.uniform = self.permutation, self.uniform


@pytest.mark.parametrize("operations", [[1], [2], [2, 1], [1, 2], [3]])
def test_feature_operations_equal_the_hosts(operations):
    frames = 900
    features = stored_features(frames, seed=len(operations))
    power = host_power(features, frames)
    for op in operations:
        if op == 1:
            power = host._shift(power)
        elif op == 2:
            power = host._stretch(power, FBANK.max_frames)
    if operations == [3]:  # nothing that changes the power spectrum: the stored features, floored
        expected = host._untouched(features.astype(np.float32), frames, FBANK)
    else:
        log_mel = np.log(np.maximum(power, audio.FLOAT32_EPS))
        expected = audio.normalize(audio.pad_or_truncate(log_mel, FBANK.max_frames), FBANK).astype(np.float32)
    ours = _features_with(operations, features, frames)
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_audio_noise_raises_quiet_bins_and_keeps_padding():
    frames = 500
    features = stored_features(frames)
    ours = _features_with([0], features, frames)
    assert (ours[:frames] >= features[:frames].astype(np.float32) - 1e-3).all()
    assert (ours[:frames] > features[:frames].astype(np.float32) + 0.1).mean() > 0.5  # quiet bins gain noise
    np.testing.assert_array_equal(ours[frames:], np.float32(FBANK.padding_value))


# ----------------------------------------------------------------------------------------------- batch


def raw_batch(size: int = 4) -> dict:
    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8),
        "audio": np.stack([stored_features(100 * (i + 1), i) for i in range(size)]),
        "audio_frames": np.arange(1, size + 1, dtype=np.int32) * 100,
        "augment_seed": rng.integers(0, 2**32, (size, 2), dtype=np.uint32),
        "input_ids": np.ones((size, 8), np.int32),
    }


def test_train_step_augments_each_batch_on_the_mesh():
    """`make_train_step(..., prepare=augment_batch)` on an 8-device mesh: the loss of the batch augmented first."""
    from synthetic import random_batch, tiny_config

    from synergy_jax import losses, parallel, train
    from synergy_jax.models import synergy

    config = tiny_config(dropout=False)
    mesh = parallel.make_mesh("8x1")
    model, tx = synergy.SynergyCLIP(config), train.make_optimizer(train.optimizer_config())
    example = synergy.example_batch(config, 1, 8)
    state, shardings = train.create_train_state(model, tx, mesh, "tp", example, jax.random.PRNGKey(0))
    fbank = audio.FbankConfig(max_frames=config.audio.max_length, num_mel_bins=config.audio.num_mel_bins)
    rng = np.random.default_rng(0)
    text = random_batch(config, 8)
    size = config.vision.image_size
    raw = {"image": rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8),
           "audio": rng.normal(size=(8, fbank.max_frames, fbank.num_mel_bins)).astype(np.float16),
           "audio_frames": np.full(8, fbank.max_frames - 10, np.int32),
           "augment_seed": rng.integers(0, 2**32, (8, 2), dtype=np.uint32),
           "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}  # fmt: skip
    prepare = lambda batch: device.augment_batch(batch, fbank, audio_p=0.9)  # noqa: E731
    augmented = jax.device_get(jax.jit(prepare)(raw))
    plain = train.make_train_step(model, tx, losses.LossConfig(), mesh, shardings)
    expected = float(plain(jax.tree.map(jnp.copy, state), parallel.global_batch(augmented, mesh))[1]["loss"])
    step = train.make_train_step(model, tx, losses.LossConfig(), mesh, shardings, prepare=prepare)
    _, metrics = step(state, parallel.global_batch(raw, mesh))
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)


def test_batch_is_augmented_per_example_and_deterministic_per_seed():
    batch = raw_batch()
    augment = jax.jit(lambda b: device.augment_batch(b, FBANK, audio_p=0.9))
    out = augment(batch)
    assert set(out) == {"image", "audio", "input_ids"}
    assert out["image"].shape == (4, 32, 32, 3) and out["image"].dtype == jnp.float32
    assert out["audio"].shape == batch["audio"].shape and out["audio"].dtype == jnp.float32
    np.testing.assert_array_equal(out["input_ids"], batch["input_ids"])
    again = augment(batch)
    np.testing.assert_array_equal(out["image"], again["image"])
    np.testing.assert_array_equal(out["audio"], again["audio"])
    plain = device.normalize_image(batch["image"])
    assert all(np.abs(np.asarray(out["image"][i] - plain[i])).max() > 0.1 for i in range(4))  # each one changed
    reseeded = augment({**batch, "augment_seed": batch["augment_seed"] + 1})
    assert np.abs(np.asarray(reseeded["image"] - out["image"])).max() > 0.1
    for i, frames in enumerate(batch["audio_frames"]):  # padding stays padding, unless a stretch lengthened it
        tail = np.asarray(out["audio"][i, int(frames / augmentation.STRETCH_RATE) + 2 :])
        np.testing.assert_array_equal(tail, np.float32(FBANK.padding_value))
