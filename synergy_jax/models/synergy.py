"""The Synergy-CLIP model: three towers, bias-free projections, L2 normalisation, three learnable temperatures.

Parameter names follow the reference (`vision_model`, `text_model`, `audio_model`, `{vision,text,audio}_projection`,
`logit_scale_{it,ta,ai}`). Pooled tower outputs are projected without bias to `projection_dim` and L2-normalised;
each modality pair has its own logit scale, initialised to 2.6592 = ln(1/0.07) and unclamped by default as in the
reference (docs/reference.md R1.3); `logit_scale_max` adds CLIP's clamp (ln 100 = 4.6052) as an option.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synergy_jax.models import audio, layers, preset, text, vision
from synergy_jax.models.hf_config import TowerConfig

# (rows, columns) of each pair's logit matrix, as the reference orients them: IT rows are images, TA rows are texts,
# AI rows are audio clips (the symmetric loss does not depend on it).
PAIRS = {"it": ("image", "text"), "ta": ("text", "audio"), "ai": ("audio", "image")}
LOGIT_SCALE_INIT = 2.6592


@dataclasses.dataclass(frozen=True)
class SynergyConfig:
    vision: vision.CLIPVisionConfig
    text: text.RobertaConfig
    audio: audio.ASTConfig
    projection_dim: int
    logit_scale_init: float = LOGIT_SCALE_INIT
    logit_scale_max: float | None = None  # None: unclamped, as the reference

    def with_runtime(self, dtype: str, remat: bool, attention: str = "auto") -> "SynergyConfig":
        """The same model with the compute dtype / remat / attention knobs set on all three towers."""
        runtime = dict(dtype=dtype, remat=remat, attention=attention)
        return dataclasses.replace(self, vision=self.vision.replace(**runtime), text=self.text.replace(**runtime),
                                   audio=self.audio.replace(**runtime))  # fmt: skip

    def forward_flops(self, text_length: int = text.REFERENCE_TEXT_LENGTH) -> int:
        """Matmul FLOPs of one (image, text, audio) triple through towers and projections."""
        towers = self.vision.forward_flops() + self.text.forward_flops(text_length) + self.audio.forward_flops()
        projections = 2 * self.projection_dim * (self.vision.hidden_size + self.text.hidden_size + self.audio.hidden_size)
        return towers + projections


# docs/reference.md R1.1: the Base and Large trios (the "Large" AST is the same width as Base, with a finer stride).
PRESETS = {
    "base": ("openai/clip-vit-base-patch16", "FacebookAI/roberta-base", "MIT/ast-finetuned-audioset-12-12-0.447", 768),
    "large": ("openai/clip-vit-large-patch14", "FacebookAI/roberta-large", "MIT/ast-finetuned-audioset-10-10-0.4593", 1024),
    "tiny": ("tiny", "tiny", "tiny", 16),
}


def preset_config(name: str, **runtime: Any) -> SynergyConfig:
    """'base', 'large' or 'tiny' built from the tower presets (no weights)."""
    if name not in PRESETS:
        raise KeyError(f"no Synergy preset {name!r}; known: {sorted(PRESETS)}")
    vision_name, text_name, audio_name, projection_dim = PRESETS[name]
    return SynergyConfig(
        vision=preset("vision", vision_name, **runtime),
        text=preset("text", text_name, **runtime),
        audio=preset("audio", audio_name, **runtime),
        projection_dim=projection_dim,
    )


def resized(config: SynergyConfig, layers: int = 0, width: int = 0, heads: int = 0, projection: int = 0) -> SynergyConfig:
    """The same trio with every tower's depth, width (MLP at 4x the width) and heads replaced where given (0 keeps
    the preset's): towers of one's choosing for benchmarks, keeping each preset's inputs (image, patches, frames)."""
    changes: dict[str, int] = {}
    if layers:
        changes["num_hidden_layers"] = layers
    if width:
        changes.update(hidden_size=width, intermediate_size=4 * width)
    if heads:
        changes["num_attention_heads"] = heads
    return dataclasses.replace(config, vision=config.vision.replace(**changes), text=config.text.replace(**changes),
                               audio=config.audio.replace(**changes),
                               projection_dim=projection or config.projection_dim)  # fmt: skip


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / ||x||, computed in float32 (the reference divides by the norm with no epsilon)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True))


