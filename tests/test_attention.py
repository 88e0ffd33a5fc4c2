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


def gradients(implementation: str, mask, q, k, v) -> tuple:
    """The gradients of sum(sin(attention)) in q, k and v: every output element gets its own cotangent."""
    def loss(q, k, v):
        return jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, mask, implementation)))

    return jax.grad(loss, (0, 1, 2))(q, k, v)


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
    for xla, ours in zip(gradients("xla", mask, q, k, v), gradients("heads_first", mask, q, k, v)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(xla), atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("length, masked, logit_shift", [(197, False, 0), (197, True, 0), (1214, False, 0),
                                                         (32, True, 0), (200, True, 0), (197, False, -5),
                                                         (197, True, -5)])  # fmt: skip
def test_cudnn_in_bfloat16_is_as_close_to_exact_as_xla(length, masked, logit_shift):
    """cuDNN's kernel and XLA's, both in bfloat16, against float32 at full precision: cuDNN's output and gradients
    are no further off than twice XLA's bfloat16 error (or 1 % of the largest value), at CLIP's, AST's and
    RoBERTa's lengths and with a key-padding mask. With every real logit shifted to about -5, a padding key that
    leaked in (logit 0, value 0) would take a third of the weight: at 197 tokens that case fails such a leak, which
    the unshifted one (0.3 % of the weight) lets through."""
    q, k, v, mask = inputs(length=length, heads=4, padded_from=length * 3 // 4)
    offset = np.sqrt(-logit_shift * q.shape[-1] ** 0.5)  # (q + o e0) . (k - o e0) / sqrt(d) has mean -o^2 / sqrt(d)
    q, k = q.at[..., 0].add(offset), k.at[..., 0].add(-offset)
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


def cudnn_inputs(q_len, k_len, masked):
    q, k, v, mask = inputs(length=max(q_len, k_len), padded_from=k_len * 3 // 4)
    return q[:, :q_len], k[:, :k_len], v[:, :k_len], mask[..., :k_len] if masked else None


@pytest.fixture
def xla_as_cudnn(monkeypatch) -> list[tuple]:
    """XLA's kernel stands in for cuDNN's (which needs a GPU); the list gets each call's implementation, lengths,
    mask shape and per-example lengths."""
    calls, xla = [], jax.nn.dot_product_attention

    def stand_in(query, key, value, mask=None, implementation=None, **lengths):
        concrete = lambda x: x.shape if isinstance(x, jax.core.Tracer) else np.asarray(x).tolist()  # noqa: E731
        seen = {name: concrete(x) for name, x in lengths.items()}
        calls.append((implementation, query.shape[1], key.shape[1], None if mask is None else mask.shape, seen))
        return xla(query, key, value, mask=mask, implementation="xla", **lengths)

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    return calls


@pytest.mark.parametrize("q_len, k_len, masked", [(197, 197, False), (197, 197, True), (200, 200, False),
                                                 (200, 200, True), (199, 200, True), (200, 197, False)])
def test_cudnn_pads_odd_lengths_and_masks_the_padding(xla_as_cudnn, q_len, k_len, masked):
    """cuDNN trains only on even lengths: an odd one is padded by a key no query attends (by per-example lengths
    without a mask, by the mask otherwise, which then spans every query), and the padded row is dropped."""
    q, k, v, mask = cudnn_inputs(q_len, k_len, masked)
    out = attention.dot_product_attention(q, k, v, mask, "cudnn")
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask), atol=2e-5)
    q_even, k_even = q_len + q_len % 2, k_len + k_len % 2
    odd = (q_even, k_even) != (q_len, k_len)
    lengths = {"query_seq_lengths": [q_len] * 2, "key_value_seq_lengths": [k_len] * 2} if odd and not masked else {}
    assert xla_as_cudnn == [("cudnn", q_even, k_even, (2, 1, q_even, k_even) if masked else None, lengths)]


@pytest.mark.parametrize("mask_shape", [None, (2, 1, 1, 197), (1, 1, 1, 197), (2, 1, 197, 197)])
def test_cudnn_padding_leaves_the_gradients_exact(xla_as_cudnn, mask_shape):
    """The padding token gets no gradient and changes none: q, k and v's gradients at 197 tokens equal XLA's
    unpadded ones, with no mask and with masks over the batch, broadcast over it, and per query."""
    q, k, v, _ = cudnn_inputs(197, 197, False)
    mask = None
    if mask_shape:
        mask = jnp.asarray(np.random.default_rng(1).random(mask_shape) < 0.8).at[..., 0].set(True)
    for xla, ours in zip(gradients("xla", mask, q, k, v), gradients("cudnn", mask, q, k, v)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(xla), atol=2e-5)
    assert [call[:3] for call in xla_as_cudnn if call[0] == "cudnn"] == [("cudnn", 198, 198)]


@pytest.mark.skipif(len(jax.devices()) < 2, reason="a 2x1 mesh needs two devices")
@pytest.mark.parametrize("q_len, k_len, masked", [(197, 197, False), (199, 200, True), (200, 200, True)])
def test_cudnn_splits_its_mask_and_lengths_over_the_batch(xla_as_cudnn, q_len, k_len, masked):
    """Under a mesh the padding mask and the per-example lengths, built as constants, are split over the batch
    as the activations are, not left whole on every device; q, k and v are pinned to the same batch split, their
    heads left free (jax's partitioning of the cuDNN call does not tie the lengths' split to the query's)."""
    q, k, v, mask = cudnn_inputs(q_len, k_len, masked)
    q_even, k_even = q_len + q_len % 2, k_len + k_len % 2
    with jax.set_mesh(parallel.make_mesh("2x1", jax.devices()[:2])):
        traced = jax.jit(lambda *a: attention.dot_product_attention(*a, "cudnn")).lower(q, k, v, mask).as_text()
    constraints = sorted(line.rsplit(" : ", 1)[-1] + " " + line.split("<@mesh, ")[1].split(">")[0]
                         for line in traced.splitlines() if "sharding_constraint" in line)  # fmt: skip
    batch_only, heads_free = '[{"data"}, {}, {}, {}]', '[{"data"}, {?}, {?}, {?}]'
    pinned = [f"tensor<2x{q_even}x2x64xf32> {heads_free}"] + [f"tensor<2x{k_even}x2x64xf32> {heads_free}"] * 2
    pinned += [f"tensor<2x1x{q_even}x{k_even}xi1> {batch_only}"] if masked else ['tensor<2xi32> [{"data"}]'] * 2
    assert [line for line in constraints if "2x64xf32>" in line or "i1>" in line or "2xi32>" in line] == sorted(pinned)


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


def test_splash_kernel_serves_every_later_trace_mesh_and_device():
    """The kernel is built once per shape and kept for the process, so the first caller must not leave its mark
    on it. Built inside a jitted function's trace, it once kept that trace's tracers: a second function at the
    same shape (the evaluators' forward beside the train step) failed with an UnexpectedTracerError. Built under
    a mesh, it kept arrays committed to that mesh's devices: calls off the mesh failed."""
    attention._make_kernel.cache_clear()
    q, k, v, _ = inputs(length=136)
    want = reference(q, k, v, None)
    splash = lambda q, k, v: attention.dot_product_attention(q, k, v, None, "splash")  # noqa: E731
    mesh = parallel.make_mesh("2x1", jax.devices()[:2])
    with jax.set_mesh(mesh):
        on_mesh = jax.jit(splash)(*(jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (q, k, v)))
    np.testing.assert_allclose(np.asarray(on_mesh), want, atol=2e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(splash)(q, k, v)), want, atol=2e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda *a: 2 * splash(*a))(q, k, v)), 2 * want, atol=4e-5)
    elsewhere = [jax.device_put(x, jax.devices()[5]) for x in (q, k, v)]
    np.testing.assert_allclose(np.asarray(splash(*elsewhere)), want, atol=2e-5)


