"""Fine-tuning models: a pre-trained tower with a classification head, as the reference fine-tunes them.

Image and audio (docs/reference.md R5): the tower's pooled output -> the pre-trained projection (bias-free,
trainable) -> a new `Linear(projection -> classes)` with torch's default initialisation; no normalisation, no
dropout added; everything trains. With `projection_dim=0` the classifier sits on the pooled output directly (the
plain hub towers the paper compares with have no Synergy projection).

Parameter names are the tri-modal model's (`vision_model`, `vision_projection`, ...), so a pre-training run's
tower and projection drop in unchanged, plus `classifier`. Every model takes the batch dict, like SynergyCLIP, so
the train-state helpers of synergy_jax.train serve them too.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from synergy_jax.models import layers, param_groups, tower_kind
from synergy_jax.models.hf_config import TowerConfig
from synergy_jax.models.text_classifier import RobertaClassifier

class ProjectionClassifier(nn.Module):
    """`batch -> logits (B, num_classes)` for an image or audio tower."""

    modality: str  # 'image' or 'audio'
    tower: TowerConfig
    projection_dim: int  # 0: no projection
    num_classes: int

    @nn.compact
    def __call__(self, batch: dict[str, jax.Array], deterministic: bool = True) -> jax.Array:
        tower_name, projection_name = param_groups(self.modality)
        _, pooled = tower_kind(self.tower).module_cls(self.tower, name=tower_name)(batch[self.modality], deterministic)
        features = pooled.astype(jnp.float32)
        if self.projection_dim:
            features = nn.Dense(self.projection_dim, use_bias=False, param_dtype=jnp.float32,
                                kernel_init=layers.logical(layers.torch_kernel_init(), ("embed", "proj")),
                                name=projection_name)(features)  # fmt: skip
        width = features.shape[-1]
        return nn.Dense(self.num_classes, param_dtype=jnp.float32,
                        kernel_init=layers.logical(layers.torch_kernel_init(), (None, None)),
                        bias_init=layers.logical(layers.torch_bias_init(width), (None,)), name="classifier")(features)  # fmt: skip


class TextClassifier(RobertaClassifier):
    """transformers' RobertaForSequenceClassification (models/text_classifier.py) taking the batch dict."""

    def __call__(self, batch: dict[str, jax.Array], deterministic: bool = True) -> jax.Array:  # type: ignore[override]
        return super().__call__(batch["input_ids"], batch["attention_mask"], deterministic)
