"""Reconstruction losses and metrics of Missing Modality Reconstruction (docs/reference.md R4.4).

Every function is pure and works on NHWC (images: (B, H, W, 3); spectrograms: (B, frames, mel, 1)) float arrays:

- `ssim`: pytorch_msssim 1.0.0's `ssim` (Gaussian window 11, sigma 1.5, separable *valid* convolution, K1 0.01,
  K2 0.03, mean over the map, then channels, then batch; a dimension shorter than the window is not smoothed).
- `psnr`: 20 log10(data_range / sqrt(MSE)) over the whole batch, as the reference's utils.PSNR.
- `bicubic_resize`: torch `interpolate(mode='bicubic', align_corners=False, antialias=False)` (Keys a = -0.75,
  border taps clamped). `jax.image.resize` uses a = -0.5 and antialiases when shrinking, so it does not match.
- `image_loss` / `audio_loss`: alpha*(1-SSIM) + (1-alpha)*(MSE [+ L1]); alpha 0.75 as the reference hard-codes;
  the audio SSIM takes a data range (the reference's 1.0 is a bug for features spanning about 3).
- `token_metrics`: text cross-entropy and token accuracy over non-pad tokens, and the reference's pad-inclusive
  figures (docs/reference.md bug 19).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K = (0.01, 0.03)
BICUBIC_A = -0.75  # torch's cubic convolution constant
ALPHA = 0.75  # weight of (1 - SSIM), hard-coded at the reference's call sites (docs/reference.md bug 40)


# ------------------------------------------------------------------------------------------------ resize


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 from floor(x), t = x - floor(x)."""
    x = np.stack([t + 1.0, t, 1.0 - t, 2.0 - t], axis=-1)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x <= 1.0, near, far)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, a: float = BICUBIC_A) -> np.ndarray:
    """(out, in) matrix of torch's 1-D bicubic interpolation (align_corners=False, no antialias), in float64.

    Source coordinate (o + 0.5) * in/out - 0.5, not clamped below zero (torch's cubic path); the 4 taps' indices
    are clamped to the border, so weights of out-of-range taps land on the edge pixel.
    """
    scale = in_size / out_size
    src = (np.arange(out_size) + 0.5) * scale - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base, a)
    matrix = np.zeros((out_size, in_size))
    for tap in range(4):
        index = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), index), weights[:, tap])
    matrix.setflags(write=False)
    return matrix


def bicubic_resize(x: jax.Array, height: int, width: int) -> jax.Array:
    """Resizes (B, H, W, C) to (B, height, width, C) as torch's bicubic interpolate (see module docstring)."""
    rows = jnp.asarray(bicubic_matrix(x.shape[1], height), jnp.float32)
    cols = jnp.asarray(bicubic_matrix(x.shape[2], width), jnp.float32)
    x = x.astype(jnp.float32)
    return jnp.einsum("oh,bhwc,pw->bopc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)


# ------------------------------------------------------------------------------------------------ SSIM / PSNR


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """pytorch_msssim's normalised 1-D Gaussian window (float32)."""
    coords = np.arange(size, dtype=np.float32) - size // 2
    g = np.exp(-(coords**2) / (2 * sigma**2)).astype(np.float32)
    return g / g.sum()


def _valid_filter(x: jax.Array, window: jax.Array, axis: int) -> jax.Array:
    """Valid 1-D correlation of `x` with `window` along `axis` (skipped when the axis is shorter, as the reference)."""
    size = window.shape[0]
    length = x.shape[axis]
    if length < size:
        return x
    slices = [jax.lax.slice_in_dim(x, k, k + length - size + 1, axis=axis) for k in range(size)]
    return sum(w * s for w, s in zip(window, slices))


def _gaussian_filter(x: jax.Array, window: jax.Array) -> jax.Array:
    return _valid_filter(_valid_filter(x, window, 1), window, 2)


def ssim_per_channel(x: jax.Array, y: jax.Array, data_range: float = 1.0) -> jax.Array:
    """(B, C) mean SSIM of each image and channel (inputs (B, H, W, C))."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    window = jnp.asarray(gaussian_window())
    c1, c2 = (SSIM_K[0] * data_range) ** 2, (SSIM_K[1] * data_range) ** 2
    mu_x, mu_y = _gaussian_filter(x, window), _gaussian_filter(y, window)
    sigma_xx = _gaussian_filter(x * x, window) - mu_x * mu_x
    sigma_yy = _gaussian_filter(y * y, window) - mu_y * mu_y
    sigma_xy = _gaussian_filter(x * y, window) - mu_x * mu_y
    contrast_structure = (2 * sigma_xy + c2) / (sigma_xx + sigma_yy + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return jnp.mean(luminance * contrast_structure, axis=(1, 2))


def ssim(x: jax.Array, y: jax.Array, data_range: float = 1.0) -> jax.Array:
    """Scalar SSIM averaged over batch and channels (pytorch_msssim `ssim(..., size_average=True)`)."""
    return jnp.mean(ssim_per_channel(x, y, data_range))


def mse(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))


def l1(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))


def psnr_from_mse(mean_squared_error: jax.Array, data_range: float = 1.0) -> jax.Array:
    """20 log10(data_range / sqrt(MSE)) (the reference's utils.PSNR)."""
    return 20.0 * jnp.log10(data_range / jnp.sqrt(mean_squared_error))


# ------------------------------------------------------------------------------------------------ task losses


def image_loss(recon: jax.Array, target: jax.Array, alpha: float = ALPHA) -> dict[str, jax.Array]:
    """alpha*(1-SSIM) + (1-alpha)*(MSE+L1) on (B, H, W, 3) (model.py:708-712)."""
    pixel = mse(recon, target) + l1(recon, target)
    ssim_loss = 1.0 - ssim(recon, target)
    return {"loss": alpha * ssim_loss + (1 - alpha) * pixel, "pixel_loss": pixel, "ssim_loss": ssim_loss}


def audio_loss(
    recon: jax.Array, target: jax.Array, alpha: float = ALPHA, data_range: float = 1.0
) -> dict[str, jax.Array]:
    """alpha*(1-SSIM) + (1-alpha)*MSE on (B, frames, mel, 1) (model.py:634-639: the reference's L1 is commented out).

    `data_range` of the SSIM: the reference passes 1.0 although AST features span about 3 (docs/reference.md bug 15), which
    shrinks SSIM's stabilising constants C1, C2 ninefold relative to the signal; the job passes the training
    targets' range unless `reference_audio_ssim_data_range` is set.
    """
    pixel = mse(recon, target)
    ssim_loss = 1.0 - ssim(recon, target, data_range)
    return {"loss": alpha * ssim_loss + (1 - alpha) * pixel, "pixel_loss": pixel, "ssim_loss": ssim_loss}


def token_metrics(logits: jax.Array, ids: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Cross-entropy and argmax accuracy over the tokens where `mask` is 1, and over every position (the reference).

    `logits` (B, L, V), `ids` and `mask` (B, L). Sums and counts are returned too, so callers can pool batches.
    """
    logits = logits.astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == ids).astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    return {
        "ce": jnp.sum(nll * mask) / count,
        "accuracy": jnp.sum(correct * mask) / count,
        "ce_with_pads": jnp.mean(nll),
        "accuracy_with_pads": jnp.mean(correct),
        "tokens": jnp.sum(mask),
        "nll_sum": jnp.sum(nll * mask),
        "correct_sum": jnp.sum(correct * mask),
        "nll_sum_with_pads": jnp.sum(nll),
        "correct_sum_with_pads": jnp.sum(correct),
        "positions": jnp.asarray(nll.size, jnp.float32),
    }