def test_splash_gradients_and_a_sharded_batch():
    """The kernel's own backward, and under a mesh context the kernel runs per shard (batch on 'data', heads on
    'model') with the same result."""
    q, k, v, mask = inputs(batch=4, length=136, heads=2)
    for xla, splash in zip(gradients("xla", mask, q, k, v), gradients("splash", mask, q, k, v)):
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


@pytest.mark.parametrize("platform, dtype, length, expected", [
    ("tpu", jnp.float32, 1214, "splash"), ("tpu", jnp.float32, 197, "xla"), ("gpu", jnp.bfloat16, 1214, "cudnn"),
    ("gpu", jnp.bfloat16, 128, "cudnn"), ("gpu", jnp.bfloat16, 32, "xla"), ("gpu", jnp.float32, 1214, "xla"),
    ("cpu", jnp.float32, 1214, "heads_first")])  # fmt: skip
def test_auto_follows_the_mesh_platform(platform, dtype, length, expected):
    """Under a mesh context `auto` picks for the mesh's devices, not the host's: a step traced here for a TPU
    topology uses the TPU's kernel. Short sequences keep XLA's fusion on GPU and TPU."""
    from jax._src.mesh import AbstractDevice

    mesh = jax.sharding.AbstractMesh((2, 1), ("data", "model"), abstract_device=AbstractDevice(platform, None, platform))
    on_host = attention.resolve("auto", dtype, length)
    with jax.sharding.use_abstract_mesh(mesh):
        assert attention.resolve("auto", dtype, length) == expected
    assert attention.resolve("auto", dtype, length) == on_host  # back on the host's platform


def test_auto_under_a_mesh_of_shapes_alone_uses_the_default_backend():
    mesh = jax.sharding.AbstractMesh((4, 2), ("data", "model"))  # no devices: no platform to follow
    with jax.sharding.use_abstract_mesh(mesh):
        assert attention.resolve("auto", jnp.float32, 1214) == "heads_first"
