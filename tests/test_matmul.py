"""The matmuls of `synergy_jax.models.matmul`. Dense layers: on CPU the flattened form with a custom gradient equals
`jax.lax.dot_general` plus the bias in value and in all three gradients for every dense layout the towers use,
sharded or not; its compiled gradient has no transposed copy of an activation-sized array, computes a tall weight's
gradient as (out, in) and the bias gradient as a product, not a windowed reduction; `layers.Dense` has flax's
parameters and initialisation; other platforms are left to `jax.lax.dot_general`. Attention's batched matmuls:
equal to einsum in value and gradients, float32 accumulation of bfloat16, gradients with the short side as rows.
Layer norms' affine part and the softmax's row sums: autodiff's values and gradients, the token sums as products;
`layers.LayerNorm` is flax's in parameters, values and gradients."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from synergy_jax import parallel
from synergy_jax.models import layers, matmul

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
    """x, kernel and bias of a dense layer of `layout`, and its number of contracted axes."""
    features, kernel_shape, contracted = LAYOUTS[layout]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((BATCH, LENGTH, *features)), dtype)
    w = jnp.asarray(rng.standard_normal(kernel_shape), dtype)
    b = jnp.asarray(rng.standard_normal(kernel_shape[contracted:]), dtype)
    return x, w, b, contracted


def plain_dense(x, w, b, contracted):
    """The dense layer as autodiff sees flax's: dot_general, then the bias added."""
    dims = ((tuple(range(x.ndim - contracted, x.ndim)), tuple(range(contracted))), ((), ()))
    return jax.lax.dot_general(x, w, dims) + b


