"""Scaled dot-product attention, one function with a choice of implementation per backend (the towers' `attention`).

All take `(batch, length, heads, head_dim)` query/key/value and an optional boolean key mask broadcastable to
`(batch, heads, query, key)`, and compute softmax(q k^T / sqrt(d)) v with the softmax in float32.

- `xla`: `jax.nn.dot_product_attention(implementation="xla")`, XLA's own fusion; the reference path.
- `heads_first`: the same math as batched matmuls over `(batch, heads, length, head_dim)` (`matmul.batch_matmul`).
  XLA:CPU runs long sequences faster this way (docs/performance.md).
- `cudnn`: cuDNN's flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`; GPU only,
  bfloat16 / float16; odd lengths are padded by one token no query attends (cuDNN trains on even lengths only).
- `splash`: Pallas' TPU splash-attention kernel (flash attention in blocks of 128, padding handled as segment
  ids), for AST's long sequences. Under a mesh context (`jax.set_mesh`) it runs per shard (`shard_map` over the
  batch on 'data' and the heads on 'model'); elsewhere it needs a single device. Off TPU it runs in Pallas'
  interpret mode (slow; what the tests use).
- `auto`: on CPU `heads_first` from `HEADS_FIRST_MIN_LENGTH` tokens (CLIP's 197 and AST's; at 197 its forward
  and backward take 11.0 against 15.1 ms), else `xla` (RoBERTa's 32: the two run equally fast); on GPU `cudnn`
  in bfloat16 / float16 from `CUDNN_MIN_LENGTH` tokens, else `xla` (at RoBERTa's 32 XLA's fusion is faster on an
  H200); on TPU `splash` from `SPLASH_MIN_LENGTH` tokens where it can run (one device, or a mesh context), else
  `xla`. The platform is the mesh context's when there is one (so a step traced for a TPU topology on a CPU host
  picks TPU kernels), else JAX's default backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from synergy_jax.models import matmul
from synergy_jax.models.platform import batch_sharded, traced_platform

IMPLEMENTATIONS = ("auto", "xla", "heads_first", "cudnn", "splash")
SPLASH_BLOCK = 128
SPLASH_MIN_LENGTH = 512
HEADS_FIRST_MIN_LENGTH = 64
CUDNN_MIN_LENGTH = 128  # below it XLA's fusion was faster on an H200 (docs/performance.md)


def resolve(implementation: str, dtype, length: int) -> str:
    """The implementation `auto` stands for on this backend (others are returned as they are, after a check)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; known: {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    backend = traced_platform()
    if backend == "gpu":
        half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        return "cudnn" if half and length >= CUDNN_MIN_LENGTH else "xla"
    if backend == "tpu":
        runnable = jax.device_count() == 1 or not jax.sharding.get_abstract_mesh().empty
        return "splash" if length >= SPLASH_MIN_LENGTH and runnable else "xla"
    return "heads_first" if length >= HEADS_FIRST_MIN_LENGTH else "xla"


def dot_product_attention(query, key, value, mask, implementation: str = "auto") -> jax.Array:
    """softmax(q k^T / sqrt(d), masked) v by the chosen implementation (see the module docstring)."""
    chosen = resolve(implementation, query.dtype, query.shape[1])
    if chosen == "xla":
        return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="xla")
    if chosen == "cudnn":
        return _cudnn(query, key, value, mask)
    if chosen == "heads_first":
        return _heads_first(query, key, value, mask)
    return _splash(query, key, value, mask)


def _cudnn(query, key, value, mask) -> jax.Array:
    """cuDNN trains only at even lengths once jax passes it a bias, and jax passes one (possibly empty) on every
    call: on an H200, jax 0.11.2 refused CLIP's 197 and 257 tokens with no mask. So an odd length is padded by one
    token, and the padded query's row is dropped. Without a mask the padding key is excluded by cuDNN's own
    padding mask (per-example lengths), which an H200 ran faster than a bias (docs/performance.md). A key mask
    reaches cuDNN as an additive bias that must span every query and key, so it is broadcast over the batch and
    the queries (heads stay broadcast: the shape seen to work on an H200), the padding key masked, and split over
    the batch as the activations are. A query row with no real key to attend averages the values, now the padding
    key's zeros too: such rows are padding, and are thrown away. jax's partitioning of cuDNN's call keeps each
    operand's split as it comes and does not tie the lengths' to the query's (a query less split than the lengths
    would make every device read past its lengths, silently), so q, k and v are pinned to the same batch split,
    their other dimensions left free: a no-op where the towers' activations are split as usual."""
    (batch, q_len), k_len = query.shape[:2], key.shape[1]
    q_pad, k_pad = q_len % 2, k_len % 2
    lengths = {}
    if mask is not None:
        mask = jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, (batch, 1, q_len, k_len)))
        mask = batch_sharded(jnp.pad(mask, [(0, 0), (0, 0), (0, q_pad), (0, k_pad)]))  # padded keys: never attended
    elif q_pad or k_pad:
        lengths = {"query_seq_lengths": batch_sharded(jnp.full((batch,), q_len, jnp.int32)),
                   "key_value_seq_lengths": batch_sharded(jnp.full((batch,), k_len, jnp.int32))}  # fmt: skip
    query = batch_sharded(jnp.pad(query, [(0, 0), (0, q_pad), (0, 0), (0, 0)]), others_free=True)
    key, value = (batch_sharded(jnp.pad(x, [(0, 0), (0, k_pad), (0, 0), (0, 0)]), others_free=True)
                  for x in (key, value))
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="cudnn", **lengths)[:, :q_len]


