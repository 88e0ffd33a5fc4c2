"""The dense layers' matmul (`synergy_jax.models.matmul`): on CPU its flattened form with a custom gradient equals
`jax.lax.dot_general` in value and in both gradients for every dense layout the towers use, sharded or not; its
compiled gradient has no transposed copy of an activation-sized array, and computes a tall weight's gradient as
(out, in); other contractions and other platforms are left to `jax.lax.dot_general`."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from synergy_jax import parallel
from synergy_jax.models import matmul

BATCH, LENGTH = 2, 50  # 100 tokens: no weight or feature dimension below has that size or 50

# (input feature shape, kernel shape, contracted dims): Dense up (wide kernel), Dense down (tall), the q/k/v
# projection (embed -> heads, kv) and the attention output (heads, kv -> embed).
LAYOUTS = {
    "wide": ((24,), (24, 40), 1),
    "tall": ((40,), (40, 24), 1),
    "qkv": ((24,), (24, 4, 6), 1),
    "attention_out": ((4, 6), (4, 6, 24), 2),
}


def operands(layout: str, dtype=jnp.float32):
    features, kernel_shape, contracted = LAYOUTS[layout]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((BATCH, LENGTH, *features)), dtype)
    w = jnp.asarray(rng.standard_normal(kernel_shape), dtype)
    dims = ((tuple(range(x.ndim - contracted, x.ndim)), tuple(range(contracted))), ((), ()))
    return x, w, dims


def loss(dot_general, dims):
    """A loss whose output gradient is not uniform, so that a transposed gradient would show."""
    return lambda x, w: jnp.sum(jnp.sin(dot_general(x, w, dims)))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_equals_dot_general_in_value_and_gradients(layout):
    x, w, dims = operands(layout)
    np.testing.assert_allclose(matmul.dense_dot_general(x, w, dims), jax.lax.dot_general(x, w, dims), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    ours = jax.grad(loss(matmul.dense_dot_general, dims), (0, 1))(x, w)
    plain = jax.grad(loss(jax.lax.dot_general, dims), (0, 1))(x, w)
    for a, b in zip(ours, plain):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_bfloat16_gradients_keep_their_dtypes():
    x, w, dims = operands("tall", jnp.bfloat16)
    ours = jax.grad(loss(matmul.dense_dot_general, dims), (0, 1))(x, w)
    plain = jax.grad(loss(jax.lax.dot_general, dims), (0, 1))(x, w)
    for a, b in zip(ours, plain):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0.05, atol=0.5)


@pytest.mark.parametrize("layout", ["wide", "tall"])
def test_gradient_program_has_no_transposed_activation_copy(layout):
    """Autodiff's own gradient transposes the (batch, length, out) output gradient in memory; ours contracts the
    flattened tokens in place. The weight gradient's dot has the kernel's shorter side as rows: a tall kernel's is
    computed as (out, in) and transposed back."""
    x, w, dims = operands(layout)
    options = parallel.CPU_COMPILER_OPTIONS  # as the jobs compile: XLA's own dot emitter
    hlo = jax.jit(jax.grad(loss(matmul.dense_dot_general, dims), (0, 1))).lower(x, w).compile(options).as_text()
    moves = [line for line in hlo.splitlines() if re.search(r"= f32\[[^\]]*\b(50|100)\b[^\]]*\]\S* (copy|transpose)\(",
                                                              line)]  # fmt: skip
    assert not moves, moves
    autodiff = jax.jit(jax.grad(loss(jax.lax.dot_general, dims), (0, 1))).lower(x, w).compile(options).as_text()
    assert re.search(r"= f32\[[^\]]*\b50\b[^\]]*\]\S* (copy|transpose|fusion)\(", autodiff), "the check can't fail"
    kernel_dims = {tuple(w.shape), tuple(w.shape[::-1])}
    dots = [(int(a), int(b), layout) for a, b, layout in re.findall(r"= f32\[(\d+),(\d+)\]\{(\d,\d)\} dot\(", hlo)]
    weight_dot = [(a if layout == "1,0" else b) for a, b, layout in dots if (a, b) in kernel_dims]
    assert weight_dot == [min(w.shape)], dots  # its rows in memory: the kernel's shorter side


def test_sharded_dense_layer_matches_one_device():
    """A Dense layer with the matmul, batch on 'data' and the kernel's output on 'model' of a 2x2 mesh, gives one
    device's values and gradients."""
    x, w, _ = operands("wide")
    layer = nn.Dense(40, dot_general=matmul.dense_dot_general)
    params = layer.init(jax.random.PRNGKey(0), x)
    grad = jax.grad(lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x))), (0, 1))
    expected = grad(params, x)
    mesh = parallel.make_mesh("2x2", jax.devices()[:4])
    kernel = NamedSharding(mesh, P(None, "model"))
    placed = jax.device_put(params, {"params": {"kernel": kernel, "bias": NamedSharding(mesh, P("model"))}})
    sharded = jax.jit(parallel.on_mesh(grad, mesh))(placed, jax.device_put(x, NamedSharding(mesh, P("data"))))
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_other_contractions_and_platforms_use_dot_general(monkeypatch):
    x, w, dims = operands("wide")
    custom = lambda f, *a: "custom_vjp_call" in str(jax.make_jaxpr(f)(*a))  # noqa: E731
    assert custom(lambda x, w: matmul.dense_dot_general(x, w, dims), x, w)
    batched = (((2,), (1,)), ((0,), (0,)))
    assert not custom(lambda x, w: matmul.dense_dot_general(x, w, batched), x, jnp.ones((BATCH, 24, 3)))
    monkeypatch.setattr(matmul, "traced_platform", lambda: "tpu")
    assert not custom(lambda x, w: matmul.dense_dot_general(x, w, dims), x, w)


def test_every_block_projection_uses_it(monkeypatch):
    """The six dense layers of every transformer block (q, k, v, attention out, fc1, fc2) of all three towers go
    through the matmul; the projections and heads outside the blocks keep flax's default."""
    from synergy_jax.models.synergy import SynergyCLIP, example_batch
    from synthetic import tiny_config

    config = tiny_config(layers=2, dropout=False)
    batch = example_batch(config, 2)
    calls, flat_dense = [], matmul._flat_dense
    monkeypatch.setattr(matmul, "_flat_dense", lambda *args: calls.append(args[1].shape) or flat_dense(*args))
    model = SynergyCLIP(config)
    model.apply(model.init(jax.random.PRNGKey(0), batch), batch)
    blocks = sum(getattr(config, tower).num_hidden_layers for tower in ("vision", "text", "audio"))
    assert len(calls) == 2 * 6 * blocks  # init and apply
