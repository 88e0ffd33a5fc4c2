"""Tower configs that mirror Hugging Face `config.json` files field for field.

A tower config is a frozen dataclass whose hub-facing fields carry the Hugging Face names and defaults (so a
config.json that omits a field means what it means in transformers), plus three run-time knobs that never go to
disk: ``dtype`` (compute dtype), ``remat`` (recompute block activations in the backward pass) and ``attention``
(the attention implementation, `synergy_jax.models.attention`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="TowerConfig")

RUNTIME_FIELDS = ("dtype", "remat", "attention")


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """Base class: conversion to and from Hugging Face config dictionaries."""

    # Set by subclasses: the `model_type` and `architectures` entry written on export.
    model_type: ClassVar[str]
    architecture: ClassVar[str]
    # Values that the Flax port does not implement, as {field: allowed values}; checked by `validate`.
    supported_values: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @classmethod
    def hf_field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in RUNTIME_FIELDS)

    @classmethod
    def from_hf_dict(cls: type[T], hf: dict[str, Any], **runtime: Any) -> T:
        """Builds the config from a config.json dict; missing fields take transformers' defaults."""
        for name, allowed in cls.supported_values.items():
            if name in hf and hf[name] not in allowed:
                raise ValueError(
                    f"{cls.__name__}: config.json has {name}={hf[name]!r}, which this port does not implement "
                    f"(supported: {list(allowed)})"
                )
        values = {name: hf[name] for name in cls.hf_field_names() if name in hf}
        config = cls(**values, **runtime)
        config.validate()
        return config

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json content transformers needs to rebuild this tower."""
        hf = {name: getattr(self, name) for name in self.hf_field_names()}
        hf["model_type"] = self.model_type
        hf["architectures"] = [self.architecture]
        return hf

    def validate(self) -> None:
        from synergy_jax.models.attention import IMPLEMENTATIONS

        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"{type(self).__name__}: attention={self.attention!r}; known: {IMPLEMENTATIONS}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"{type(self).__name__}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)
