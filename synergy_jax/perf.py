"""Analytic training FLOPs and model FLOPs utilisation (MFU).

FLOPs are counted analytically (matmuls, 2 per multiply-add; see `SynergyConfig.forward_flops`): a train step costs
3 forwards per sample (forward + backward), 4 with remat (the forward is recomputed). Peak numbers are the vendors'
dense bf16 figures per chip; float32 peaks on TPU/GPU are not comparable, so MFU is reported against bf16 peak.
"""

from __future__ import annotations

import jax

from synergy_jax.models.synergy import SynergyConfig

# Dense bf16 peak FLOP/s per device, by (a prefix of) `jax.Device.device_kind`.
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
}


def train_flops_per_sample(config: SynergyConfig, text_length: int, remat: bool) -> int:
    """Matmul FLOPs of one training sample (one image, one text, one clip) through forward and backward."""
    return (4 if remat else 3) * config.forward_flops(text_length)


def peak_flops_per_device(device: jax.Device | None = None, override_tflops: float = 0.0) -> float | None:
    """Peak bf16 FLOP/s of one device, or None when unknown (e.g. CPU) and not given."""
    if override_tflops > 0:
        return override_tflops * 1e12
    kind = (device or jax.devices()[0]).device_kind
    for prefix in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_BF16_FLOPS[prefix]
    return None


def mfu(samples_per_second_per_device: float, flops_per_sample: int, peak: float | None) -> float | None:
    """Achieved model FLOP/s over peak, or None when the peak is unknown."""
    if peak is None:
        return None
    return samples_per_second_per_device * flops_per_sample / peak
