"""Contrastive losses: symmetric InfoNCE per modality pair and the tri-modal weighted sum.

Reference (docs/reference.md R1.4): for each pair (a, b) with logits L = exp(s) * a @ b.T,
clip_loss = (CE(L, arange) + CE(L.T, arange)) / 2, and loss = alpha*IT + beta*TA + gamma*AI.

Two kinds of negatives, both computed per device inside `jax.shard_map` over the 'data' axis:
- `global`: every modality is all-gathered over 'data'; each device scores its local rows against all columns
  (labels offset by the device's position) in both directions, and the per-device means are averaged. This equals
  the full-batch loss exactly, and its gradients flow back through the gather's transpose (a reduce-scatter), so
  no custom VJP is needed.
- `local`: negatives only within each device's shard (what the reference's DDP did); the loss is the mean of the
  per-shard losses. With `local_batch` > 0 each shard is further split into contrastive groups of that size, so
  the statistics do not depend on the device count: the reference's 35 per GPU on 2 GPUs is `local_batch=35` on
  1, 2, 4, ... devices alike (docs/reference.md R8).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from synergy_jax.models.synergy import PAIRS

NEGATIVES = ("global", "local")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    alpha: float = 1.0  # image-text weight
    beta: float = 1.0  # text-audio weight
    gamma: float = 1.0  # audio-image weight
    negatives: str = "global"
    local_batch: int = 0  # negatives='local': contrastive groups of this size within each shard; 0: the whole shard

    def __post_init__(self) -> None:
        if self.negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {self.negatives!r}")
        if self.local_batch < 0 or (self.local_batch and self.negatives != "local"):
            raise ValueError(f"local_batch={self.local_batch} needs negatives='local' and a positive size (0: off)")

    def contrastive_batch(self, microbatch: int, data_axis: int) -> int:
        """Examples each one is contrasted with (itself included) for a global microbatch over the data axis."""
        if self.negatives == "global":
            return microbatch
        per_device = microbatch // data_axis
        if self.local_batch and per_device % self.local_batch:
            raise ValueError(f"loss.local_batch={self.local_batch} must divide the per-device microbatch "
                             f"{per_device} (= batch / accumulation steps / data axis {data_axis})")  # fmt: skip
        return self.local_batch or per_device

    @property
    def pair_weights(self) -> dict[str, float]:
        return {"it": self.alpha, "ta": self.beta, "ai": self.gamma}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels (float32)."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean((jnp.argmax(logits, axis=1) == labels).astype(jnp.float32))


def pair_loss(
    rows: jax.Array, cols: jax.Array, rows_all: jax.Array, cols_all: jax.Array, log_scale: jax.Array, offset: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Symmetric InfoNCE of local rows/cols against (possibly gathered) cols_all/rows_all.

    Local sample i is the positive of global column `offset + i`. Returns (loss, retrieval accuracy), each the mean
    of the two directions over the local samples.
    """
    scale = jnp.exp(log_scale)
    labels = offset + jnp.arange(rows.shape[0])
    row_logits = scale * rows @ cols_all.T  # a -> b
    col_logits = scale * cols @ rows_all.T  # b -> a
    loss = 0.5 * (cross_entropy(row_logits, labels) + cross_entropy(col_logits, labels))
    acc = 0.5 * (accuracy(row_logits, labels) + accuracy(col_logits, labels))
    return loss, acc


def grouped_pair_loss(rows: jax.Array, cols: jax.Array, log_scale: jax.Array, group: int) -> tuple[jax.Array, jax.Array]:
    """`pair_loss` within each run of `group` consecutive samples, averaged over the (equal-sized) groups."""
    if rows.shape[0] % group:
        raise ValueError(f"loss.local_batch={group} does not divide the {rows.shape[0]} samples of a shard")

    def split(x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0] // group, group, *x.shape[1:])

    per_group = jax.vmap(pair_loss, in_axes=(0, 0, 0, 0, None, None))
    loss, acc = per_group(split(rows), split(cols), split(rows), split(cols), log_scale, jnp.zeros((), jnp.int32))
    return jnp.mean(loss), jnp.mean(acc)


def tri_modal_loss_local(
    embeddings: dict[str, jax.Array],
    log_scales: dict[str, jax.Array],
    config: LossConfig,
    axis_name: str | None,
) -> dict[str, jax.Array]:
    """The per-device computation (call inside shard_map; `axis_name=None` means a single device).

    Returns the weighted total, the pair losses and the pair accuracies, averaged over the 'data' axis.
    """
    gather = config.negatives == "global" and axis_name is not None
    if gather:
        gathered = {name: jax.lax.all_gather(x, axis_name, tiled=True) for name, x in embeddings.items()}
        offset = jax.lax.axis_index(axis_name) * next(iter(embeddings.values())).shape[0]
    else:
        gathered, offset = embeddings, jnp.zeros((), jnp.int32)
    metrics = {}
    grouped = not gather and config.local_batch > 0
    for pair, (a, b) in PAIRS.items():
        if grouped:
            loss, acc = grouped_pair_loss(embeddings[a], embeddings[b], log_scales[pair], config.local_batch)
        else:
            loss, acc = pair_loss(embeddings[a], embeddings[b], gathered[a], gathered[b], log_scales[pair], offset)
        metrics[f"loss/{pair}"], metrics[f"acc/{pair}"] = loss, acc
    metrics["loss"] = sum(config.pair_weights[pair] * metrics[f"loss/{pair}"] for pair in PAIRS)
    if axis_name is not None:
        metrics = jax.lax.pmean(metrics, axis_name)
    return metrics


def tri_modal_loss(
    mesh: Mesh, config: LossConfig
) -> Callable[[dict[str, jax.Array], dict[str, jax.Array]], dict[str, jax.Array]]:
    """The tri-modal loss over a mesh: embeddings sharded on 'data' in, replicated scalar metrics out."""
    batch_spec = jax.P("data")

    def per_device(embeddings, log_scales):
        return tri_modal_loss_local(embeddings, log_scales, config, "data")

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=({name: batch_spec for name in ("image", "text", "audio")}, jax.P()),
        out_specs=jax.P(),
    )
