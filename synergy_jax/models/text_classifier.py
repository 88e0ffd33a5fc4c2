"""transformers' `RobertaForSequenceClassification` as a Linen module: the text model of GLUE fine-tuning.

docs/reference.md R5.3: the reference fine-tunes the pre-trained text tower as `RobertaForSequenceClassification`,
i.e. the encoder without its pooler (`add_pooling_layer=False`; the Synergy pooler and projection are not used)
and a fresh standard head on the `<s>` state:

    dropout -> dense(hidden -> hidden) -> tanh -> dropout -> out_proj(hidden -> num_labels)

with dropout probability `classifier_dropout`, or `hidden_dropout_prob` when that is unset. Regression (STS-B) is
`num_labels=1`. Parameters: `{"roberta": <RobertaTower(with_pooler=False) params>, "classifier": {"dense",
"out_proj"}}`, laid out so that `weights.save_hf_sequence_classifier` writes transformers' key names.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from synergy_jax.models import layers
from synergy_jax.models.text import RobertaConfig, RobertaTower


class RobertaClassificationHead(nn.Module):
    """transformers' `RobertaClassificationHead` on the `<s>` state (docs/reference.md R5.3).

    Kernels start N(0, init_std) with zero biases, as transformers' `_init_weights` starts the fresh head of the
    reference. Axis names: `dense` like the pooler (`embed` -> `mlp`), `out_proj` reads `mlp` and writes labels,
    which no sharding rule splits (a handful of outputs).
    """

    num_labels: int
    dropout_rate: float
    init_std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, first_token: jax.Array, deterministic: bool) -> jax.Array:
        init = nn.initializers.normal(self.init_std)

        def dense(features: int, names: tuple[str | None, str | None], name: str) -> nn.Dense:
            return nn.Dense(
                features,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=layers.logical(init, names),
                bias_init=layers.logical(nn.initializers.zeros, names[1:]),
                name=name,
            )

        x = nn.Dropout(self.dropout_rate, deterministic=deterministic)(first_token)
        x = jnp.tanh(dense(first_token.shape[-1], ("embed", "mlp"), "dense")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=deterministic)(x)
        return dense(self.num_labels, ("mlp", None), "out_proj")(x)


class RobertaClassifier(nn.Module):
    """`(input_ids, attention_mask, deterministic) -> logits (batch, num_labels)`, float32 whatever the dtype.

    `classifier_dropout` is transformers' `RobertaConfig.classifier_dropout`. It lives here rather than on
    `RobertaConfig` because that config is part of every pre-training run record, which a new field would make
    incompatible with the runs already saved; `weights.load_hf_sequence_classifier` reads it from config.json.
    """

    config: RobertaConfig
    num_labels: int
    classifier_dropout: float | None = None

    @property
    def dropout_rate(self) -> float:
        """The head's dropout: `classifier_dropout` if set, else `hidden_dropout_prob` (as transformers)."""
        return self.config.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 (1 = regression), got {self.num_labels}")
        cfg = self.config
        _, first_token = RobertaTower(cfg, with_pooler=False, name="roberta")(input_ids, attention_mask, deterministic)
        head = RobertaClassificationHead(
            self.num_labels,
            self.dropout_rate,
            cfg.initializer_range,
            layers.compute_dtype(cfg.dtype),
            name="classifier",
        )
        return head(first_token, deterministic).astype(jnp.float32)


def from_text_tower(tower_params: Mapping[str, Any]) -> dict[str, Any]:
    """The `roberta` params of a `RobertaClassifier`, from a pre-trained text tower's params.

    This is how fine-tuning starts (docs/reference.md R5.3): the tower of a pre-training run
    (`checkpoint.restore_params(run, mesh, ["text_model"])[0]["text_model"]`) or of a hub checkpoint
    (`weights.load_hf_tower(...)[1]`) minus its pooler, which the classifier does not have. The head is not
    here: it starts fresh (`RobertaClassifier.init`). The arrays are shared, not copied.
    """
    if "text_model" in tower_params:
        raise ValueError("pass the text tower's own params (params['text_model']), not the whole model's")
    if "word_embeddings" not in tower_params or "encoder" not in tower_params:
        raise ValueError(
            "not the params of a RoBERTa text tower (expected word_embeddings, encoder, ...; got "
            f"{sorted(tower_params)})"
        )
    return {name: value for name, value in tower_params.items() if name != "pooler"}
