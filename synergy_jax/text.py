"""Text side of the data: the reference's 72 prompt templates, the two text modes, tokenizer loading.

Text modes (docs/reference.md R1.5): `caption` uses the row's caption ("c" models); `prompt` picks one synonym of the
comma-separated label uniformly and one of the 72 templates uniformly and formats them ("p" models). Randomness
comes from the numpy Generator the caller passes (Grain seeds one per element), never from global state.

Tokenisation as the reference (docs/reference.md R2.4): a Hugging Face tokenizer (RoBERTa's byte-level BPE by default),
`max_length` 32, padding to max length, truncation, attention mask, no token type ids.
"""

from __future__ import annotations

import os
import threading
from typing import Sequence

import numpy as np

TEXT_MODES = ("prompt", "caption")
DEFAULT_TOKENIZER = "FacebookAI/roberta-base"
DEFAULT_MAX_LENGTH = 32
# A Hugging Face fast tokenizer call sets padding/truncation on its shared Rust backend before encoding, so two
# threads (Grain read threads) can encode with each other's settings: serialise the calls.
_TOKENIZER_LOCK = threading.Lock()

# The 72 templates, verbatim and in order, from the reference's dataset.py (TEMPLATES, lines 20-104) in
# github.com/JoSangYeon/Synergy-CLIP, which adapts openai/CLIP data/prompts.md. Data, not code: keep them exact
# (including "a example", "of during" and the six without a final period).
TEMPLATES = (
    "a video of {}.",
    "a video about {}.",
    "a video of using {}.",
    "a video of doing {}.",
    "a video of during {}.",
    "a video of performing {}.",
    "a example of {}.",
    "a example about {}.",
    "a example of using {}.",
    "a example of doing {}.",
    "a example of during {}.",
    "a example of performing {}.",
    "a demonstration of {}.",
    "a demonstration about {}.",
    "a demonstration of using {}.",
    "a demonstration of doing {}.",
    "a demonstration of during {}.",
    "a demonstration of performing {}.",
    "a photo and sound of {}.",
    "a photo and sound about {}.",
    "a photo and sound of using {}.",
    "a photo and sound of doing {}.",
    "a photo and sound of during {}.",
    "a photo and sound of performing {}.",
    "a photo and audio of {}.",
    "a photo and audio about {}.",
    "a photo and audio of using {}.",
    "a photo and audio of doing {}.",
    "a photo and audio of during {}.",
    "a photo and audio of performing {}.",
    "a image and sound of {}.",
    "a image and sound about {}.",
    "a image and sound of using {}.",
    "a image and sound of doing {}.",
    "a image and sound of during {}.",
    "a image and sound of performing {}.",
    "a image and audio of {}.",
    "a image and audio about {}.",
    "a image and audio of using {}.",
    "a image and audio of doing {}.",
    "a image and audio of during {}.",
    "a image and audio of performing {}.",
    "this is a video of {}",
    "this is a demonstration of {}",
    "this is a photo and sound of {}",
    "this is a photo and audio of {}",
    "this is a image and sound of {}",
    "this is a image and audio of {}",
    "a bad video of {}.",
    "a bad example of {}.",
    "a bad demonstration of {}.",
    "a bad photo and sound of {}.",
    "a bad photo and audio of {}.",
    "a bad image and sound of {}.",
    "a bad image and audio of {}.",
    "a good video of {}.",
    "a good example of {}.",
    "a good demonstration of {}.",
    "a good photo and sound of {}.",
    "a good photo and audio of {}.",
    "a good image and sound of {}.",
    "a good image and audio of {}.",
    "video of {} I've taken and recorded.",
    "photo and sound of {} I've taken and recorded.",
    "photo and audio about {} I've taken and recorded.",
    "image and sound of {} I've taken and recorded.",
    "image and audio about {} I've taken and recorded.",
    "video of {} you've taken and recorded.",
    "photo and sound of {} you've taken and recorded.",
    "photo and audio about {} you've taken and recorded.",
    "image and sound of {} you've taken and recorded.",
    "image and audio about {} you've taken and recorded.",
)


def synonyms(label: str) -> list[str]:
    """The comma-separated synonyms of a label, stripped ("engine accelerating, revving" -> 2 names)."""
    words = [word.strip() for word in label.split(",") if word.strip()]
    if not words:
        raise ValueError(f"label {label!r} has no synonym")
    return words


def random_prompt(label: str, rng: np.random.Generator, templates: Sequence[str] = TEMPLATES) -> str:
    """One uniformly chosen synonym in one uniformly chosen template (the reference's prompt mode, docs/reference.md R1.5).

    The reference formats a single stripped synonym in Dataset_Step1; its MMR dataset formatted the whole Python
    list (docs/reference.md bug 26), which we do not reproduce.
    """
    words = synonyms(label)
    word = words[rng.integers(len(words))]
    return templates[rng.integers(len(templates))].format(word)


def example_text(mode: str, label: str, caption: str, rng: np.random.Generator) -> str:
    """The text of one example in `mode` ('prompt' or 'caption')."""
    if mode == "caption":
        return caption
    if mode == "prompt":
        return random_prompt(label, rng)
    raise ValueError(f"text mode must be one of {TEXT_MODES}, got {mode!r}")


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_TOKENIZER):
    """A Hugging Face tokenizer from a hub id (needs the hub or its local cache) or a saved directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.fspath(name_or_path))
    except OSError as error:
        raise OSError(
            f"cannot load tokenizer {name_or_path!r}: pass a directory saved with save_pretrained, or a hub id "
            f"that is in the local Hugging Face cache when the hub is unreachable ({error})"
        ) from error


def tokenize(
    tokenizer, texts: str | Sequence[str], max_length: int = DEFAULT_MAX_LENGTH, pairs: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """{'input_ids', 'attention_mask'}: int32 (n, max_length), padded to max_length and truncated as the reference.
    `pairs`: the second sentence of each text (GLUE's sentence pairs, joined by the tokenizer's separator)."""
    single = isinstance(texts, str)
    with _TOKENIZER_LOCK:
        encoded = tokenizer(
            [texts] if single else list(texts),
            None if pairs is None else list(pairs),
            max_length=max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            return_token_type_ids=False,
            return_tensors="np",
        )
    return {key: np.asarray(encoded[key], np.int32) for key in ("input_ids", "attention_mask")}