def loss(dense, contracted):
    """A loss whose output gradient is not uniform, so that a transposed gradient would show."""
    return lambda x, w, b: jnp.sum(jnp.sin(dense(x, w, b, contracted)))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_equals_dot_general_in_value_and_gradients(layout):
    x, w, b, contracted = operands(layout)
    np.testing.assert_allclose(matmul.dense(x, w, b, contracted), plain_dense(x, w, b, contracted), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    ours = jax.grad(loss(matmul.dense, contracted), (0, 1, 2))(x, w, b)
    plain = jax.grad(loss(plain_dense, contracted), (0, 1, 2))(x, w, b)
    for a, b in zip(ours, plain):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_without_bias_equals_dot_general():
    x, w, _, contracted = operands("qkv")
    no_bias = lambda x, w: jnp.sum(jnp.sin(matmul.dense(x, w, None, contracted)))  # noqa: E731
    plain = lambda x, w: jnp.sum(jnp.sin(plain_dense(x, w, 0.0, contracted)))  # noqa: E731
    for a, b in zip(jax.grad(no_bias, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_bfloat16_gradients_keep_their_dtypes():
    x, w, b, contracted = operands("tall", jnp.bfloat16)
    ours = jax.grad(loss(matmul.dense, contracted), (0, 1, 2))(x, w, b)
    plain = jax.grad(loss(plain_dense, contracted), (0, 1, 2))(x, w, b)
    for a, b in zip(ours, plain):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0.05, atol=0.5)


def compiled_gradient(function, *operands) -> str:
    """The optimised HLO of the gradient of `function` (a loss), compiled as the jobs compile on CPU."""
    grad = jax.jit(jax.grad(function, tuple(range(len(operands)))))
    return grad.lower(*operands).compile(parallel.CPU_COMPILER_OPTIONS).as_text()


def activation_moves(hlo: str) -> list[str]:
    """Copies and transposes of arrays with a tokens axis (LENGTH or BATCH x LENGTH long)."""
    tokens = rf"f32\[[^\]]*\b({LENGTH}|{BATCH * LENGTH})\b[^\]]*\]"
    moves = rf"%\S*(copy|transpose)\S* = {tokens}|= {tokens}\S* (copy|transpose)\("
    return [line for line in hlo.splitlines() if re.search(moves, line)]


def products_in_memory_order(hlo: str) -> list[tuple[int, ...]]:
    """Every dot's output shape as laid out in memory (major to minor)."""
    shapes = []
    for dims, layout in re.findall(r"= f32\[([\d,]+)\]\{([\d,]+)\} dot\(", hlo):
        dims, minor_to_major = [int(d) for d in dims.split(",")], [int(d) for d in layout.split(",")]
        shapes.append(tuple(dims[axis] for axis in reversed(minor_to_major)))
    return shapes


def token_reductions(hlo: str) -> list[str]:
    """Reductions (windowed or not) whose operand has a tokens axis: autodiff's sum for a bias gradient."""
    tokens = rf"f32\[[^\]]*\b({LENGTH}|{BATCH * LENGTH})\b[^\]]*\]"
    shapes = dict(re.findall(r"%(\S+) = (\S+) ", hlo))
    found = []
    for line in hlo.splitlines():
        call = re.search(r"= \S+ (?:reduce|reduce-window)\(%([^,)]+)", line)
        if call and re.match(tokens, shapes.get(call.group(1), "")):
            found.append(line)
    return found


@pytest.mark.parametrize("layout", ["wide", "tall"])
def test_gradient_program_has_no_transposed_activation_copy(layout):
    """Autodiff's own gradient transposes the (batch, length, out) output gradient in memory; ours contracts the
    flattened tokens in place. The weight gradient's dot has the kernel's shorter side as rows in memory: a tall
    kernel's is computed as (out, in) and transposed back."""
    x, w, b, contracted = operands(layout)
    hlo = compiled_gradient(loss(matmul.dense, contracted), x, w, b)
    assert not activation_moves(hlo), activation_moves(hlo)
    assert activation_moves(compiled_gradient(loss(plain_dense, contracted), x, w, b)), "autodiff's has one"
    weight_products = [shape for shape in products_in_memory_order(hlo) if sorted(shape) == sorted(w.shape)]
    assert weight_products == [tuple(sorted(w.shape))], products_in_memory_order(hlo)


@pytest.mark.parametrize("layout", ["wide", "qkv", "attention_out"])
def test_bias_gradient_is_a_product_not_a_reduction_over_tokens(layout):
    """Autodiff sums the output gradient over the tokens, which XLA:CPU runs as a windowed tree reduction; ours is
    ones^T g, a dot with the bias's shape."""
    x, w, b, contracted = operands(layout)
    hlo = compiled_gradient(loss(matmul.dense, contracted), x, w, b)
    assert not token_reductions(hlo), token_reductions(hlo)
    assert token_reductions(compiled_gradient(loss(plain_dense, contracted), x, w, b)), "autodiff's has one"
    bias_products = [shape for shape in products_in_memory_order(hlo) if math.prod(shape) == b.size]
    assert bias_products, products_in_memory_order(hlo)


def test_dense_layer_has_flax_parameters_and_values():
    """`layers.Dense` initialises as flax's Dense / DenseGeneral for the same key (kernels drawn flat, then
    reshaped), with the same parameter tree, and computes the same output."""
    x, _, _, _ = operands("attention_out")
    kernel_init, bias_init = nn.initializers.lecun_normal(), nn.initializers.normal(0.3)  # lecun: fan-in from shape
    ours = layers.Dense((4, 5), kernel_init=kernel_init, bias_init=bias_init, contracted=2)
    theirs = nn.DenseGeneral((4, 5), axis=(-2, -1), kernel_init=kernel_init, bias_init=bias_init)
    ours_params, their_params = ours.init(jax.random.PRNGKey(1), x), theirs.init(jax.random.PRNGKey(1), x)
    assert jax.tree.structure(ours_params) == jax.tree.structure(their_params)
    for a, b in zip(jax.tree.leaves(ours_params), jax.tree.leaves(their_params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ours.apply(ours_params, x), theirs.apply(their_params, x), rtol=1e-5, atol=1e-5)


def test_sharded_dense_layer_matches_one_device():
    """A Dense layer with the matmul, batch on 'data' and the kernel's output on 'model' of a 2x2 mesh, gives one
    device's values and gradients."""
    x, _, _, _ = operands("wide")
    layer = layers.Dense(40, kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.normal(1.0))
    params = layer.init(jax.random.PRNGKey(0), x)
    grad = jax.grad(lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x))), (0, 1))
    expected = grad(params, x)
    mesh = parallel.make_mesh("2x2", jax.devices()[:4])
    kernel = NamedSharding(mesh, P(None, "model"))
    placed = jax.device_put(params, {"params": {"kernel": kernel, "bias": NamedSharding(mesh, P("model"))}})
    sharded = jax.jit(parallel.on_mesh(grad, mesh))(placed, jax.device_put(x, NamedSharding(mesh, P("data"))))
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_other_platforms_use_dot_general(monkeypatch):
    x, w, b, contracted = operands("wide")
    custom = lambda f, *a: "custom_vjp_call" in str(jax.make_jaxpr(f)(*a))  # noqa: E731
    assert custom(lambda x, w, b: matmul.dense(x, w, b, contracted), x, w, b)
    monkeypatch.setattr(matmul, "traced_platform", lambda: "tpu")
    assert not custom(lambda x, w, b: matmul.dense(x, w, b, contracted), x, w, b)
    assert not custom(lambda x, w: matmul.batch_matmul(x, w, transpose_b=True), x, x)


