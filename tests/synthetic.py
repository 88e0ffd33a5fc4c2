"""Tiny Synergy models, random batches, and tiny data sets in real formats, shared by the tests."""

import csv
import io
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

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


def tone(rng: np.random.Generator, label: int, rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * (300 + 250 * label) * t) + 0.02 * rng.normal(size=t.size)).astype(np.float32)


def picture(rng: np.random.Generator, label: int, side: int = 40) -> Image.Image:
    pixels = rng.integers(0, 60, (side, side, 3)) + np.array([[[80 * (label % 3), 60 * (label % 4), 40 * label % 255]]])
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


ESC_CLASSES = ["dog", "rooster", "crying_baby", "rain", "church_bells", "car_horn"]  # target order of this fake set


def make_esc50(root: Path, per_class_and_fold: int = 1, folds=(1, 2)) -> Path:
    """meta/esc50.csv + audio/*.wav as the ESC-50 repository (44.1 kHz mono clips; short ones to stay fast)."""
    rng = np.random.default_rng(0)
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    rows = []
    for fold in folds:
        for target, category in enumerate(ESC_CLASSES):
            for take in range(per_class_and_fold):
                name = f"{fold}-{1000 + target}-{'ABC'[take]}-{target}.wav"
                soundfile.write(root / "audio" / name, tone(rng, target, 44_100, 0.5), 44_100)
                rows.append(dict(filename=name, fold=fold, target=target, category=category, esc10=False,
                                 src_file=1000 + target, take="ABC"[take]))  # fmt: skip
    rows.sort(key=lambda r: r["filename"])  # the official csv is sorted by file name, not by class
    with open(root / "meta" / "esc50.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


PET_NAMES = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "Bengal", "beagle"]


def make_tfds(data_dir: Path, name: str = "oxford_iiit_pet", count: int = 18, splits=("test",)) -> list[tuple[Image.Image, int]]:
    """A prepared array_record TFDS dataset (custom builder: Image from PNG bytes + ClassLabel), no TensorFlow; every
    split holds the same `count` examples."""
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(2)
    examples = [(picture(rng, i % len(PET_NAMES)), i % len(PET_NAMES)) for i in range(count)]

    class FakePets(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("4.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(), "label": tfds.features.ClassLabel(names=PET_NAMES),
                "file_name": tfds.features.Text()}))  # fmt: skip

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples() for split in splits}

        def _generate_examples(self):
            for index, (image, label) in enumerate(examples):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                yield index, {"image": buffer.getvalue(), "label": label, "file_name": f"{index}.png"}

    FakePets.name = name
    FakePets(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return examples
