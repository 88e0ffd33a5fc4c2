"""Pre-training configs: `--config=experiments/configs/pretrain.py:<name>`, any field overridable as --config.x=y.

    demo     tiny towers from scratch on the embedded demo data (CPU, minutes); the default
    base_p   Base towers (CLIP ViT-B/16, RoBERTa-base, AST 12-12), text = random synonym in a random prompt
    base_c   Base towers, text = the row's caption
    large_p  Large towers (CLIP ViT-L/14, RoBERTa-large, AST 10-10), prompts
    large_c  Large towers, captions

The four paper models use the reference's hyperparameters (docs/reference.md R3): per-device batch 35 (Base) / 14
(Large) on 2 devices with 4 / 8 accumulation steps, i.e. a global batch of 280 / 224 split into 4 / 8 contrastive
microbatches; AdamW lr 5e-6, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on every parameter, constant; 10 epochs;
text length 32; seeds 77 (Base) / 42 (Large); fp32; negatives only within groups of 35 / 14 ('local' with
`loss.local_batch`), as the reference's DDP, whatever the device count (1 device: 2 groups per microbatch, 2 devices:
one each, as the reference). `--config.loss.negatives=global --config.loss.local_batch=0` contrasts every
microbatch across all devices instead (what scales).
"""

import ml_collections

from synergy_jax import cli, train
from synergy_jax.models.synergy import PRESETS

# (per-device batch, devices, accumulation steps, seed) of the reference runs.
PAPER_BATCH = {"base": (35, 2, 4, 77), "large": (14, 2, 8, 42)}
TEXT_MODES = {"p": "prompt", "c": "caption"}


def common() -> ml_collections.ConfigDict:
    """Fields every config has; the named configs below change what differs."""
    config = ml_collections.ConfigDict()
    config.name = ""
    config.seed = 0
    config.workdir = ""  # run folder (checkpoints, metrics, TensorBoard); '': runs/<name> (--workdir)
    config.mesh = "-1x1"  # DxM: D-way data, M-way model parallel, -1 = the rest (--mesh)

    config.model = ml_collections.ConfigDict()
    config.model.init = "hub"  # 'hub': pretrained towers from hub ids / local folders; 'scratch': random init
    config.model.vision = ""  # hub id or folder (init=hub); tower preset name, e.g. 'tiny' (init=scratch)
    config.model.text = ""
    config.model.audio = ""
    config.model.projection_dim = 768
    # init=scratch only: fields replaced in each tower preset (image and audio shapes come from the data, the text
    # vocabulary from the tokenizer).
    config.model.vision_overrides = ml_collections.ConfigDict()
    config.model.text_overrides = ml_collections.ConfigDict()
    config.model.audio_overrides = ml_collections.ConfigDict()
    config.model.dtype = "float32"  # compute dtype; 'bfloat16' on TPU/GPU (params and optimizer stay fp32)
    config.model.remat = False
    config.model.attention = "auto"  # xla | heads_first | cudnn | splash | auto (per backend; synergy_jax/models/attention.py)
    config.model.logit_scale_max = 0.0  # 0: unclamped (the reference); 4.6052 = CLIP's clamp at 100

    config.data = ml_collections.ConfigDict()
    config.data.demo = False  # True: generate + precompute the embedded demo dataset into data.dir
    config.data.dir = ""  # precomputed shards + metadata (data_pipelines/precompute.py output); demo: <workdir>/data
    config.data.train_manifest = ""  # optional: precompute this manifest into data.dir first (resumable)
    config.data.eval_manifest = ""
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.text_mode = "prompt"  # 'prompt' (p models) or 'caption' (c models)
    config.data.tokenizer = ""  # default: the text tower's hub id (init=hub)
    config.data.max_length = 32
    config.data.image_size = 224
    config.data.max_frames = 1024  # precompute front-end shape (used when this job precomputes)
    config.data.mel_bins = 128
    config.data.augment_image = True
    config.data.augment_audio = True
    config.data.augment_on = "host"  # or "device": the train step augments (synergy_jax/device_augment.py)
    config.data.reference_eval_augmentation = False  # True: augment eval data too (the reference's bug 21/27)
    config.data.workers = 0  # Grain worker processes per host (0: threads in the trainer process)
    config.data.read_threads = 4
    config.data.prefetch = 8
    config.data.input_slices = 0  # the global batch is assembled from this many input slices; 0: one per process

    config.batch_size = 256  # global, per optimizer step (all devices x accumulation steps)
    config.accum_steps = 1
    config.epochs = 10
    config.total_steps = 0  # >0 overrides epochs
    config.optimizer = train.optimizer_config()
    # negatives 'local' with local_batch N: contrastive groups of N within each device's microbatch (0: the whole
    # device shard); 'global': the whole microbatch across devices (local_batch must be 0).
    config.loss = ml_collections.ConfigDict(dict(alpha=1.0, beta=1.0, gamma=1.0, negatives="local", local_batch=0))
    config.sharding = "replicate"  # parameter rules: replicate | fsdp | tp | fsdp_tp

    config.eval_batch_size = 256  # global
    config.eval_every = 0  # steps; 0: once per epoch (and always at the end)
    config.evals = ("contrastive", "retrieval", "zero_shot")  # what runs on the eval split (synergy_jax/evaluators)
    config.eval_contrastive_batch = 0  # batch of the reported eval pair losses; 0: the training microbatch
    config.zero_shot_image_templates = ("this is a photo of {}",)  # the reference's ZS prompts (docs/reference.md R5.4)
    config.zero_shot_audio_templates = ("this is a sound of {}",)

    config.log_every = 50
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    config.resume_data = True  # restore the input pipeline position (False: restart its order, keep the model)
    config.peak_tflops = 0.0  # per device, for MFU where the device is not in synergy_jax.flops.PEAK_TFLOPS
    config.progress = True
    return config


