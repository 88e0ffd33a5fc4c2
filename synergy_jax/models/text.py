"""The RoBERTa text tower (transformers' RobertaModel, with its pooler) as a Linen module.

word + position + token-type embeddings -> LayerNorm -> dropout -> post-LN blocks (exact GELU)
-> last_hidden_state;  pooled = tanh(Dense(last_hidden_state[:, 0])) (the `<s>` token).
Built with `with_pooler=False` it is transformers' `RobertaModel(add_pooling_layer=False)`, the encoder inside
`RobertaForSequenceClassification` (see `text_classifier.py`).
Position ids count non-pad tokens from padding_idx + 1; pads get padding_idx, exactly as transformers does.
The hub checkpoints carry no pooler weights: `weights.load_hf_tower` initialises it and says so.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from synergy_jax.models import layers
from synergy_jax.models.hf_config import TowerConfig


# The reference tokenises every text to 32 tokens (max_length=32, padding='max_length').
REFERENCE_TEXT_LENGTH = 32


@dataclasses.dataclass(frozen=True)
class RobertaConfig(TowerConfig):
    """Field names and defaults as transformers.RobertaConfig."""

    model_type = "roberta"
    architecture = "RobertaModel"
    supported_values = {
        "hidden_act": tuple(layers.ACTIVATIONS),
        "position_embedding_type": ("absolute", None),
        "is_decoder": (False,),
        "add_cross_attention": (False,),
    }

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    dtype: str = "float32"
    remat: bool = False
    attention: str = "auto"  # the attention implementation (synergy_jax.models.attention), per backend by default

    @property
    def max_text_length(self) -> int:
        """Longest sequence the position table covers (positions start after padding_idx)."""
        return self.max_position_embeddings - self.pad_token_id - 1

    def forward_flops(self, seq_len: int = REFERENCE_TEXT_LENGTH) -> int:
        """Matmul FLOPs of one sequence of `seq_len` tokens, pooler included."""
        blocks = layers.transformer_forward_flops(
            seq_len, self.hidden_size, self.intermediate_size, self.num_hidden_layers
        )
        return blocks + 2 * self.hidden_size**2


_ROBERTA_HUB = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)
PRESETS = {
    "FacebookAI/roberta-base": RobertaConfig(**_ROBERTA_HUB),
    "FacebookAI/roberta-large": RobertaConfig(
        **_ROBERTA_HUB, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    "tiny": RobertaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
    ),
}


def position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """transformers' `create_position_ids_from_input_ids`: pads -> pad_token_id, tokens -> pad_token_id + 1 + k."""
    not_pad = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + pad_token_id


def example_inputs(config: RobertaConfig, batch: int = 1, length: int = REFERENCE_TEXT_LENGTH) -> tuple[jax.Array, ...]:
    """Zero inputs of the right shape, for shape inference and initialisation."""
    length = min(length, config.max_text_length)
    return jnp.zeros((batch, length), jnp.int32), jnp.ones((batch, length), jnp.int32)


class RobertaTower(nn.Module):
    """`(input_ids, attention_mask, deterministic) -> (last_hidden_state, pooled)`.

    `with_pooler=False` is transformers' `add_pooling_layer=False`: fine-tuning (docs/reference.md R5.3) puts its
    own head on the `<s>` state and never uses the pre-training pooler, so no `pooler` parameters exist (nothing to
    train, shard or export) and the second output is the un-pooled `<s>` state `last_hidden_state[:, 0]`, which
    is what that head reads.
    """

    config: RobertaConfig
    with_pooler: bool = True

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dtype = layers.compute_dtype(cfg.dtype)
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"RoBERTa expects input_ids and attention_mask of equal shape (batch, length), got "
                f"{input_ids.shape} and {attention_mask.shape}"
            )
        if input_ids.shape[1] > cfg.max_text_length:
            raise ValueError(
                f"text length {input_ids.shape[1]} exceeds the {cfg.max_text_length} positions of this RoBERTa"
            )
        init = nn.initializers.normal(cfg.initializer_range)

        def embed(num: int, name: str, axis: str) -> nn.Embed:
            return nn.Embed(
                num,
                cfg.hidden_size,
                dtype=dtype,
                param_dtype=jnp.float32,
                embedding_init=layers.logical(init, (axis, "embed")),
                name=name,
            )

        x = embed(cfg.vocab_size, "word_embeddings", "vocab")(input_ids)
        x = x + embed(cfg.max_position_embeddings, "position_embeddings", "position")(
            position_ids(input_ids, cfg.pad_token_id)
        )
        # One segment: every token gets token type 0, as transformers' default buffer.
        x = x + embed(cfg.type_vocab_size, "token_type_embeddings", None)(jnp.zeros_like(input_ids))
        x = layers.layer_norm(cfg.layer_norm_eps, dtype, "embeddings_layernorm")(x)
        x = nn.Dropout(cfg.hidden_dropout_prob, deterministic=deterministic)(x)
        mask = attention_mask.astype(bool)[:, None, None, :]  # (batch, heads, query, key)
        spec = layers.block_spec(
            cfg,
            pre_norm=False,
            attention_dropout=cfg.attention_probs_dropout_prob,
            hidden_dropout=cfg.hidden_dropout_prob,
        )
        x = layers.Encoder(spec, cfg.num_hidden_layers, cfg.remat, dtype, name="encoder")(x, mask, deterministic)
        if not self.with_pooler:
            return x, x[:, 0]
        pooled = nn.Dense(
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=layers.logical(init, ("embed", "mlp")),
            bias_init=layers.logical(nn.initializers.zeros, ("mlp",)),
            name="pooler",
        )(x[:, 0])
        return x, jnp.tanh(pooled)