def test_every_block_uses_the_matmuls(monkeypatch):
    """The six dense layers of every transformer block (q, k, v, attention out, fc1, fc2) of all three towers go
    through the dense matmul, and `heads_first` attention's two products through the batched one; the projections
    and heads outside the blocks keep flax's default."""
    from synergy_jax.models.synergy import SynergyCLIP, example_batch
    from synthetic import tiny_config

    config = tiny_config(layers=2, dropout=False).with_runtime("float32", False, "heads_first")
    batch = example_batch(config, 2)
    calls = {"_flat_dense": 0, "_batch_matmul": 0}
    for name in calls:
        original = getattr(matmul, name)
        monkeypatch.setattr(matmul, name, lambda *args, name=name, original=original: calls.__setitem__(
            name, calls[name] + 1) or original(*args))  # fmt: skip
    model = SynergyCLIP(config)
    model.apply(model.init(jax.random.PRNGKey(0), batch), batch)
    blocks = sum(getattr(config, tower).num_hidden_layers for tower in ("vision", "text", "audio"))
    assert calls == {"_flat_dense": 2 * 6 * blocks, "_batch_matmul": 2 * 2 * blocks}  # init and apply


@pytest.mark.parametrize("transpose_b", [False, True])
def test_batch_matmul_equals_einsum_in_value_and_gradients(transpose_b):
    """Attention's products: q k^T (transpose_b) and p v, over (batch, heads, rows, columns)."""
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((BATCH, 3, LENGTH, 8)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((BATCH, 3, LENGTH, 8) if transpose_b else (BATCH, 3, 8, 12)), jnp.float32)
    plain = lambda a, b: jnp.einsum("bnqd,bnkd->bnqk" if transpose_b else "bnqk,bnkd->bnqd", a, b)  # noqa: E731
    ours = lambda a, b: matmul.batch_matmul(a, b, transpose_b)  # noqa: E731
    np.testing.assert_allclose(ours(a, b), plain(a, b), rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(jax.grad(lambda a, b: jnp.sum(jnp.sin(ours(a, b))), (0, 1))(a, b),
                            jax.grad(lambda a, b: jnp.sum(jnp.sin(plain(a, b))), (0, 1))(a, b)):  # fmt: skip
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-4)


def test_batch_matmul_computes_its_gradients_with_the_short_side_as_rows():
    """dK = dS^T q (LENGTH x 8) is computed as q^T dS (8 x LENGTH) and transposed back; dQ = dS k keeps its form."""
    rng = np.random.default_rng(2)
    q, k = (jnp.asarray(rng.standard_normal((BATCH, 3, LENGTH, 8)), jnp.float32) for _ in range(2))
    hlo = compiled_gradient(lambda q, k: jnp.sum(jnp.sin(matmul.batch_matmul(q, k, transpose_b=True))), q, k)
    gradient_products = [shape[-2:] for shape in products_in_memory_order(hlo) if sorted(shape[-2:]) == [8, LENGTH]]
    assert sorted(gradient_products) == [(8, LENGTH), (LENGTH, 8)], products_in_memory_order(hlo)


