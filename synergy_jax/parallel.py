"""Device meshes and shardings: `--mesh=DxM` -> a ('data', 'model') mesh, logical-axis rules -> NamedShardings.

Parameters carry logical axis names (see synergy_jax/models/layers.py). A rule set maps names to mesh axes:

- `replicate`: every parameter on every device (the default for Base; pure data parallelism).
- `fsdp`: the `embed` dimension of every parameter split over 'data' (ZeRO-3 style); XLA all-gathers a layer's
  weights when it runs and reduce-scatters its gradients. For Large on small-HBM chips.
- `tp`: Megatron-style tensor parallelism over 'model': q/k/v and the first MLP kernel split by output columns
  (`heads`, `mlp`), the attention-output and second MLP kernel split by input rows (`heads`, `mlp`), embeddings
  split by `vocab`. On a Dx1 mesh it is the same as `replicate`.
- `fsdp_tp`: both.

A dimension that does not divide evenly over its mesh axis stays unsplit (e.g. a 3-row token-type table), and a
mesh axis is used at most once per parameter. Under `tp` a matrix whose rule-named dimension does not divide
(RoBERTa's 50265-row vocabulary on any even model axis; 12 heads on a model axis of 8) falls back to splitting its
`embed` dimension over 'model' instead of staying whole on every device.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

AXES = ("data", "model")

RULES: dict[str, dict[str, str]] = {
    "replicate": {},
    "fsdp": {"embed": "data"},
    "tp": {"heads": "model", "mlp": "model", "vocab": "model"},
    "fsdp_tp": {"embed": "data", "heads": "model", "mlp": "model", "vocab": "model"},
}
# Second-choice rules, for matrices that the first rules left without any split over that mesh axis.
FALLBACK_RULES: dict[str, dict[str, str]] = {"tp": {"embed": "model"}}


def parse_mesh(spec: str, num_devices: int) -> tuple[int, int]:
    """'8x1', '-1x2', '2x-1' -> (data, model) sizes whose product is `num_devices` (-1 = the rest)."""
    parts = spec.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) != 2:
        raise ValueError(f"--mesh={spec!r} is not of the form DxM (e.g. 8x1, 4x2, -1x1 for 'all devices on data')")
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ValueError(f"--mesh={spec!r}: each axis is a size of at least 1, or -1 (the rest) for one axis at most "
                         f"(e.g. {num_devices}x1, -1x1)")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise ValueError(f"--mesh={spec!r}: {num_devices} devices are not divisible by {known}")
        sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"--mesh={spec!r} asks for {sizes[0]}x{sizes[1]}={math.prod(sizes)} devices but this job has "
            f"{num_devices} ({jax.default_backend()}); use e.g. --mesh={num_devices}x1 or --mesh=-1x1"
        )
    return sizes[0], sizes[1]


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ('data', 'model') mesh for a DxM spec over all (or the given) devices, with Auto axes."""
    auto = (jax.sharding.AxisType.Auto,) * 2
    if devices is None:
        mesh = jax.make_mesh(parse_mesh(spec, jax.device_count()), AXES, axis_types=auto)
    else:
        mesh = Mesh(np.asarray(devices).reshape(parse_mesh(spec, len(devices))), AXES, axis_types=auto)
    connect_cpu_collectives(mesh)
    return mesh


def connect_cpu_collectives(mesh: Mesh) -> None:
    """On a multi-process CPU mesh, opens the gloo communicators of the mesh's axes now, while the processes are in
    step (the jobs make their mesh right after `jax.distributed.initialize`).

    Gloo connects a group of devices at its first collective and gives a late peer 30 s to join, a limit JAX does
    not expose. Left to the first train step, the group would be opened only after each process has compiled the
    step on its own, and on a busy machine the two compiles can end more than 30 s apart: the step then fails
    with 'Gloo context initialization failed' and the peer hangs in the collective. An open communicator is kept
    for the life of the process, and a collective on it waits for a late peer as long as it takes.

    It is itself a collective: every process must make the same meshes in the same order (the jobs make one). A
    mesh that leaves out some process's devices is skipped, as is any mesh on one process or on accelerators.
    """
    processes = {device.process_index for device in mesh.devices.flat}
    if len(processes) == 1 or len(processes) < jax.process_count() or mesh.devices.flat[0].platform != "cpu":
        return
    spec = jax.P(*AXES)
    sums = lambda x: (jax.lax.psum(x, "data"), jax.lax.psum(x, "model"), jax.lax.psum(x, AXES))  # noqa: E731
    connect = jax.jit(jax.shard_map(sums, mesh=mesh, in_specs=spec, out_specs=(spec, spec, spec)))
    ones = jax.make_array_from_callback(mesh.devices.shape, NamedSharding(mesh, spec),
                                        lambda index: np.ones((1, 1), np.float32))  # fmt: skip
    jax.block_until_ready(connect(ones))


def logical_to_mesh_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    rules: dict[str, str],
    mesh: Mesh,
    fallback: dict[str, str] | None = None,
) -> jax.P:
    """The mesh PartitionSpec of one parameter from its logical names, its shape, a rule set and, for matrices
    that the rules leave unsplit over a mesh axis, second-choice rules."""
    used: set[str] = set()
    spec: list[str | None] = [None] * len(shape)
    passes = [rules] + ([fallback] if fallback and len(shape) >= 2 else [])
    for rule_set in passes:
        for dim, (name, size) in enumerate(zip(names, shape)):
            axis = rule_set.get(name) if name is not None else None
            if axis is None or axis in used or spec[dim] is not None or size % mesh.shape[axis]:
                continue
            used.add(axis)
            spec[dim] = axis
    return jax.P(*spec)


