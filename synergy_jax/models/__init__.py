"""The three pretrained towers (CLIP ViT, RoBERTa, AST) and a registry that addresses them by modality."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn

from synergy_jax.models import audio, text, vision
from synergy_jax.models.hf_config import TowerConfig


@dataclasses.dataclass(frozen=True)
class TowerKind:
    """Everything generic code needs to know about one tower family."""

    modality: str
    config_cls: type[TowerConfig]
    module_cls: type[nn.Module]
    example_inputs: Callable[..., tuple[Any, ...]]
    presets: dict[str, TowerConfig]


# The one modality vocabulary. Data, losses and jobs speak of modalities (image, text, audio); towers, configs and
# parameters are named after the model families (vision, text, audio), as Hugging Face and the reference name them.
MODALITIES = ("image", "text", "audio")
TOWER_OF = {"image": "vision", "text": "text", "audio": "audio"}  # modality -> tower (config field, parameter prefix)


def param_groups(modality: str) -> tuple[str, str]:
    """The tri-modal model's top-level parameters of one modality: its tower and its projection."""
    if modality not in TOWER_OF:
        raise ValueError(f"unknown modality {modality!r}; known: {MODALITIES}")
    return f"{TOWER_OF[modality]}_model", f"{TOWER_OF[modality]}_projection"


TOWERS: dict[str, TowerKind] = {
    "vision": TowerKind("vision", vision.CLIPVisionConfig, vision.CLIPVisionTower, vision.example_inputs, vision.PRESETS),
    "text": TowerKind("text", text.RobertaConfig, text.RobertaTower, text.example_inputs, text.PRESETS),
    "audio": TowerKind("audio", audio.ASTConfig, audio.ASTTower, audio.example_inputs, audio.PRESETS),
}


def tower_kind(config: TowerConfig) -> TowerKind:
    for kind in TOWERS.values():
        if isinstance(config, kind.config_cls):
            return kind
    raise TypeError(f"not a tower config: {type(config).__name__}")


def build_tower(config: TowerConfig) -> nn.Module:
    """The Linen module for a tower config (any of the three families)."""
    return tower_kind(config).module_cls(config)


def preset(modality: str, name: str, **runtime: Any) -> TowerConfig:
    """A preset config by modality and name (a hub id or 'tiny'), with optional dtype/remat overrides."""
    kind = TOWERS[modality]
    if name not in kind.presets:
        raise KeyError(f"no {modality} preset {name!r}; known: {sorted(kind.presets)}")
    return kind.presets[name].replace(**runtime)