# The legal values of the numeric fields, checked before the job does anything (the tower overrides are checked by
# the tower configs themselves).
RANGES = {
    "seed": cli.COUNT,
    "model.projection_dim": cli.AT_LEAST_ONE,
    "model.logit_scale_max": cli.NON_NEGATIVE,
    **{f"data.{field}": cli.AT_LEAST_ONE for field in ("max_length", "image_size", "max_frames", "mel_bins",
                                                       "read_threads")},  # fmt: skip
    **{f"data.{field}": cli.COUNT for field in ("workers", "prefetch", "input_slices")},
    "batch_size": cli.AT_LEAST_ONE,
    "accum_steps": cli.AT_LEAST_ONE,
    "epochs": cli.COUNT,
    "total_steps": cli.COUNT,
    **{f"optimizer.{field}": allowed for field, allowed in train.OPTIMIZER_RANGES.items()},
    **{f"loss.{field}": cli.NON_NEGATIVE for field in ("alpha", "beta", "gamma")},
    "loss.local_batch": cli.COUNT,
    "eval_batch_size": cli.AT_LEAST_ONE,
    "eval_every": cli.COUNT,
    "eval_contrastive_batch": cli.COUNT,
    "log_every": cli.AT_LEAST_ONE,
    "checkpoint_every": cli.AT_LEAST_ONE,
    "keep_checkpoints": cli.AT_LEAST_ONE,
    "peak_tflops": cli.NON_NEGATIVE,
}


def demo() -> ml_collections.ConfigDict:
    """Tiny towers trained from scratch on the demo data: a few minutes on a 2-core CPU."""
    config = common()
    config.name = "demo"
    config.seed = 0
    config.model.init = "scratch"
    config.model.vision = config.model.text = config.model.audio = "tiny"
    config.model.projection_dim = 64
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config.model.vision_overrides = ml_collections.ConfigDict(dict(tower, patch_size=8))
    config.model.text_overrides = ml_collections.ConfigDict(dict(tower, hidden_dropout_prob=0.1))
    config.model.audio_overrides = ml_collections.ConfigDict(dict(tower, frequency_stride=16, time_stride=16))
    config.data.demo = True
    config.data.text_mode = "prompt"
    config.data.image_size = 32
    config.data.max_frames = 128  # 1 s clips are 98 frames
    config.data.mel_bins = 32
    config.data.read_threads = 2
    config.batch_size = 32
    # Negatives across the whole global batch, so the demo optimises the same objective on any mesh (with 'local' an
    # 8x1 mesh would contrast 4 examples per device); on one device the two are the same. The paper configs keep
    # the reference's 'local'.
    config.loss.negatives = "global"
    config.epochs = 150  # 750 steps of 32
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "warmup_cosine"
    config.optimizer.warmup_steps = 20
    config.optimizer.weight_decay = 0.01
    config.eval_batch_size = 32
    config.eval_every = 250
    config.log_every = 10
    config.checkpoint_every = 100
    config.keep_checkpoints = 2
    return config


def paper(size: str, text: str) -> ml_collections.ConfigDict:
    """The reference's pre-training of Synergy-CLIP {Base, Large}_{p, c}."""
    config = common()
    config.name = f"{size}_{text}"
    vision, text_tower, audio, projection_dim = PRESETS[size]
    per_device, devices, accum, seed = PAPER_BATCH[size]
    config.seed = seed
    config.model.init = "hub"
    config.model.vision, config.model.text, config.model.audio = vision, text_tower, audio
    config.model.projection_dim = projection_dim
    config.data.text_mode = TEXT_MODES[text]
    config.data.tokenizer = text_tower
    config.batch_size = per_device * devices * accum
    config.accum_steps = accum
    config.loss.local_batch = per_device  # the reference's 35 / 14 per GPU on any number of devices
    config.eval_batch_size = per_device * devices * 4
    config.epochs = 10
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or "demo"
    if name == "demo":
        return demo()
    size, _, text = name.partition("_")
    if size not in PAPER_BATCH or text not in TEXT_MODES:
        raise ValueError(f"unknown pretrain config {name!r}; known: demo, base_p, base_c, large_p, large_c")
    return paper(size, text)
