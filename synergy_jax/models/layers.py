"""Transformer building blocks shared by the three towers.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``, ``position``,
``patch``) so that sharding rules (``synergy_jax.parallel``) can place them on a mesh without knowing the model.
Parameters are always float32; ``dtype`` is the compute dtype (float32 or bfloat16).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
from flax.core import meta
import jax
import jax.numpy as jnp

from synergy_jax.models.attention import dot_product_attention
from synergy_jax.models import matmul
from synergy_jax.models.platform import batch_sharded

Dtype = Any
Initializer = Callable[..., jax.Array]


def exact_gelu(x: jax.Array) -> jax.Array:
    """The exact GELU as torch computes it: x/2 (1 + erf(x/sqrt 2)) in float32 at least (in bfloat16 the sum
    1 + erf cancels to nothing below x = -3), rounded once to x's dtype. jax.nn.gelu's exact form goes through erfc,
    which XLA:CPU runs 3.5x slower; both are within 1.1e-6 of the float64 GELU (docs/performance.md, stop 28)."""
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (0.5 * wide * (1.0 + jax.lax.erf(wide * 0.7071067811865476))).astype(x.dtype)


# Activations named as in Hugging Face configs (`hidden_act`). "gelu" is the exact erf form, as torch's. Each is
# recomputed from its input in the backward pass (`jax.checkpoint`) instead of saving its intermediates (the exact
# GELU's erf and exp, the sigmoid): the forward then writes one array, not three, and the recomputation fuses into
# the backward's elementwise pass. Same values; the CPU side-by-side step runs 3-10 % faster (docs/performance.md).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    name: jax.checkpoint(function)
    for name, function in {
        "gelu": exact_gelu,
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
    }.items()
}


def logical(init: Initializer, names: tuple[str | None, ...]) -> Initializer:
    """An initializer whose parameter is annotated with logical axis names."""
    return nn.with_logical_partitioning(init, names)


def uniform_init(bound: float) -> Initializer:
    """U(-bound, bound), the shape of torch's default Linear/Conv and xavier-uniform initialisations."""
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_kernel_init() -> Initializer:
    """torch Linear/Conv default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform, a=sqrt(5))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Initializer:
    """torch Linear/Conv default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return uniform_init(1.0 / math.sqrt(fan_in))


def _flat_init(init: Initializer, flat_shape: tuple[int, ...]) -> Initializer:
    """`init` drawn at `flat_shape` and reshaped to the parameter's shape, as flax's DenseGeneral initialises: the
    same values as flax's Dense and DenseGeneral for the same key."""

    def initialize(rng: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32):
        value = init(rng, flat_shape, dtype)
        if isinstance(value, meta.AxisMetadata):
            return meta.replace_boxed(value, jnp.reshape(value.unbox(), shape))
        return jnp.reshape(value, shape)

    return initialize


class Dense(nn.Module):
    """A dense layer over the input's trailing `contracted` axes: flax's Dense / DenseGeneral parameters (`kernel`
    shaped inputs + features, `bias` shaped features, float32) and initialisation, computed by `matmul.dense`,
    whose gradients XLA:CPU runs fast."""

    features: int | tuple[int, ...]
    kernel_init: Initializer
    bias_init: Initializer
    contracted: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        inputs = x.shape[x.ndim - self.contracted :]
        kernel_flat = (math.prod(inputs), math.prod(features))
        kernel = self.param("kernel", _flat_init(self.kernel_init, kernel_flat), inputs + features, jnp.float32)
        bias = self.param("bias", _flat_init(self.bias_init, (math.prod(features),)), features, jnp.float32)
        x, kernel, bias = (jnp.asarray(array, self.dtype) for array in (x, kernel, bias))
        return matmul.dense(x, kernel, bias, self.contracted)


def layer_norm(eps: float, dtype: Dtype, name: str) -> LayerNorm:
    """LayerNorm over the hidden axis with an explicit epsilon (Flax's default 1e-6 matches none of the towers)."""
    return LayerNorm(epsilon=eps, dtype=dtype, name=name)


