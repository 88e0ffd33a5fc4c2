"""synergy-jax: Synergy-CLIP (tri-modal image/text/audio CLIP + missing-modality reconstruction) in JAX/Flax.

The library is pure: modules, functions and configs, no I/O at import. Entry points live in `experiments/`.
"""

__version__ = "0.1.0"
