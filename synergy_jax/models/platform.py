"""The platform the code being traced will run on, for the layers that pick a formulation per backend
(`attention`, `matmul`)."""

from __future__ import annotations

import jax


def traced_platform() -> str:
    """The mesh context's platform (so a step traced for a TPU topology on a CPU host picks TPU kernels), else JAX's
    default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device  # None for a mesh built from shapes and names alone
    return jax.default_backend() if device is None else device.platform