class LayerNorm(nn.Module):
    """flax's LayerNorm over the last axis (its parameters `scale` and `bias`, float32, initialised to ones and
    zeros, and its float32 statistics), with the affine part computed by `matmul.scale_and_shift` in float32 and
    rounded once to `dtype`: on CPU its parameter gradients are matrix-vector products (docs/performance.md)."""

    epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        scale = self.param("scale", logical(nn.initializers.ones, ("embed",)), features, jnp.float32)
        bias = self.param("bias", logical(nn.initializers.zeros, ("embed",)), features, jnp.float32)
        normalized = nn.LayerNorm(epsilon=self.epsilon, dtype=jnp.float32, use_bias=False, use_scale=False)(x)
        return matmul.scale_and_shift(normalized, scale, bias).astype(self.dtype)


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    dropout_rate: float,
    dropout_rng: jax.Array | None,
    implementation: str = "auto",
) -> jax.Array:
    """Scaled dot-product attention on ``(batch, length, heads, head_dim)`` inputs.

    Without dropout on the attention probabilities, `synergy_jax.models.attention` computes it by the tower's
    `attention` implementation (fused kernels where the backend has them). Dropout on the probabilities (RoBERTa in
    training mode) takes the explicit softmax path below, the same function as Hugging Face's eager attention.
    """
    if dropout_rng is None or dropout_rate == 0.0:
        return dot_product_attention(query, key, value, mask, implementation)
    scale = query.shape[-1] ** -0.5
    logits = jnp.einsum("bqnd,bknd->bnqk", query, key, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(value.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", probs, value)


class MultiHeadAttention(nn.Module):
    """Self-attention with separate q/k/v projections, laid out (embed, heads, kv) for tensor parallelism."""

    num_heads: int
    init_std: float
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    torch_init: bool = False  # torch nn.MultiheadAttention's: xavier-uniform packed q/k/v, U(+-1/sqrt(E)) out, 0 biases
    implementation: str = "auto"  # synergy_jax.models.attention.IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
        hidden = x.shape[-1]
        if hidden % self.num_heads:
            raise ValueError(f"hidden size {hidden} is not divisible by num_attention_heads {self.num_heads}")
        head_dim = hidden // self.num_heads
        if self.torch_init:  # in_proj_weight is one (3E, E) matrix: xavier bound sqrt(6 / (E + 3E))
            kernel_init, out_init = uniform_init((6.0 / (4 * hidden)) ** 0.5), uniform_init(hidden**-0.5)
        else:
            kernel_init = out_init = nn.initializers.normal(self.init_std)

        def project(name: str) -> jax.Array:
            return Dense(
                features=(self.num_heads, head_dim),
                kernel_init=logical(kernel_init, ("embed", "heads", "kv")),
                bias_init=logical(nn.initializers.zeros, ("heads", "kv")),
                dtype=self.dtype,
                name=name,
            )(x)

        query, key, value = project("query"), project("key"), project("value")
        use_dropout = not deterministic and self.dropout_rate > 0.0
        dropout_rng = self.make_rng("dropout") if use_dropout else None
        out = attention(query, key, value, mask, self.dropout_rate, dropout_rng, self.implementation)
        return Dense(
            features=hidden,
            kernel_init=logical(out_init, ("heads", "kv", "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            contracted=2,
            dtype=self.dtype,
            name="out",
        )(out)


class Mlp(nn.Module):
    """Dense(hidden -> mlp) -> activation -> [dropout] -> Dense(mlp -> hidden)."""

    mlp_dim: int
    activation: str
    init_std: float
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0  # between the two layers (torch's TransformerEncoderLayer; none in the HF towers)
    torch_init: bool = False  # torch Linear's default: weights and biases U(+-1/sqrt(fan_in))

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        hidden = x.shape[-1]

        def inits(fan_in: int) -> tuple[Initializer, Initializer]:
            if self.torch_init:
                return uniform_init(fan_in**-0.5), uniform_init(fan_in**-0.5)
            return nn.initializers.normal(self.init_std), nn.initializers.zeros

        kernel_init, bias_init = inits(hidden)
        x = Dense(
            self.mlp_dim,
            kernel_init=logical(kernel_init, ("embed", "mlp")),
            bias_init=logical(bias_init, ("mlp",)),
            dtype=self.dtype,
            name="fc1",
        )(x)
        x = nn.Dropout(self.dropout_rate, deterministic=deterministic)(ACTIVATIONS[self.activation](x))
        kernel_init, bias_init = inits(self.mlp_dim)
        return Dense(
            hidden,
            kernel_init=logical(kernel_init, ("mlp", "embed")),
            bias_init=logical(bias_init, ("embed",)),
            dtype=self.dtype,
            name="fc2",
        )(x)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What distinguishes one tower's transformer block from another's."""

    num_heads: int
    mlp_dim: int
    activation: str
    layer_norm_eps: float
    init_std: float
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    pre_norm: bool = True
    mlp_dropout: float = 0.0  # inside the MLP, as torch's nn.TransformerEncoderLayer (the MMR text decoder)
    torch_init: bool = False  # nn.TransformerEncoderLayer's initialisation instead of normal(init_std)
    attention: str = "auto"  # the attention implementation (synergy_jax.models.attention)


def block_spec(config: Any, *, pre_norm: bool, attention_dropout: float = 0.0, hidden_dropout: float = 0.0) -> BlockSpec:
    """The block of a tower config with Hugging Face field names (heads, widths, activation, eps, init)."""
    return BlockSpec(
        num_heads=config.num_attention_heads,
        mlp_dim=config.intermediate_size,
        activation=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        init_std=config.initializer_range,
        attention_dropout=attention_dropout,
        hidden_dropout=hidden_dropout,
        pre_norm=pre_norm,
        attention=config.attention,
    )


class TransformerBlock(nn.Module):
    """A pre-LN (CLIP, AST) or post-LN (RoBERTa) transformer block.

    pre-LN:  x = x + drop(attn(ln1(x)));  x = x + drop(mlp(ln2(x)))
    post-LN: x = ln1(x + drop(attn(x)));  x = ln2(x + drop(mlp(x)))
    """

    spec: BlockSpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
        spec = self.spec
        ln1 = layer_norm(spec.layer_norm_eps, self.dtype, "ln1")
        ln2 = layer_norm(spec.layer_norm_eps, self.dtype, "ln2")
        attn = MultiHeadAttention(spec.num_heads, spec.init_std, spec.attention_dropout, self.dtype, spec.torch_init,
                                  spec.attention, name="attn")  # fmt: skip
        mlp = Mlp(spec.mlp_dim, spec.activation, spec.init_std, self.dtype, spec.mlp_dropout, spec.torch_init, name="mlp")
        drop = nn.Dropout(spec.hidden_dropout, deterministic=deterministic)
        if spec.pre_norm:
            x = x + drop(attn(ln1(x), mask, deterministic))
            return x + drop(mlp(ln2(x), deterministic))
        x = ln1(x + drop(attn(x, mask, deterministic)))
        return ln2(x + drop(mlp(x, deterministic)))


class Encoder(nn.Module):
    """A stack of ``num_layers`` identical blocks, optionally rematerialised (activations recomputed in backward)."""

    spec: BlockSpec
    num_layers: int
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
        block_cls = nn.remat(TransformerBlock, static_argnums=(3,)) if self.remat else TransformerBlock
        for i in range(self.num_layers):
            x = block_cls(self.spec, self.dtype, name=f"layer_{i}")(batch_sharded(x), mask, deterministic)
        return batch_sharded(x)


def transformer_forward_flops(num_tokens: int, hidden: int, mlp_dim: int, num_layers: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one sample through ``num_layers`` blocks.

    Counts q/k/v/out projections, the two attention matmuls and the MLP; ignores norms, softmax and
    activations (the usual convention, e.g. for ViT-B/16 at 224 px this gives the well-known 35.1 GFLOPs
    together with the patch embedding).
    """
    projections = 2 * num_tokens * hidden * (4 * hidden + 2 * mlp_dim)
    attention_matmuls = 2 * 2 * num_tokens * num_tokens * hidden
    return num_layers * (projections + attention_matmuls)


def compute_dtype(name: str, platform: str | None = None) -> Dtype:
    """Maps a config string ('float32', 'bfloat16', 'float16') to a jnp dtype, with a clear error for anything else
    and for float16 on CPU (XLA:CPU has no float16 matmul); jobs pass their mesh's platform before any work."""
    allowed = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if name not in allowed:
        raise ValueError(f"unknown compute dtype {name!r}; use one of {sorted(allowed)}")
    if name == "float16" and platform == "cpu":
        raise ValueError("compute dtype 'float16' does not run on CPU (XLA:CPU has no float16 matmul): use float32 or "
                         "bfloat16 here; float16 is for GPUs")  # fmt: skip
    return allowed[name]
