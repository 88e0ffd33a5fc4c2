"""Model FLOPs utilisation: analytic training FLOPs per sample over the devices' peak.

Training FLOPs per (image, text, audio) triple = 3 x forward (forward + backward at 2x), +1 forward when blocks are
rematerialised (the backward pass recomputes them); the forward count is `SynergyConfig.forward_flops` (matmuls
only). Peaks are dense bf16 per chip from the vendors' data sheets; an fp32 run is measured against the same peak
(that is what MFU means), so expect low numbers with `dtype=float32`.
"""

from __future__ import annotations

# Dense bf16 TFLOP/s per JAX device (a chip from v4 on, a TensorCore on v2/v3), matched against
# `jax.Device.device_kind` by substring (first match wins, so more specific names come first).
PEAK_TFLOPS = (
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
    ("TPU v3", 61.5),  # 123 per chip; a v2/v3 chip is two JAX devices (TensorCores)
    ("TPU v2", 22.5),  # 45 per chip
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
    ("A10G", 125.0),
)


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override when positive, else the table; None when unknown (e.g. CPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops * 1e12
    return None


def train_flops_per_sample(forward_flops: int, remat: bool) -> int:
    return (4 if remat else 3) * forward_flops


def mfu(samples_per_second: float, flops_per_sample: int, num_devices: int, peak_per_device: float | None) -> float | None:
    """Achieved / peak FLOP/s over all devices; None without a peak."""
    if peak_per_device is None or samples_per_second <= 0:
        return None
    return samples_per_second * flops_per_sample / (num_devices * peak_per_device)
