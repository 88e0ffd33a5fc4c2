"""Zero-shot evaluation config: `--config=experiments/configs/zero_shot.py`, any field overridable as --config.x=y
(and each by its own short flag, e.g. --dataset=esc50 = --config.dataset=esc50; see experiments/zero_shot.py).

Also here, as code: the prompt sets and the named datasets `experiments/zero_shot.py` knows.

Prompt sets: `single` is the reference's protocol (docs/reference.md R5.4: one template per modality, no final period);
`ensemble` averages the normalised text embeddings of several templates per class (CLIP's prompt ensembling).
"""

import ml_collections

from synergy_jax import cli
from synergy_jax.errors import SetupError

# The reference's zero-shot templates (ZS_image_task.py / ZS_audio_task.py), verbatim.
SINGLE = {
    "image": ("this is a photo of {}",),
    "audio": ("this is a sound of {}",),
}

# CLIP's 80 ImageNet prompt templates (openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb), verbatim and
# in order, including "a origami" and "itap of".
CLIP_IMAGE_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)  # fmt: skip

# Audio has no canonical ensemble; this set (ours) varies the carrier word (sound, audio, recording, clip), the
# determiner and the recording quality, in the spirit of CLIP's image set, and starts with the reference's template.
AUDIO_TEMPLATES = (
    "this is a sound of {}",
    "this is the sound of {}.",
    "a sound of {}.",
    "the sound of {}.",
    "the sound of a {}.",
    "a recording of {}.",
    "a recording of a {}.",
    "an audio recording of {}.",
    "an audio clip of {}.",
    "a short clip of {}.",
    "a loud sound of {}.",
    "a quiet sound of {}.",
    "a noisy recording of {}.",
    "a clear recording of {}.",
    "{} can be heard.",
    "you can hear {}.",
)

ENSEMBLE = {"image": CLIP_IMAGE_TEMPLATES, "audio": AUDIO_TEMPLATES}
PROMPT_SETS = {"single": SINGLE, "ensemble": ENSEMBLE}

# --dataset names -> (kind, options). 'tfds' sets are read from a prepared array_record TFDS data_dir; the default
# split is each set's test split (the reference used Flowers-102's 'validation' split, docs/reference.md R5.4;
# --split=validation restores it).
DATASETS = {
    "demo": ("demo", {}),
    "precomputed": ("precomputed", {}),
    "esc50": ("esc50", {}),
    "urbansound8k": ("urbansound8k", {}),
    "us8k": ("urbansound8k", {}),
    "cifar10": ("tfds", {"tfds_name": "cifar10", "split": "test"}),
    "cifar100": ("tfds", {"tfds_name": "cifar100", "split": "test"}),
    "oxford_iiit_pet": ("tfds", {"tfds_name": "oxford_iiit_pet", "split": "test"}),
    "pets": ("tfds", {"tfds_name": "oxford_iiit_pet", "split": "test"}),
    "oxford_flowers102": ("tfds", {"tfds_name": "oxford_flowers102", "split": "test"}),
    "flowers102": ("tfds", {"tfds_name": "oxford_flowers102", "split": "test"}),
}


def dataset_kind(name: str) -> tuple[str, dict]:
    """--dataset -> (kind, options): a DATASETS name, 'tfds:<name>' (any prepared TFDS image classification set) or
    'folder', 'folder:image', 'folder:audio' (a class-per-folder directory)."""
    prefix, _, rest = name.partition(":")
    if name in DATASETS:
        return DATASETS[name][0], dict(DATASETS[name][1])
    if prefix == "tfds" and rest:
        return "tfds", {"tfds_name": rest, "split": "test"}
    if prefix == "folder" and rest in ("", "image", "audio"):
        return "folder", {"modality": rest or None}
    raise SetupError(f"unknown --dataset={name!r}; known: {sorted(DATASETS)}, tfds:<name>, folder[:image|audio]")


# Every setting of the job: field -> (default, help). No None: '' means "the run's own" or "the default". Each field is
# also a short flag of the same name (`--dataset=esc50` = `--config.dataset=esc50`).
FIELDS = {
    "checkpoint": ("runs/demo", "Pre-training run folder; the default is where `python experiments/pretrain.py` "
                   "writes the demo run."),
    "dataset": ("demo", "demo | precomputed | esc50 | urbansound8k | cifar10 | cifar100 | oxford_iiit_pet | "
                "oxford_flowers102 | tfds:<name> | folder[:image|audio] (DATASETS in experiments/configs/zero_shot.py)."),
    "data_dir": ("", "Dataset root (ESC-50, UrbanSound8K, class folders), TFDS data_dir, precomputed folder or "
                 "manifest CSV. demo: a demo data root (raw/ + precomputed/); '': the run's own data."),
    "split": ("", "TFDS / precomputed split; '': test (demo: the run's eval split)."),
    "folds": ("all", "ESC-50 / UrbanSound8K folds to evaluate: all, 1-5, 1,3, ..."),
    "prompts": ("ensemble", "single: the reference's one template; ensemble: CLIP's 80 image / our 16 audio "
                "templates (PROMPT_SETS in experiments/configs/zero_shot.py)."),
    "class_names": ("", "Optional file, one class name per line, in the order you expect; the job stops if the "
                    "dataset's label metadata disagrees."),
    "mesh": ("-1x1", "Device mesh DxM (any mesh; the checkpoint's need not match)."),
    "sharding": ("replicate", "Parameter rules: replicate | fsdp | tp | fsdp_tp."),
    "batch_size": (128, "Global batch (divisible by the data axis and the process count)."),
    "step": (-1, "Checkpoint step; -1: the latest."),
    "dtype": ("float32", "Compute dtype of the towers (bfloat16 on TPU/GPU is fine)."),
    "tokenizer": ("", "Tokenizer (hub id or folder); '': the run's."),
    "text_mode": ("", "Retrieval text: caption | prompt; '': the run's."),
    "out": ("", "Results JSON; '': <checkpoint>/zero_shot/<dataset>_<prompts>.json. The confusion-matrix PNGs go "
            "next to it."),
    "workers": (8, "Threads decoding images / audio."),
    "progress": (True, "Show progress bars."),
}  # fmt: skip

# The legal values of the numeric fields, checked before the job does anything.
RANGES = {"batch_size": cli.AT_LEAST_ONE, "step": cli.Range(-1, integer=True), "workers": cli.AT_LEAST_ONE}


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({name: default for name, (default, _) in FIELDS.items()})
