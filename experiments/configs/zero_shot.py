"""Zero-shot evaluation config: `--config=experiments/configs/zero_shot.py`, any field overridable as --config.x=y
(and each by its own short flag, e.g. --dataset=esc50 = --config.dataset=esc50; see experiments/zero_shot.py).

Also here, as code: the prompt sets and the named datasets `experiments/zero_shot.py` knows.

Prompt sets: `single` is the reference's protocol (REFERENCE_SPEC §5.4: one template per modality, no final period);
`ensemble` averages the normalised text embeddings of several templates per class (CLIP's prompt ensembling).
"""

import ml_collections

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
# split is each set's test split (the reference used Flowers-102's 'validation' split, spec §5.4; --split=validation
# restores it).
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
# Also accepted: 'tfds:<name>' (any prepared TFDS image classification set) and 'folder', 'folder:image',
# 'folder:audio' (a class-per-folder directory).


def get_config() -> ml_collections.ConfigDict:
    """Every setting of the job. Empty strings mean "the run's own" (tokenizer, text mode) or "the default"."""
    config = ml_collections.ConfigDict()
    config.checkpoint = "runs/demo"  # pre-training run folder (where `python experiments/pretrain.py` writes the demo)
    config.dataset = "demo"  # a DATASETS name, tfds:<name> or folder[:image|audio]
    # Dataset root (ESC-50, UrbanSound8K, class folders), TFDS data_dir, precomputed folder or manifest CSV; demo: a
    # demo data root (raw/ + precomputed/), default the run's own data.
    config.data_dir = ""
    config.split = ""  # TFDS / precomputed split; '': the set's test split (demo: the run's eval split)
    config.folds = "all"  # ESC-50 / UrbanSound8K folds: all, 1-5, 1,3, ...
    config.prompts = "ensemble"  # a PROMPT_SETS name: single | ensemble
    config.class_names = ""  # optional file, one class name per line, checked against the dataset's label order
    config.mesh = "-1x1"  # DxM device mesh (any mesh; the checkpoint's need not match)
    config.sharding = "replicate"  # parameter rules: replicate | fsdp | tp | fsdp_tp
    config.batch_size = 128  # global; divisible by the data axis and the process count
    config.step = -1  # checkpoint step; -1: the latest
    config.dtype = "float32"  # compute dtype of the towers (bfloat16 on TPU/GPU is fine)
    config.tokenizer = ""  # hub id or folder; '': the run's
    config.text_mode = ""  # retrieval text: caption | prompt; '': the run's
    config.out = ""  # results JSON; '': <checkpoint>/zero_shot/<dataset>_<prompts>.json (confusion PNGs beside it)
    config.workers = 8  # threads decoding images / audio
    config.progress = True  # progress bars
    return config
