"""MMR configs: `--config=experiments/configs/mmr.py:<name>`, any field overridable as --config.x=y.

    demo   a small fusion encoder + decoders sized for the demo pre-training run (32 px images, 128x32 features);
           CPU, minutes. The default. Demo-only hyperparameters: steps/lr below and alpha = 0 (MSE-only loss).
    base   ReconstructionConfig Base (docs/reference.md R4.2): encoder 768, decoder 512 x 4 layers x 8 heads, txt_tokens
           96, image decoder 1024@4x4 -> 64@64x64 -> 128x128x3, audio decoder 1024@8x2 -> 64@128x32 -> 256x64
    large  Large: encoder 1024, decoder 768 x 6 x 12, txt_tokens 192, decoders starting at 2048@2x2 / 2048@4x1

Steps and learning rates per missing modality are the reference's run commands (docs/reference.md R4.5; there each "epoch" was
one step on one fixed batch of 32, here a step is a fresh mini-batch of `batch_size` training examples).
`total_steps` / `optimizer.learning_rate` of 0 mean "the task default". AdamW is torch's default (wd 0.01 on every
parameter), constant, as the reference.
"""

import ml_collections

from synergy_jax import cli, train

# (steps, lr) per missing modality (docs/reference.md R4.5 run commands; IDX 0-2).
TASK_DEFAULTS = {
    "base": {"image": (384, 7.5e-4), "text": (48, 2e-4), "audio": (768, 7.5e-4)},
    "large": {"image": (384, 7.5e-4), "text": (48, 2e-4), "audio": (768, 1e-3)},
    "demo": {"image": (500, 3e-3), "text": (300, 1e-3), "audio": (500, 3e-3)},
}
IMG_LAYERS = {
    "base": ((2, 1024, 4, 4), (2, 512, 8, 8), (2, 256, 16, 16), (2, 128, 32, 32), (2, 64, 64, 64)),
    "large": ((2, 2048, 2, 2), (2, 1024, 4, 4), (2, 512, 8, 8), (2, 256, 16, 16), (2, 128, 32, 32), (2, 64, 64, 64)),
    "demo": ((2, 64, 2, 2), (2, 64, 4, 4), (2, 32, 8, 8), (2, 32, 16, 16)),
}
AUD_LAYERS = {
    "base": ((2, 1024, 8, 2), (2, 512, 16, 4), (2, 256, 32, 8), (2, 128, 64, 16), (2, 64, 128, 32)),
    "large": ((2, 2048, 4, 1), (2, 1024, 8, 2), (2, 512, 16, 4), (2, 256, 32, 8), (2, 128, 64, 16), (2, 64, 128, 32)),
    "demo": ((2, 64, 4, 1), (2, 64, 8, 2), (2, 32, 16, 4), (2, 32, 32, 8)),
}
SIZES = {  # encoder_dim, decoder_dim, depth, heads, txt_tokens, img_size, aud_size, mlp_hidden, ff
    "base": (768, 512, 4, 8, 96, 128, (256, 64), 3072, 2048),
    "large": (1024, 768, 6, 12, 192, 128, (256, 64), 3072, 2048),
    "demo": (64, 64, 2, 4, 16, 32, (64, 16), 256, 256),
}