class SynergyCLIP(nn.Module):
    """`(batch) -> (normalised embeddings per modality, logit scale per pair)`.

    `batch` holds "image" (B,H,W,C), "input_ids"/"attention_mask" (B,L) and "audio" (B,frames,mel). The
    `embed_*` methods run one tower + projection (unnormalised, like the reference's `get_*_features`), for
    evaluation jobs that need a single modality.
    """

    config: SynergyConfig

    def setup(self) -> None:
        cfg = self.config
        self.vision_model = vision.CLIPVisionTower(cfg.vision)
        self.text_model = text.RobertaTower(cfg.text)
        self.audio_model = audio.ASTTower(cfg.audio)

        def projection() -> nn.Dense:
            return nn.Dense(
                cfg.projection_dim,
                use_bias=False,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                kernel_init=layers.logical(layers.torch_kernel_init(), ("embed", "proj")),
            )

        self.vision_projection = projection()
        self.text_projection = projection()
        self.audio_projection = projection()
        scale_init = layers.logical(nn.initializers.constant(cfg.logit_scale_init), ())
        self.logit_scale_it = self.param("logit_scale_it", scale_init, (), jnp.float32)
        self.logit_scale_ta = self.param("logit_scale_ta", scale_init, (), jnp.float32)
        self.logit_scale_ai = self.param("logit_scale_ai", scale_init, (), jnp.float32)

    def embed_image(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        _, pooled = self.vision_model(images, deterministic)
        return self.vision_projection(pooled.astype(jnp.float32))

    def embed_text(self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        _, pooled = self.text_model(input_ids, attention_mask, deterministic)
        return self.text_projection(pooled.astype(jnp.float32))

    def embed_audio(self, features: jax.Array, deterministic: bool = True) -> jax.Array:
        _, pooled = self.audio_model(features, deterministic)
        return self.audio_projection(pooled.astype(jnp.float32))

    def logit_scales(self) -> dict[str, jax.Array]:
        """log of the multiplier applied to each pair's cosine similarities (clamped only if configured)."""
        scales = {"it": self.logit_scale_it, "ta": self.logit_scale_ta, "ai": self.logit_scale_ai}
        if self.config.logit_scale_max is not None:
            scales = {pair: jnp.minimum(s, self.config.logit_scale_max) for pair, s in scales.items()}
        return scales

    def __call__(
        self, batch: dict[str, jax.Array], deterministic: bool = True
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        embeddings = {
            "image": self.embed_image(batch["image"], deterministic),
            "text": self.embed_text(batch["input_ids"], batch["attention_mask"], deterministic),
            "audio": self.embed_audio(batch["audio"], deterministic),
        }
        return {name: l2_normalize(x) for name, x in embeddings.items()}, self.logit_scales()


def example_batch(config: SynergyConfig, batch: int = 1, text_length: int = text.REFERENCE_TEXT_LENGTH) -> dict[str, jax.Array]:
    """Zero inputs of the right shapes (for init and shape inference)."""
    (images,) = vision.example_inputs(config.vision, batch)
    input_ids, attention_mask = text.example_inputs(config.text, batch, text_length)
    (features,) = audio.example_inputs(config.audio, batch)
    return {"image": images, "input_ids": input_ids, "attention_mask": attention_mask, "audio": features}


def config_from_towers(
    tower_configs: dict[str, TowerConfig], projection_dim: int, **options: Any
) -> SynergyConfig:
    """A SynergyConfig around tower configs read from checkpoints (e.g. `weights.load_hf_tower(...)[0].config`)."""
    return SynergyConfig(
        vision=tower_configs["vision"], text=tower_configs["text"], audio=tower_configs["audio"],
        projection_dim=projection_dim, **options,
    )  # fmt: skip
