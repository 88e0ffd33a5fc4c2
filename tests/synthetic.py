"""Tiny Synergy models and random batches shared by the train-step tests."""

import numpy as np

from synergy_jax.models import synergy

TEXT_LENGTH = 16


def tiny_config(layers: int = 1, dropout: bool = True) -> synergy.SynergyConfig:
    """The 'tiny' preset with `layers` blocks per tower; RoBERTa dropout on (as in training) unless disabled."""
    config = synergy.preset_config("tiny")
    text = config.text.replace(num_hidden_layers=layers)
    if not dropout:
        text = text.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return synergy.SynergyConfig(
        vision=config.vision.replace(num_hidden_layers=layers),
        text=text,
        audio=config.audio.replace(num_hidden_layers=layers),
        projection_dim=config.projection_dim,
    )


def random_batch(config: synergy.SynergyConfig, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Images, right-padded token ids with varied lengths, and AST-shaped features."""
    rng = np.random.default_rng(seed)
    vision, text, audio = config.vision, config.text, config.audio
    lengths = rng.integers(3, TEXT_LENGTH + 1, size)
    mask = (np.arange(TEXT_LENGTH)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask, rng.integers(3, text.vocab_size, (size, TEXT_LENGTH)), text.pad_token_id).astype(np.int32)
    ids[:, 0] = text.bos_token_id
    return {
        "image": rng.normal(size=(size, vision.image_size, vision.image_size, vision.num_channels)).astype(np.float32),
        "input_ids": ids,
        "attention_mask": mask,
        "audio": rng.normal(size=(size, audio.max_length, audio.num_mel_bins)).astype(np.float32),
    }


def random_embeddings(size: int, dim: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Unit-norm embeddings per modality with some image/text/audio correlation (so losses are not trivial)."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(size, dim))
    out = {}
    for name in ("image", "text", "audio"):
        x = shared + rng.normal(size=(size, dim))
        out[name] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out
