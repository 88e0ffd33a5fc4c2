"""The Audio Spectrogram Transformer (transformers' ASTModel) as a Linen module.

input (batch, frames, mel_bins) -> transpose to freq x time -> 16x16 conv with stride (frequency, time)
-> freq-major patch sequence -> [CLS, DIST] + patches -> + position embedding -> pre-LN blocks -> final LayerNorm
-> last_hidden_state;  pooled = (h[:, 0] + h[:, 1]) / 2.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from synergy_jax.models import layers
from synergy_jax.models.hf_config import TowerConfig


@dataclasses.dataclass(frozen=True)
class ASTConfig(TowerConfig):
    """Field names and defaults as transformers.ASTConfig."""

    model_type = "audio-spectrogram-transformer"
    architecture = "ASTModel"
    supported_values = {"hidden_act": tuple(layers.ACTIVATIONS), "qkv_bias": (True,)}

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    patch_size: int = 16
    qkv_bias: bool = True
    frequency_stride: int = 10
    time_stride: int = 10
    max_length: int = 1024
    num_mel_bins: int = 128
    dtype: str = "float32"
    remat: bool = False
    attention: str = "auto"  # the attention implementation (synergy_jax.models.attention), per backend by default

    def validate(self) -> None:
        super().validate()
        if self.num_mel_bins < self.patch_size or self.max_length < self.patch_size:
            raise ValueError(
                f"AST input {self.max_length}x{self.num_mel_bins} is smaller than one {self.patch_size}x"
                f"{self.patch_size} patch"
            )

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(frequency, time) patch counts, as transformers' ASTEmbeddings.get_shape."""
        freq = (self.num_mel_bins - self.patch_size) // self.frequency_stride + 1
        time = (self.max_length - self.patch_size) // self.time_stride + 1
        return freq, time

    @property
    def num_patches(self) -> int:
        freq, time = self.patch_grid
        return freq * time

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 2

    def forward_flops(self) -> int:
        """Matmul FLOPs of one clip (see `layers.transformer_forward_flops`)."""
        patch_embed = 2 * self.num_patches * self.patch_size**2 * self.hidden_size
        blocks = layers.transformer_forward_flops(
            self.num_tokens, self.hidden_size, self.intermediate_size, self.num_hidden_layers
        )
        return patch_embed + blocks


PRESETS = {
    "MIT/ast-finetuned-audioset-12-12-0.447": ASTConfig(frequency_stride=12, time_stride=12),
    "MIT/ast-finetuned-audioset-10-10-0.4593": ASTConfig(frequency_stride=10, time_stride=10),
    "tiny": ASTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        frequency_stride=16,
        time_stride=16,
        max_length=128,
        num_mel_bins=32,
    ),
}


def example_inputs(config: ASTConfig, batch: int = 1) -> tuple[jax.Array, ...]:
    """Zero inputs of the right shape, for shape inference and initialisation."""
    return (jnp.zeros((batch, config.max_length, config.num_mel_bins), jnp.float32),)


class ASTTower(nn.Module):
    """`(features (batch, frames, mel_bins), deterministic) -> (last_hidden_state, pooled)`."""

    config: ASTConfig

    @nn.compact
    def __call__(self, features: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dtype = layers.compute_dtype(cfg.dtype)
        expected = (cfg.max_length, cfg.num_mel_bins)
        if features.ndim != 3 or tuple(features.shape[1:]) != expected:
            raise ValueError(
                f"AST expects features of shape (batch, {cfg.max_length} frames, {cfg.num_mel_bins} mel bins), "
                f"got {features.shape}"
            )
        init = nn.initializers.normal(cfg.initializer_range)
        # (batch, time, freq) -> NHWC image with H = frequency, W = time, one channel.
        x = jnp.swapaxes(features, 1, 2)[..., None].astype(dtype)
        x = nn.Conv(
            cfg.hidden_size,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.frequency_stride, cfg.time_stride),
            padding="VALID",
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=layers.logical(init, ("patch", "patch", None, "embed")),
            bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
            name="patch_embedding",
        )(x)
        batch = x.shape[0]
        x = x.reshape(batch, cfg.num_patches, cfg.hidden_size)  # frequency-major, time-minor
        special = [
            jnp.broadcast_to(
                self.param(name, layers.logical(init, ("embed",)), (cfg.hidden_size,), jnp.float32).astype(dtype),
                (batch, 1, cfg.hidden_size),
            )
            for name in ("cls_token", "distillation_token")
        ]
        x = jnp.concatenate([*special, x], axis=1)
        pos = self.param(
            "position_embedding", layers.logical(init, ("position", "embed")), (cfg.num_tokens, cfg.hidden_size), jnp.float32
        )
        x = nn.Dropout(cfg.hidden_dropout_prob, deterministic=deterministic)(x + pos.astype(dtype))
        spec = layers.block_spec(
            cfg,
            pre_norm=True,
            attention_dropout=cfg.attention_probs_dropout_prob,
            hidden_dropout=cfg.hidden_dropout_prob,
        )
        x = layers.Encoder(spec, cfg.num_hidden_layers, cfg.remat, dtype, name="encoder")(x, None, deterministic)
        x = layers.layer_norm(cfg.layer_norm_eps, dtype, "final_layernorm")(x)
        return x, (x[:, 0] + x[:, 1]) / 2
