"""Every attention implementation against float64 numpy and the XLA path: heads_first (the CPU default) exactly,
splash (Pallas' TPU kernel, in interpret mode here) with padding, gradients and a mesh; the knob reaches every
block; unknown names are refused. cuDNN needs an NVIDIA GPU: its test runs there (`JAX_PLATFORMS=cuda pytest -n 0
tests/test_attention.py -k cudnn`) and is skipped elsewhere."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from synergy_jax import parallel
from synergy_jax.models import attention
from synergy_jax.models.synergy import SynergyCLIP, example_batch
from synthetic import tiny_config


def reference(query, key, value, mask) -> np.ndarray:
    """float64 numpy softmax(q k^T / sqrt(d)) v over (batch, length, heads, head_dim)."""
    q, k, v = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (query, key, value))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(np.asarray(mask), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return ((probs / probs.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3)


def inputs(batch=2, length=200, heads=2, head_dim=64, padded_from=150):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), jnp.float32) for _ in range(3))
    mask = jnp.broadcast_to(jnp.arange(length) < padded_from, (batch, length))[:, None, None, :]
    return q, k, v, mask


@pytest.mark.parametrize("implementation", ["xla", "heads_first", "splash"])
@pytest.mark.parametrize("masked", [False, True])
def test_implementations_compute_attention(implementation, masked):
    q, k, v, mask = inputs()
    mask = mask if masked else None
    out = attention.dot_product_attention(q, k, v, mask, implementation)
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask), atol=2e-5)


def test_heads_first_equals_xla_in_value_and_gradient():
    q, k, v, mask = inputs()
    loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, mask, impl)))  # noqa: E731
    for xla, ours in zip(jax.grad(loss("xla"), (0, 1, 2))(q, k, v), jax.grad(loss("heads_first"), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(xla), atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("length, masked", [(197, False), (197, True), (1214, False), (32, True), (200, True)])
def test_cudnn_in_bfloat16_is_as_close_to_exact_as_xla(length, masked):
    """cuDNN's kernel and XLA's, both in bfloat16, against float32 at full precision: cuDNN's output and gradients
    are no further off than twice XLA's bfloat16 error (or 1 % of the largest value), at CLIP's, AST's and
    RoBERTa's lengths and with a key-padding mask."""
    q, k, v, mask = inputs(length=length, heads=4, padded_from=length * 3 // 4)
    mask = mask if masked else None

    def value_and_grads(implementation: str, dtype) -> list[np.ndarray]:
        def loss(q, k, v):
            out = attention.dot_product_attention(q, k, v, mask, implementation).astype(jnp.float32)
            return jnp.sum(jnp.sin(out)), out

        run = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
        (_, out), grads = run(*(x.astype(dtype) for x in (q, k, v)))
        return [np.asarray(x.astype(jnp.float32), np.float64) for x in (out, *grads)]

    exact = value_and_grads("xla", jnp.float32)
    xla, cudnn = value_and_grads("xla", jnp.bfloat16), value_and_grads("cudnn", jnp.bfloat16)
    for name, want, theirs, ours in zip(("output", "dq", "dk", "dv"), exact, xla, cudnn):
        bound = max(2 * np.abs(theirs - want).max(), 0.01 * np.abs(want).max())
        assert np.abs(ours - want).max() <= bound, (name, np.abs(ours - want).max(), bound)


@pytest.mark.parametrize("q_len, k_len, masked", [(197, 197, False), (197, 197, True), (200, 200, False),
                                                 (200, 200, True), (199, 200, True), (200, 197, False)])
def test_cudnn_pads_odd_lengths_and_masks_the_padding(monkeypatch, q_len, k_len, masked):
    """cuDNN trains only on even lengths: an odd one is padded by a key no query attends, the mask spans every
    query, and the padded row is dropped; under a mesh the mask is split over the batch as the activations are.
    Checked here with XLA's kernel standing in for cuDNN's."""
    q, k, v, mask = inputs(length=max(q_len, k_len), padded_from=k_len * 3 // 4)
    q, k, v, mask = q[:, :q_len], k[:, :k_len], v[:, :k_len], mask[..., :k_len] if masked else None
    calls, xla = [], jax.nn.dot_product_attention

    def stand_in(query, key, value, mask=None, implementation=None):
        calls.append((implementation, query.shape[1], key.shape[1], None if mask is None else mask.shape))
        return xla(query, key, value, mask=mask, implementation="xla")

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    out = attention.dot_product_attention(q, k, v, mask, "cudnn")
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask), atol=2e-5)
    q_even, k_even = q_len + q_len % 2, k_len + k_len % 2
    no_bias = k_len % 2 == 0 and not masked
    assert calls == [("cudnn", q_even, k_even, None if no_bias else (2, 1, q_even, k_even))]
    mesh = parallel.make_mesh("2x1", jax.devices()[:2])
    with jax.set_mesh(mesh):
        traced = jax.jit(lambda *a: attention.dot_product_attention(*a, "cudnn")).lower(q, k, v, mask).as_text()
    mask_split = [line for line in traced.splitlines() if "sharding_constraint" in line and '[{"data"}, {}, {}, {}]'
                  in line and line.endswith(f"tensor<2x1x{q_even}x{k_even}xi1>")]  # fmt: skip
    assert no_bias or mask_split, traced[-3000:]