def test_batch_matmul_in_bfloat16_accumulates_in_float32():
    rng = np.random.default_rng(3)
    a, b = (jnp.asarray(rng.standard_normal((BATCH, 3, LENGTH, 8)), jnp.bfloat16) for _ in range(2))
    out = matmul.batch_matmul(a, b, transpose_b=True, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    expected = jnp.einsum("bnqd,bnkd->bnqk", a, b, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    grads = jax.grad(lambda a, b: jnp.sum(jnp.sin(matmul.batch_matmul(a, b, True, jnp.float32))), (0, 1))(a, b)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


def test_scale_and_shift_equals_autodiff_and_sums_the_tokens_by_products():
    """A layer norm's affine part: the same value and gradients as x * scale + bias under autodiff (in float32
    and, keeping each operand's dtype, in bfloat16), with the parameter gradients as dots, not reductions over
    the tokens."""
    rng = np.random.default_rng(4)
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(rng.standard_normal((BATCH, LENGTH, 24)), dtype)
        scale, bias = (jnp.asarray(rng.standard_normal(24), jnp.float32) for _ in range(2))
        plain = lambda x, s, b: x * s + b  # noqa: E731
        tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(matmul.scale_and_shift(x, scale, bias), plain(x, scale, bias), rtol=tolerance)
        cost = lambda f: lambda x, s, b: jnp.sum(jnp.sin(f(x, s, b).astype(jnp.float32)))  # noqa: E731
        ours = jax.grad(cost(matmul.scale_and_shift), (0, 1, 2))(x, scale, bias)
        theirs = jax.grad(cost(plain), (0, 1, 2))(x, scale, bias)
        for mine, expected in zip(ours, theirs):
            assert mine.dtype == expected.dtype, (mine.dtype, expected.dtype)
            np.testing.assert_allclose(np.asarray(mine, np.float32), np.asarray(expected, np.float32),
                                       rtol=tolerance, atol=tolerance * 10)  # fmt: skip
    x = jnp.asarray(rng.standard_normal((BATCH, LENGTH, 24)), jnp.float32)
    hlo = compiled_gradient(cost(matmul.scale_and_shift), x, scale, bias)
    assert not token_reductions(hlo), token_reductions(hlo)
    assert token_reductions(compiled_gradient(cost(plain), x, scale, bias)), "autodiff's has them"
    assert len([shape for shape in products_in_memory_order(hlo) if math.prod(shape) == 24]) == 2, hlo


def test_row_sums_equal_the_sum_in_value_and_gradient():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((BATCH, 3, LENGTH, 70)), jnp.float32)
    np.testing.assert_allclose(matmul.row_sums(x), x.sum(axis=-1, keepdims=True), rtol=1e-5, atol=1e-5)
    weights = jnp.asarray(rng.standard_normal((BATCH, 3, LENGTH, 1)), jnp.float32)
    ours = jax.grad(lambda x: jnp.sum(jnp.sin(matmul.row_sums(x) * weights)))(x)
    theirs = jax.grad(lambda x: jnp.sum(jnp.sin(x.sum(axis=-1, keepdims=True) * weights)))(x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_layer_norm_has_flax_parameters_and_values():
    """`layers.LayerNorm` initialises and computes as flax's LayerNorm (same parameter tree, the towers' logical
    axis names), in value and in gradients, whatever the parameters; for a (batch, tokens, features) input and a
    2-D one (CLIP's pooled token), in float32 and, rounding once, in bfloat16."""
    x = jnp.asarray(np.random.default_rng(6).standard_normal((BATCH, LENGTH, 24)) * 0.01 + 1, jnp.float32)  # eps shows
    boxed = layers.LayerNorm(1e-5).init(jax.random.PRNGKey(0), x)["params"]
    assert {name: leaf.names for name, leaf in boxed.items()} == {"scale": ("embed",), "bias": ("embed",)}
    for inputs, dtype in ((x, jnp.float32), (x[:, 0], jnp.float32), (x, jnp.bfloat16)):
        ours, theirs = layers.LayerNorm(1e-5, dtype=dtype), nn.LayerNorm(epsilon=1e-5, dtype=dtype)
        ours_params = nn.meta.unbox(ours.init(jax.random.PRNGKey(0), inputs))
        their_params = theirs.init(jax.random.PRNGKey(0), inputs)
        assert jax.tree.structure(ours_params) == jax.tree.structure(their_params)
        for a, b in zip(jax.tree.leaves(ours_params), jax.tree.leaves(their_params)):
            np.testing.assert_array_equal(a, b)
        params = jax.tree.map(lambda p: p + jnp.linspace(-0.5, 0.5, p.size).reshape(p.shape), ours_params)
        out, expected = ours.apply(params, inputs), theirs.apply(params, inputs)
        assert out.dtype == expected.dtype == dtype
        tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32), rtol=tolerance,
                                   atol=tolerance)  # fmt: skip
        cost = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x).astype(jnp.float32)))  # noqa: E731
        for mine, wanted in zip(jax.tree.leaves(jax.grad(cost(ours), (0, 1))(params, inputs)),
                                jax.tree.leaves(jax.grad(cost(theirs), (0, 1))(params, inputs)),
                                strict=True):  # fmt: skip
            scale = tolerance * float(jnp.abs(wanted).max())
            np.testing.assert_allclose(mine, wanted, rtol=tolerance * 10, atol=scale)
