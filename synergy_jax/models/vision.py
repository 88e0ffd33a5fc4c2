"""The CLIP ViT vision tower (transformers' CLIPVisionModel) as a Linen module.

patch conv (no bias) -> [CLS] + patches -> + position embedding -> pre_layrnorm -> pre-LN blocks (quick_gelu)
-> last_hidden_state;  pooled = post_layernorm(last_hidden_state[:, 0]).
Like transformers, `last_hidden_state` is taken *before* post_layernorm.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from synergy_jax.models import layers
from synergy_jax.models.hf_config import TowerConfig


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(TowerConfig):
    """Field names and defaults as transformers.CLIPVisionConfig."""

    model_type = "clip_vision_model"
    architecture = "CLIPVisionModel"
    supported_values = {"hidden_act": tuple(layers.ACTIVATIONS)}

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    dtype: str = "float32"
    remat: bool = False
    attention: str = "auto"  # the attention implementation (synergy_jax.models.attention), per backend by default

    def validate(self) -> None:
        super().validate()
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1

    def forward_flops(self) -> int:
        """Matmul FLOPs of one image (see `layers.transformer_forward_flops`)."""
        patch_embed = 2 * self.num_patches * self.patch_size**2 * self.num_channels * self.hidden_size
        blocks = layers.transformer_forward_flops(
            self.num_tokens, self.hidden_size, self.intermediate_size, self.num_hidden_layers
        )
        return patch_embed + blocks


PRESETS = {
    "openai/clip-vit-base-patch16": CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16
    ),
    "openai/clip-vit-large-patch14": CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14
    ),
    "tiny": CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    ),
}


def example_inputs(config: CLIPVisionConfig, batch: int = 1) -> tuple[jax.Array, ...]:
    """Zero inputs of the right shape, for shape inference and initialisation."""
    return (jnp.zeros((batch, config.image_size, config.image_size, config.num_channels), jnp.float32),)


class CLIPVisionTower(nn.Module):
    """`(images NHWC float, deterministic) -> (last_hidden_state, pooled)`."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dtype = layers.compute_dtype(cfg.dtype)
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"CLIP vision tower expects images of shape (batch, *{expected}) NHWC, got {images.shape}")
        init = nn.initializers.normal(cfg.initializer_range)
        x = nn.Conv(
            cfg.hidden_size,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=layers.logical(init, ("patch", "patch", None, "embed")),
            name="patch_embedding",
        )(images.astype(dtype))
        batch = x.shape[0]
        x = x.reshape(batch, cfg.num_patches, cfg.hidden_size)
        cls = self.param("class_embedding", layers.logical(init, ("embed",)), (cfg.hidden_size,), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (batch, 1, cfg.hidden_size)), x], axis=1)
        pos = self.param(
            "position_embedding", layers.logical(init, ("position", "embed")), (cfg.num_tokens, cfg.hidden_size), jnp.float32
        )
        x = x + pos.astype(dtype)
        x = layers.layer_norm(cfg.layer_norm_eps, dtype, "pre_layernorm")(x)
        spec = layers.block_spec(cfg, pre_norm=True, attention_dropout=cfg.attention_dropout)
        x = layers.Encoder(spec, cfg.num_hidden_layers, cfg.remat, dtype, name="encoder")(x, None, deterministic)
        pooled = layers.layer_norm(cfg.layer_norm_eps, dtype, "post_layernorm")(x[:, 0])
        return x, pooled