def check_rules(name: str) -> None:
    """A ValueError unless `name` is one of the parameter-sharding rule sets (jobs check before any work)."""
    if name not in RULES:
        raise ValueError(f"unknown sharding rules {name!r}; known: {sorted(RULES)}")


def param_shardings(boxed_params: Any, mesh: Mesh, rules: str | dict[str, str]) -> Any:
    """NamedShardings for a (possibly abstract) tree of `nn.LogicallyPartitioned` parameters, unboxed structure."""
    if isinstance(rules, str):
        check_rules(rules)
    rule_set = RULES[rules] if isinstance(rules, str) else rules
    fallback = FALLBACK_RULES.get(rules) if isinstance(rules, str) else None

    def leaf_sharding(leaf: Any) -> NamedSharding:
        if not isinstance(leaf, nn.LogicallyPartitioned):
            raise TypeError(f"parameter without logical axis names (shape {getattr(leaf, 'shape', None)})")
        return NamedSharding(mesh, logical_to_mesh_spec(leaf.names, leaf.value.shape, rule_set, mesh, fallback))

    return jax.tree.map(leaf_sharding, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def on_mesh(function: Callable, mesh: Mesh | None) -> Callable:
    """`function` run under `mesh` as the abstract mesh, for jitting: what it traces sees the mesh (the towers pin
    their activations to its batch split, attention picks kernels for its platform). Every jitted forward and
    step of the jobs is traced this way, so evaluation lays out activations as training does. None: unchanged."""
    if mesh is None:
        return function

    def traced_on_mesh(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return function(*args, **kwargs)

    return traced_on_mesh


# XLA:CPU's YNNPACK fusions (on by default since jax 0.10) run this project's steps slower than XLA's own dot and
# loop emitters: the 4-layer side-by-side step of docs/performance.md takes 13-15 % longer on one core with them.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def platform_of(mesh: Mesh | None) -> str:
    """The platform of `mesh`'s devices; JAX's default backend for None."""
    return jax.default_backend() if mesh is None else mesh.devices.flat[0].platform


def _platform_options(platform: str) -> dict[str, str] | None:
    return dict(CPU_COMPILER_OPTIONS) if platform == "cpu" else None


def compiler_options(mesh: Mesh | None) -> dict[str, str] | None:
    """XLA options for a program compiled for `mesh`'s devices: `CPU_COMPILER_OPTIONS` on CPU, none elsewhere."""
    return _platform_options(platform_of(mesh))


@functools.cache
def shared_jit(function: Callable, platform: str, static_argnames: tuple[str, ...] = ()) -> Callable:
    """One `jax.jit` of a module-level `function` per platform for the whole process, compiled with that
    platform's options: for the forwards the evaluators call again and again, whose compiled programs jax.jit's
    cache then shares across calls (a new `jit_on_mesh` per call would trace and compile each time)."""
    return jax.jit(function, static_argnames=static_argnames, compiler_options=_platform_options(platform))


def jit_on_mesh(function: Callable, mesh: Mesh, **jit_kwargs: Any) -> Callable:
    """`jax.jit` of `function` traced under `mesh` (`on_mesh`) and compiled with its platform's options: how the
    jobs' steps and per-mesh forwards are jitted."""
    return jax.jit(on_mesh(function, mesh), compiler_options=compiler_options(mesh), **jit_kwargs)


def initialise(init: Callable, out_shardings: Any, *args: Any) -> Any:
    """`jax.jit(init, out_shardings=out_shardings)(*args)` with threefry draws lowered to one GPU kernel each: how
    the jobs create a train state.

    An initialiser draws every parameter with threefry, and XLA:GPU compiles each draw into its own fusions: that
    made the initialiser's compile the bulk of a GPU job's start (docs/performance.md). The kernels compute the
    same bits (checked there, every value). Only for initialisers: in a train step (dropout) a kernel writes out
    the bits that XLA otherwise fuses into their use, jax's documented memory cost. The setting is part of
    jax.jit's cache key, so compiling and calling both happen here. It is the process's while this runs (jax.config
    has no public per-thread form); the jobs create their state before any other thread compiles. It changes
    nothing on CPU or TPU."""
    previous = jax.config.jax_threefry_gpu_kernel_lowering
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)
    try:
        return jax.jit(init, out_shardings=out_shardings)(*args)
    finally:
        jax.config.update("jax_threefry_gpu_kernel_lowering", previous)


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh a tree of arrays is laid out on (its first leaf with a NamedSharding), or None."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch fields are split over 'data' along their leading axis, replicated over 'model'."""
    return NamedSharding(mesh, jax.P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, jax.P())


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host batch -> global jax.Arrays split over 'data' along the batch dimension.

    Every process passes its own local rows; the global batch is their concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for name, value in batch.items()}


def gather(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) global array as one host numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def padded_length(count: int, batch_size: int, process_count: int) -> int:
    """Examples per process after padding `count` examples: the same whole number of batches on every process."""
    per_process = math.ceil(count / process_count)
    return max(1, math.ceil(per_process / batch_size)) * batch_size
