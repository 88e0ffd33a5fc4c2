"""The mesh context of the code being traced: the platform it will run on, for the layers that pick a formulation
per backend (`attention`, `matmul`), and the batch split that activations are pinned to (`batch_sharded`)."""

from __future__ import annotations

import jax


def traced_platform() -> str:
    """The mesh context's platform (so a step traced for a TPU topology on a CPU host picks TPU kernels), else JAX's
    default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device  # None for a mesh built from shapes and names alone
    return jax.default_backend() if device is None else device.platform


def batch_sharded(x: jax.Array, *, others_free: bool = False) -> jax.Array:
    """`x` split over the mesh's 'data' axis along its batch dimension, under a mesh context (`parallel.on_mesh`
    sets one for every job's step and evaluation forward); unchanged without one. Its other dimensions are
    replicated, or with `others_free` left to XLA (attention's heads stay split over 'model' under tensor
    parallelism).

    Under FSDP the weights are split over 'data' too, and nothing else tells XLA which of the two to gather for a
    matmul: left alone it gathered the whole global batch's activations onto every chip (Large on a v5e-8:
    out of memory whatever the batch). Pinned here, it gathers the weights, as FSDP means."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "data" not in mesh.axis_names:
        return x
    if mesh.axis_types[mesh.axis_names.index("data")] != jax.sharding.AxisType.Auto:
        return x  # inside a shard_map 'data' is a manual axis: there is no split to pin
    rest = (jax.sharding.PartitionSpec.UNCONSTRAINED,) * (x.ndim - 1) if others_free else ()
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec("data", *rest))
