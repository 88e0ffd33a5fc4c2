"""Parameter counts and analytic forward FLOPs per sample of every tower preset (the basis for MFU).

    python -m synergy_jax.models.summary

FLOPs count matmuls at 2 per multiply-add (norms, softmax and activations ignored); text at the reference's
length of 32 tokens. Parameter counts come from the modules' shapes (nothing is allocated).
"""

from __future__ import annotations

import math

import jax
import flax.linen as nn

from synergy_jax.models import TOWERS, build_tower, text, tower_kind
from synergy_jax.models.hf_config import TowerConfig


def param_count(config: TowerConfig) -> int:
    """Number of parameters of the tower, from `jax.eval_shape` of its init."""
    module = build_tower(config)
    inputs = tower_kind(config).example_inputs(config)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)["params"]
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nn.unbox(shapes)))


def preset_rows() -> list[tuple[str, str, int, int, int]]:
    """(modality, preset, tokens per sample, parameters, forward FLOPs per sample) for every preset."""
    rows = []
    for modality, kind in TOWERS.items():
        for name, config in kind.presets.items():
            tokens = getattr(config, "num_tokens", text.REFERENCE_TEXT_LENGTH)
            rows.append((modality, name, tokens, param_count(config), config.forward_flops()))
    return rows


def main() -> None:
    print(f"{'modality':8s} {'preset':42s} {'tokens':>6s} {'params (M)':>11s} {'fwd GFLOPs/sample':>18s}")
    for modality, name, tokens, params, flops in preset_rows():
        print(f"{modality:8s} {name:42s} {tokens:6d} {params / 1e6:11.2f} {flops / 1e9:18.2f}")


if __name__ == "__main__":
    main()