def _heads_first(query, key, value, mask) -> jax.Array:
    """Heads-first batched matmuls (`matmul.batch_matmul`, with XLA:CPU-friendly gradients) with the softmax's
    division deferred to the output (one divide per output element instead of per probability), the scale applied
    to the queries, and the max shift outside the gradient (softmax does not depend on it)."""
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (query * query.shape[-1] ** -0.5, key, value))
    logits = matmul.batch_matmul(q, k, transpose_b=True, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jnp.exp(logits - jax.lax.stop_gradient(_row_max(logits)))
    out = matmul.batch_matmul(weights.astype(value.dtype), v, preferred_element_type=jnp.float32)
    return (out / matmul.row_sums(weights)).astype(value.dtype).transpose(0, 2, 1, 3)


ROW_MAX_WIDTH = 32  # XLA:CPU's tree-reduction rewriter leaves reductions over at most 32 elements alone


def _row_max(logits) -> jax.Array:
    """The max over the last axis, keepdims. XLA:CPU rewrites a long row reduction into a windowed tree reduction
    that runs far below memory speed; on CPU the rows are folded 32 columns at a time with elementwise maxima (one
    fused pass) and only the last 32 are reduced (three times faster at AST's lengths: docs/performance.md). The
    same value: max is exact in any order. A row holding a NaN gets NaN here; its softmax is NaN either way."""
    width = ROW_MAX_WIDTH
    if traced_platform() != "cpu" or logits.shape[-1] < 2 * width:
        return logits.max(axis=-1, keepdims=True)
    whole = logits.shape[-1] // width * width
    folded = functools.reduce(jnp.maximum, (logits[..., i : i + width] for i in range(0, whole, width)))
    row_max = folded.max(axis=-1, keepdims=True)
    rest = logits[..., whole:]
    return jnp.maximum(row_max, rest.max(axis=-1, keepdims=True)) if rest.shape[-1] else row_max


def _key_padding(mask, batch: int, length: int) -> jax.Array:
    """A (batch, key) validity mask from a key-padding mask broadcastable to (batch, 1, 1, key)."""
    if mask is None:
        return jnp.ones((batch, length), bool)
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        raise ValueError(f"splash attention takes key-padding masks of shape (batch, 1, 1, key), got {mask.shape}")
    return jnp.broadcast_to(mask[:, 0, 0, :], (batch, length))


def _splash(query, key, value, mask) -> jax.Array:
    batch, length, heads, _ = query.shape
    valid = _key_padding(mask, batch, length)
    padded = -(-length // SPLASH_BLOCK) * SPLASH_BLOCK  # the kernel works in whole blocks
    pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (query * query.shape[-1] ** -0.5, key, value))
    # Segment ids: queries 1, real keys 1, padded keys 0, so no query attends a padded key.
    q_segments = jnp.ones((batch, padded), jnp.int32)
    kv_segments = jnp.pad(valid.astype(jnp.int32), [(0, 0), (0, padded - length)])
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = _splash_kernel(q, k, v, q_segments, kv_segments)
    else:
        from jax.sharding import PartitionSpec as P

        heads_axis = "model" if "model" in mesh.axis_names and heads % mesh.shape["model"] == 0 else None
        spec, segments = P("data", heads_axis, None, None), P("data", None)
        out = jax.shard_map(_splash_kernel, mesh=mesh, in_specs=(spec, spec, spec, segments, segments), out_specs=spec,
                            check_vma=False)(q, k, v, q_segments, kv_segments)  # fmt: skip
    return out.transpose(0, 2, 1, 3)[:, :length]


def _splash_kernel(q, k, v, q_segments, kv_segments) -> jax.Array:
    """Pallas splash attention over (batch, heads, padded length, head_dim), scaled queries, one shard."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    kernel = _make_kernel(q.shape[1], q.shape[2], traced_platform() != "tpu")
    return jax.vmap(kernel)(q, k, v, segment_ids=splash.SegmentIds(q=q_segments, kv=kv_segments))


@functools.lru_cache(maxsize=None)
def _make_kernel(heads: int, length: int, interpret: bool):
    """One kernel per shape, kept for the process: building it turns the mask into block tables. The kept kernel
    must serve any later trace, mesh and device, so its tables are kept as host numpy arrays. Built inside the
    first caller's trace they were that trace's tracers, and the next function traced at the same shape failed
    (a pre-training job with `attention=splash` stopped at its second trace); built eagerly under a mesh they
    were arrays committed to that mesh's devices."""
    with jax.ensure_compile_time_eval():
        return jax.tree.map(np.asarray, _build_kernel(heads, length, interpret))


def _build_kernel(heads: int, length: int, interpret: bool):
    """Pallas' splash kernel over `heads` heads of `length` tokens (whole blocks), every query seeing every key
    (padding is left to the segment ids)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    mask = masks.MultiHeadMask([masks.FullMask((length, length)) for _ in range(heads)])
    block = min(SPLASH_BLOCK, length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)  # fmt: skip
    return splash.make_splash_mha(mask=mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
