"""An embedded tri-modal demo dataset: what the main job trains on when no data is given.

    python -m data_pipelines.demo --out=DIR [--train_per_class=16 --test_per_class=6]

Ten classes, each recognisable from any one modality on its own:
  image   a class-specific shape in a class-specific colour on a dimmed background of that colour (64x64 PNG),
          with jittered position, size, rotation and colours, sometimes a distractor blob, and pixel noise;
  audio   a class-specific sound (pitch, timbre, rhythm) of 1 s at 8 kHz (mono 16-bit WAV, so precompute
          exercises resampling), with random pitch, tempo, gain and background noise;
  text    a caption naming the class with one of its synonyms in a random sentence; the label column holds the
          comma-separated synonyms, as VGGSound's.
Plus a byte-level BPE tokenizer trained on the dataset's text (and the 72 prompt templates) with RoBERTa's special
ids (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last), saved in Hugging Face format.

Deterministic (seeded numpy), about 6 MB, a few seconds. `ensure_demo_data(root)` also precomputes the splits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw

from data_pipelines.manifest import write_manifest

DEMO_VERSION = 2
IMAGE_SIDE = 64
AUDIO_RATE = 8_000
AUDIO_SECONDS = 1.0
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DemoClass:
    synonyms: tuple[str, ...]
    shape: str
    color: tuple[int, int, int]
    sound: str
    phrases: tuple[str, ...]  # what the thing does, for captions

    @property
    def label(self) -> str:
        return ", ".join(self.synonyms)


CLASSES = (
    DemoClass(
        ("bell", "chime", "ding"), "circle", (235, 200, 40), "bell", ("rings out", "chimes softly", "is struck twice")
    ),
    DemoClass(
        ("drum", "beat", "percussion"),
        "square",
        (210, 40, 40),
        "drum",
        ("keeps a steady rhythm", "is hit hard", "thumps"),
    ),
    DemoClass(
        ("whistle", "tweet", "referee whistle"),
        "triangle",
        (40, 200, 220),
        "whistle",
        ("blows sharply", "shrills", "sounds one long note"),
    ),
    DemoClass(
        ("siren", "alarm", "emergency signal"),
        "diamond",
        (40, 70, 220),
        "siren",
        ("wails", "goes up and down", "blares in the street"),
    ),
    DemoClass(("engine", "motor", "rumble"), "bar", (120, 120, 120), "engine", ("idles", "revs low", "rumbles on")),
    DemoClass(
        ("rain", "drizzle", "shower"),
        "stripes",
        (40, 170, 70),
        "rain",
        ("falls steadily", "patters on the roof", "pours down"),
    ),
    DemoClass(("horn", "honk", "trumpet"), "cross", (240, 130, 30), "horn", ("honks", "blasts twice", "sounds loudly")),
    DemoClass(
        ("clock", "ticking", "tick tock"),
        "ring",
        (140, 60, 190),
        "clock",
        ("ticks", "keeps time", "ticks in a quiet room"),
    ),
    DemoClass(
        ("bird", "chirp", "birdsong"), "dots", (230, 70, 170), "bird", ("sings", "chirps in a tree", "calls at dawn")
    ),
    DemoClass(
        ("wind", "breeze", "gust"), "waves", (235, 235, 235), "wind", ("blows", "howls past", "sweeps over a field")
    ),
)

CAPTION_TEMPLATES = (
    "A {adj} {name} {phrase} {place}.",
    "You can hear a {name} that {phrase} {place}.",
    "The {name} {phrase} while {other}.",
    "Close-up of a {adj} {name} which {phrase}.",
    "In this clip a {name} {phrase} {place}.",
)
ADJECTIVES = ("small", "large", "old", "new", "distant", "nearby", "bright", "dull", "loud", "quiet")
PLACES = ("in the morning", "at night", "outside", "in a park", "near the house", "in the city", "on a farm", "indoors")
OTHERS = ("people talk nearby", "a car passes", "the camera shakes", "someone laughs", "a door closes")


# ----------------------------------------------------------------------------------------------- image


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    corners = {"triangle": 3, "square": 4, "diamond": 4}[shape]
    offset = angle + (np.pi / 4 if shape == "square" else 0.0)
    return [
        (cx + r * np.cos(offset + 2 * np.pi * k / corners), cy + r * np.sin(offset + 2 * np.pi * k / corners))
        for k in range(corners)
    ]


def draw_image(spec: DemoClass, rng: np.random.Generator) -> Image.Image:
    """The class's shape on a dimmed version of its colour, so that the class, not per-image nuisance, explains
    most pixel variance (what makes reconstructing a missing image from the other modalities learnable)."""
    side = IMAGE_SIDE
    background = tuple(int(np.clip(0.3 * c + 25 + rng.normal(0, 6), 0, 255)) for c in spec.color)
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        blob = rng.uniform(0, side, 2)
        draw.ellipse([*(blob - 4), *(blob + 4)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))  # distractor
    color = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in spec.color)
    cx, cy = rng.uniform(0.42, 0.58, 2) * side
    r = rng.uniform(0.2, 0.28) * side
    angle = rng.uniform(-0.3, 0.3)
    width = max(2, int(r / 4))
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif spec.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=width)
    elif spec.shape in ("triangle", "square", "diamond"):
        draw.polygon(_shape_polygon(spec.shape, cx, cy, r, angle), fill=color)
    elif spec.shape == "bar":
        draw.rectangle([cx - 1.4 * r, cy - r / 3, cx + 1.4 * r, cy + r / 3], fill=color)
    elif spec.shape == "cross":
        draw.rectangle([cx - r, cy - r / 4, cx + r, cy + r / 4], fill=color)
        draw.rectangle([cx - r / 4, cy - r, cx + r / 4, cy + r], fill=color)
    elif spec.shape == "stripes":
        for x in np.arange(rng.uniform(0, 8), side, 10):
            draw.line([(x, 0), (x + angle * 20, side)], fill=color, width=3)
    elif spec.shape == "dots":
        for _ in range(int(rng.integers(6, 10))):
            x, y = rng.uniform(4, side - 4, 2)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    elif spec.shape == "waves":
        xs = np.arange(side)
        for y0 in np.arange(rng.uniform(4, 12), side, 14):
            ys = y0 + 4 * np.sin(xs / rng.uniform(4, 7) + rng.uniform(0, 6))
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=color, width=2)
    else:
        raise ValueError(spec.shape)
    pixels = np.asarray(image, np.float32) + rng.normal(0, 8, (side, side, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------- audio


def _envelope_hits(t: np.ndarray, period: float, decay: float, phase: float) -> np.ndarray:
    return np.exp(-((t + phase) % period) / decay)


def synthesize(spec: DemoClass, rng: np.random.Generator) -> np.ndarray:
    """1 s of the class's sound at 8 kHz with per-sample pitch/tempo/gain jitter and background noise."""
    n = int(AUDIO_SECONDS * AUDIO_RATE)
    t = np.arange(n) / AUDIO_RATE
    pitch = rng.uniform(0.92, 1.08)
    tempo = rng.uniform(0.85, 1.15)
    phase = rng.uniform(0, 1)
    white = rng.normal(0, 1, n)
    if spec.sound == "bell":
        f = 880 * pitch
        wave = sum(a * np.sin(2 * np.pi * f * m * t) for m, a in ((1, 1.0), (2.76, 0.5), (5.4, 0.25)))
        wave *= _envelope_hits(t, 0.9 / tempo, 0.25, phase)
    elif spec.sound == "drum":
        body = np.sin(2 * np.pi * 70 * pitch * t) + 0.6 * white
        wave = body * _envelope_hits(t, 0.25 / tempo, 0.05, phase)
    elif spec.sound == "whistle":
        wave = np.sin(2 * np.pi * (2300 * pitch + 60 * np.sin(2 * np.pi * 30 * t)) * t) * (
            ((t * tempo + phase) % 1.0) < 0.7
        )
    elif spec.sound == "siren":
        f = np.where(((t * tempo * 1.5 + phase) % 1.0) < 0.5, 600, 900) * pitch
        wave = np.sin(2 * np.pi * np.cumsum(f) / AUDIO_RATE)
    elif spec.sound == "engine":
        f = 55 * pitch
        wave = 2 * ((t * f) % 1.0) - 1 + 0.3 * white * (1 + np.sin(2 * np.pi * 8 * tempo * t))
    elif spec.sound == "rain":
        drops = (rng.random(n) < 0.01) * rng.normal(0, 3, n)
        wave = np.convolve(white, np.ones(3) / 3, "same") + np.convolve(drops, np.exp(-np.arange(40) / 8), "same")
    elif spec.sound == "horn":
        wave = np.sign(np.sin(2 * np.pi * 310 * pitch * t)) * (((t * tempo * 1.2 + phase) % 1.0) < 0.4)
    elif spec.sound == "clock":
        clicks = np.zeros(n)
        period = int(AUDIO_RATE * 0.5 / tempo)
        clicks[int(phase * period) :: period] = 1.0
        wave = np.convolve(clicks, np.sin(2 * np.pi * 3000 * pitch * t[:80]) * np.exp(-np.arange(80) / 12), "same")
    elif spec.sound == "bird":
        local = (t * tempo * 5 + phase) % 1.0
        f = (2200 + 1200 * local) * pitch
        wave = np.sin(2 * np.pi * np.cumsum(f) / AUDIO_RATE) * (local < 0.35)
    elif spec.sound == "wind":
        smooth = np.convolve(white, np.ones(40) / 40, "same") * 6
        wave = smooth * (0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * tempo * t + 6 * phase))
    else:
        raise ValueError(spec.sound)
    wave = wave / (np.abs(wave).max() + 1e-9) * rng.uniform(0.3, 0.8)
    return (wave + rng.uniform(0.005, 0.05) * rng.normal(0, 1, n)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- text


def caption(spec: DemoClass, rng: np.random.Generator) -> str:
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    text = template.format(
        adj=ADJECTIVES[rng.integers(len(ADJECTIVES))],
        name=spec.synonyms[rng.integers(len(spec.synonyms))],
        phrase=spec.phrases[rng.integers(len(spec.phrases))],
        place=PLACES[rng.integers(len(PLACES))],
        other=OTHERS[rng.integers(len(OTHERS))],
    )
    return text[0].upper() + text[1:]


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 1000) -> None:
    """Byte-level BPE with RoBERTa's special ids, saved so that AutoTokenizer.from_pretrained(out_dir) loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaTokenizer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],  # ids 0-3 as RoBERTa's
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens(["<mask>"])  # last id, as RoBERTa's <mask> (50264 in roberta-base)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    wrapped = RobertaTokenizer(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )
    wrapped.save_pretrained(out_dir)


# ----------------------------------------------------------------------------------------------- dataset


@dataclasses.dataclass(frozen=True)
class DemoPaths:
    root: Path
    manifests: dict  # split -> manifest CSV
    tokenizer_dir: Path
    precomputed_dir: Path | None = None
    labels: tuple[str, ...] = tuple(spec.label for spec in CLASSES)


def generate(out: str | os.PathLike, train_per_class: int = 16, test_per_class: int = 6, seed: int = 0) -> DemoPaths:
    """Write images/, audio/, train.csv, test.csv, tokenizer/ and demo.json under `out`; returns the paths."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(exist_ok=True)
    counts = {"train": train_per_class, "test": test_per_class}
    texts = []
    manifests = {}
    for split_index, split in enumerate(SPLITS):
        rows = []
        for class_index, spec in enumerate(CLASSES):
            for k in range(counts[split]):
                rng = np.random.default_rng([seed, split_index, class_index, k])
                stem = f"{split}_{class_index:02d}_{k:03d}"
                draw_image(spec, rng).save(out / "images" / f"{stem}.png", optimize=False)
                soundfile.write(out / "audio" / f"{stem}.wav", synthesize(spec, rng), AUDIO_RATE, subtype="PCM_16")
                text = caption(spec, rng)
                texts.append(text)
                rows.append(
                    {
                        "img_path": f"images/{stem}.png",
                        "wav_path": f"audio/{stem}.wav",
                        "label": spec.label,
                        "caption": text,
                    }
                )
        manifests[split] = out / f"{split}.csv"
        write_manifest(manifests[split], rows)

    from synergy_jax.text import TEMPLATES

    prompts = [template.format(word) for spec in CLASSES for word in spec.synonyms for template in TEMPLATES]
    train_tokenizer(texts + prompts, out / "tokenizer")
    (out / "demo.json").write_text(
        json.dumps(
            {"version": DEMO_VERSION, "seed": seed, "counts": counts, "labels": [spec.label for spec in CLASSES]},
            indent=1,
        )
    )
    return DemoPaths(root=out, manifests=manifests, tokenizer_dir=out / "tokenizer")