# The legal values of the numeric fields, checked before the job does anything.
RANGES = {
    "seed": cli.COUNT,
    **{f"model.{field}": cli.AT_LEAST_ONE for field in (
        "encoder_dim", "encoder_bottleneck_dim", "decoder_dim", "decoder_depth", "decoder_heads", "decoder_ff_dim",
        "txt_tokens", "img_size", "aud_size", "mlp_hidden_dim", "img_decoder_layer_info", "aud_decoder_layer_info")},
    "model.encoder_dropout": cli.BELOW_ONE,
    "model.decoder_dropout": cli.BELOW_ONE,
    "data.read_threads": cli.AT_LEAST_ONE,
    "data.prefetch": cli.COUNT,
    "batch_size": cli.AT_LEAST_ONE,
    "eval_batch_size": cli.AT_LEAST_ONE,
    "total_steps": cli.COUNT,
    **{f"task_defaults.{missing}": cli.POSITIVE for missing in ("image", "text", "audio")},
    **{f"optimizer.{field}": allowed for field, allowed in train.OPTIMIZER_RANGES.items()},
    "baseline_examples": cli.AT_LEAST_ONE,
    "alpha": cli.FRACTION,
    "eval_every": cli.COUNT,
    "log_every": cli.AT_LEAST_ONE,
    "checkpoint_every": cli.AT_LEAST_ONE,
    "keep_checkpoints": cli.AT_LEAST_ONE,
    "num_samples": cli.COUNT,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or "demo"
    if name not in SIZES:
        raise ValueError(f"unknown MMR config {name!r}; known: {sorted(SIZES)}")
    enc, dec, depth, heads, txt_tokens, img_size, aud_size, mlp_hidden, ff = SIZES[name]
    config = ml_collections.ConfigDict()
    config.name = name
    config.seed = 17  # the reference's default
    config.checkpoint = "runs/demo"  # the pre-training run folder (default: the main job's demo run) (--checkpoint)
    config.missing = ""  # the modality to reconstruct: image, text or audio; required (--missing)
    config.workdir = ""  # MMR run folder; '': runs/mmr_<name>_<missing> (--workdir)
    config.mesh = "-1x1"  # any mesh; the pre-training mesh need not match (--mesh)

    config.model = ml_collections.ConfigDict(dict(
        encoder_dim=enc, encoder_bottleneck_dim=128 if name != "demo" else 32, encoder_dropout=0.1,
        decoder_dim=dec, decoder_depth=depth, decoder_heads=heads, decoder_dropout=0.1, decoder_ff_dim=ff,
        txt_tokens=txt_tokens, img_size=img_size, aud_size=aud_size, mlp_hidden_dim=mlp_hidden,
        img_decoder_layer_info=IMG_LAYERS[name], aud_decoder_layer_info=AUD_LAYERS[name],
        channel_gate="sum_of_sigmoids",  # the reference's CBAM (docs/reference.md bug 8); 'sigmoid_of_sum' = standard
        text_mean_over_pads=False,  # True: the reference's token mean including pads (docs/reference.md bug 17)
    ))  # fmt: skip

    config.data = ml_collections.ConfigDict()
    config.data.dir = ""  # precomputed shards; default: the pre-training run's data
    config.data.tokenizer = ""  # default: the pre-training run's tokenizer
    config.data.text_mode = ""  # default: the pre-training run's ('prompt' or 'caption')
    config.data.train_split = "train"
    config.data.eval_split = "test"  # held out (the reference scored its one training batch, docs/reference.md bug 37)
    config.data.read_threads = 2
    config.data.prefetch = 4

    config.batch_size = 32  # global
    config.eval_batch_size = 32
    config.total_steps = 0  # 0: TASK_DEFAULTS[name][missing]
    config.task_defaults = ml_collections.ConfigDict({k: list(v) for k, v in TASK_DEFAULTS[name].items()})
    config.optimizer = train.optimizer_config()
    config.optimizer.learning_rate = 0.0  # 0: the task default
    config.baseline_examples = 4096  # training examples averaged for the mean-target / majority-token baselines
    # Weight of (1 - SSIM) in the image/audio loss: the reference's 0.75 for base/large. The demo uses 0 (MSE [+ L1]):
    # its targets are mostly per-clip noise the inputs do not carry, and the SSIM term rewards hallucinated texture
    # (demo, 500 steps: audio 14.1 dB with 0.75 vs 15.9 dB with 0, mean-target baseline 14.6 dB; docs/mmr.md).
    config.alpha = 0.75 if name != "demo" else 0.0

    # Reference behaviour, each a bug we fix by default (docs/mmr.md):
    config.reference_unnormalized_images = False  # True: [0,1] images into the vision tower (docs/reference.md bug 38)
    config.text_loss_on_pads = False  # True: text CE over every position, pads included (docs/reference.md bug 19)
    config.reference_batch_stats_at_eval = False  # True: BatchNorm batch statistics at evaluation (docs/reference.md bug 37)
    # True: audio SSIM (loss and metric) with data_range 1.0; default: the training targets' range (docs/reference.md bug 15)
    config.reference_audio_ssim_data_range = False

    config.eval_every = 0  # steps; 0: only at the end
    config.log_every = 25
    config.checkpoint_every = 100
    config.keep_checkpoints = 2
    config.num_samples = 8  # reconstructions written as PNG grid / text samples
    config.progress = True
    return config