@pytest.mark.parametrize("length", [40, 64, 96, 200])
def test_row_max_is_the_max_of_the_row(length):
    """Folded 32 columns at a time on CPU, with and without a remainder: the same values, -inf included."""
    logits = jnp.asarray(np.random.default_rng(length).standard_normal((2, 3, 5, length)), jnp.float32)
    logits = logits.at[0, 0, 0].set(-jnp.inf).at[0, 1, 2, length - 1].set(9.0).at[1, 2, 3, 7].set(-jnp.inf)
    np.testing.assert_array_equal(np.asarray(attention._row_max(logits)), np.asarray(logits.max(-1, keepdims=True)))


def test_cpu_heads_first_has_no_windowed_reduction():
    """XLA:CPU rewrites a long row max or sum into a slow reduce-window (`_row_max`, `matmul.row_sums`); the
    heads_first forward has none. The controls show that XLA still rewrites a plain max and a plain sum."""
    q, k, v, mask = inputs(length=200)

    def windows(function, *args) -> int:
        compiled = jax.jit(function, compiler_options=parallel.CPU_COMPILER_OPTIONS).lower(*args).compile()
        return len(re.findall(r"reduce-window\(", compiled.as_text()))

    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    assert windows(lambda x: x.max(axis=-1), logits) and windows(lambda x: x.sum(axis=-1), logits)
    assert windows(lambda *a: attention.dot_product_attention(*a, "heads_first"), q, k, v, mask) == 0


def test_splash_gradients_and_a_sharded_batch():
    """The kernel's own backward, and under a mesh context the kernel runs per shard (batch on 'data', heads on
    'model') with the same result."""
    q, k, v, mask = inputs(batch=4, length=136, heads=2)
    loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, mask, impl)))  # noqa: E731
    for xla, splash in zip(jax.grad(loss("xla"), (0, 1, 2))(q, k, v), jax.grad(loss("splash"), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(splash), np.asarray(xla), atol=2e-5)
    mesh = parallel.make_mesh("2x2", jax.devices()[:4])
    placed = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (q, k, v, mask)]
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v, m: attention.dot_product_attention(q, k, v, m, "splash"))(*placed)
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask), atol=2e-5)


def test_auto_on_cpu_and_bad_choices_are_refused():
    assert jax.default_backend() == "cpu" and attention.resolve("auto", jnp.float32, 1214) == "heads_first"
    assert attention.resolve("auto", jnp.float32, 197) == "heads_first"  # CLIP's patches
    assert attention.resolve("auto", jnp.float32, 32) == "xla"  # short sequences: XLA's, as fast
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attention.resolve("flash", jnp.float32, 10)
    with pytest.raises(ValueError, match="attention='flash'"):
        tiny_config().vision.replace(attention="flash").validate()


def test_the_knob_reaches_every_tower(monkeypatch):
    """Each implementation set on the tower configs is the one every attention layer uses (three towers, one layer
    each), and the tiny model gives the same embeddings with each."""
    base = tiny_config(layers=1, dropout=False)
    batch = example_batch(base, 2)
    outputs, asked = {}, []
    resolve = attention.resolve
    monkeypatch.setattr(attention, "resolve", lambda impl, *a: asked.append(impl) or resolve(impl, *a))
    for implementation in ("xla", "heads_first", "splash"):
        config = base.with_runtime("float32", False, implementation)
        model = SynergyCLIP(config)
        params = model.init(jax.random.PRNGKey(0), batch)["params"]
        asked.clear()
        outputs[implementation] = model.apply({"params": params}, batch)
        assert asked == [implementation] * 3
    for implementation in ("heads_first", "splash"):
        for ours, xla in zip(jax.tree.leaves(outputs[implementation]), jax.tree.leaves(outputs["xla"])):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(xla), atol=1e-5)


@pytest.mark.parametrize("platform, dtype, expected", [("tpu", jnp.float32, "splash"), ("gpu", jnp.bfloat16, "cudnn"),
                                                        ("gpu", jnp.float32, "xla"), ("cpu", jnp.float32, "heads_first")])
def test_auto_follows_the_mesh_platform(platform, dtype, expected):
    """Under a mesh context `auto` picks for the mesh's devices, not the host's: a step traced here for a TPU
    topology uses the TPU's kernel."""
    from jax._src.mesh import AbstractDevice

    mesh = jax.sharding.AbstractMesh((2, 1), ("data", "model"), abstract_device=AbstractDevice(platform, None, platform))
    on_host = attention.resolve("auto", dtype, 1214)
    with jax.sharding.use_abstract_mesh(mesh):
        assert attention.resolve("auto", dtype, 1214) == expected
    assert attention.resolve("auto", dtype, 1214) == on_host  # back on the host's platform


def test_auto_under_a_mesh_of_shapes_alone_uses_the_default_backend():
    mesh = jax.sharding.AbstractMesh((4, 2), ("data", "model"))  # no devices: no platform to follow
    with jax.sharding.use_abstract_mesh(mesh):
        assert attention.resolve("auto", jnp.float32, 1214) == "heads_first"