def layout(root: str | os.PathLike) -> DemoPaths:
    """Where `ensure_demo_data(root)` keeps the demo: the raw files under root/raw, the shards under
    root/precomputed (nothing is checked or created)."""
    raw = Path(root) / "raw"
    return DemoPaths(root=raw, manifests={split: raw / f"{split}.csv" for split in SPLITS},
                     tokenizer_dir=raw / "tokenizer", precomputed_dir=Path(root) / "precomputed")  # fmt: skip


def _is_generated(root: Path, train_per_class: int, test_per_class: int, seed: int) -> bool:
    try:
        info = json.loads((root / "demo.json").read_text())
    except (OSError, ValueError):
        return False
    expected = {"version": DEMO_VERSION, "seed": seed, "counts": {"train": train_per_class, "test": test_per_class}}
    return all(info.get(key) == value for key, value in expected.items())


def ensure_demo_data(
    root: str | os.PathLike,
    precompute_config=None,
    *,
    train_per_class: int = 16,
    test_per_class: int = 6,
    seed: int = 0,
    workers: int = 0,
    progress: bool = False,
) -> DemoPaths:
    """Generate the demo under root/raw (unless there) and precompute both splits into root/precomputed.

    Precompute is resumable, so a second call only checks fingerprints. `precompute_config` (a
    `data_pipelines.precompute.PrecomputeConfig`) sets image size and front-end shape; default: the reference's.
    """
    from data_pipelines import precompute

    root = Path(root)
    raw = root / "raw"
    if not _is_generated(raw, train_per_class, test_per_class, seed):
        generate(raw, train_per_class, test_per_class, seed)
    config = precompute_config or precompute.PrecomputeConfig()
    precomputed = root / "precomputed"
    for split in SPLITS:
        precompute.precompute(raw / f"{split}.csv", precomputed, config, workers=workers, progress=progress)
    return layout(root)


def _run(argv) -> None:
    from absl import flags

    from synergy_jax import cli

    cli.refuse_positional(argv)
    options = flags.FLAGS
    paths = generate(options.out, options.train_per_class, options.test_per_class, options.seed)
    size = sum(f.stat().st_size for f in Path(options.out).rglob("*") if f.is_file())
    print(
        f"demo dataset: {', '.join(str(p) for p in paths.manifests.values())}, tokenizer {paths.tokenizer_dir}, "
        f"{size / 1e6:.1f} MB"
    )


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("out", None, "Output folder.", required=True)
    flags.DEFINE_integer("train_per_class", 16, "Training examples per class.")
    flags.DEFINE_integer("test_per_class", 6, "Test examples per class.")
    flags.DEFINE_integer("seed", 0, "Generation seed.")
    from synergy_jax import cli

    app.run(_run, flags_parser=cli.parse_flags_or_exit)
    sys.exit(0)
