"""Fine-tuning configs: `--config=experiments/configs/finetune.py:<name> --task=<task>`, any field as --config.x=y.

    demo            the demo run (runs/demo) on the demo data: audio, 5-fold cross-validation; CPU, minutes. Default.
    base_c, base_p, large_c, large_p    the paper's four models with the reference's per-task hyper-parameters
                    (docs/reference.md R5.1-R5.3): epochs, learning rate, batch, accumulation, seeds, schedule.

Fields left at 0 / empty take the task's value from the tables below for the config's model (so `--task` alone
picks the paper's recipe); set them to override.
"""

from pathlib import Path

import ml_collections
import numpy as np

from data_pipelines import glue
from synergy_jax import cli, train
from synergy_jax.errors import SetupError

IMAGE, AUDIO, TEXT = "image", "audio", "text"
GLUE_TASKS = tuple(glue.TASKS)
TASK_NAMES = ("demo", "cifar10", "cifar100", "pets", "flowers102", "folder", "esc50", "urbansound8k") + GLUE_TASKS


def modality(task: str) -> str:
    return TEXT if task in GLUE_TASKS else AUDIO if task in ("demo", "esc50", "urbansound8k") else IMAGE


# (epochs, learning rate, per-step batch before accumulation) per model; R5.1 (image), R5.2 (audio), R5.3 (text).
RECIPES = {
    "cifar10": {"base_c": (5, 2e-5, 256), "base_p": (5, 2e-5, 256), "large": (1, 2e-5, 64)},
    "cifar100": {"base_c": (7, 2e-5, 256), "base_p": (7, 2e-5, 256), "large": (3, 2e-5, 64)},
    "flowers102": {"base_c": (25, 2e-5, 256), "base_p": (25, 3e-5, 256), "large": (7, 2e-5, 64)},
    "pets": {"base_c": (20, 2e-5, 256), "base_p": (20, 2e-5, 256), "large": (5, 2e-5, 64)},
    "folder": {"base_c": (10, 2e-5, 64), "base_p": (10, 2e-5, 64), "large": (10, 2e-5, 64)},  # the CLI defaults
    "esc50": {"base_c": (12, 2e-5, 40), "base_p": (12, 2e-5, 44), "large": (12, 2e-5, 26)},
    "urbansound8k": {"base_c": (10, 5e-6, 44), "base_p": (8, 5e-6, 44), "large": (8, 3e-6, 26)},
    "mnli_m": {"base_c": (5, 3e-5, 320), "base_p": (5, 2e-5, 320), "large": (5, 2e-5, 108)},
    "mnli_mm": {"base_c": (5, 3e-5, 320), "base_p": (5, 2e-5, 320), "large": (5, 2e-5, 108)},
    "qnli": {"base_c": (4, 3e-5, 320), "base_p": (4, 2e-5, 256), "large": (4, 2e-5, 108)},
    "qqp": {"base_c": (5, 2e-5, 384), "base_p": (5, 2e-5, 384), "large": (5, 2e-5, 145)},
    "rte": {"base_c": (15, 3e-5, 384), "base_p": (15, 2e-5, 384), "large": (15, 2e-5, 160)},
    "sst2": {"base_c": (4, 2e-5, 512), "base_p": (4, 2e-5, 512), "large": (4, 2e-5, 200)},
    "mrpc": {"base_c": (10, 3e-5, 384), "base_p": (10, 2e-5, 384), "large": (10, 2e-5, 140)},
    "cola": {"base_c": (3, 2e-5, 704), "base_p": (3, 2e-5, 704), "large": (3, 2e-5, 320)},
    "stsb": {"base_c": (10, 2e-5, 384), "base_p": (10, 2e-5, 384), "large": (10, 2e-5, 140)},  # not in the paper
    "wnli": {"base_c": (5, 2e-5, 384), "base_p": (5, 2e-5, 384), "large": (5, 2e-5, 140)},  # not in the paper
    "demo": {"demo": (10, 1e-4, 8)},
}
SEEDS = {
    "cifar10": (17, 42, 77), "cifar100": (18, 43, 78), "flowers102": (19, 44, 79), "pets": (28, 53, 88),
    "folder": (17,), "esc50": (17,), "urbansound8k": (77,), "mnli_m": (17, 42, 77), "mnli_mm": (17, 42, 77),
    "qnli": (18, 43, 78), "qqp": (19, 44, 79), "rte": (27, 52, 87), "sst2": (28, 53, 88), "mrpc": (29, 54, 89),
    "cola": (37, 62, 97), "stsb": (17, 42, 77), "wnli": (17, 42, 77), "demo": (0,),
}  # fmt: skip
# The paper's numbers (docs/reference.md R7) for the same row: accuracy %, CoLA as published (the reference's
# accuracy, bug 44), per model.
PAPER = {
    "pets": {"base_p": 91.99, "base_c": 91.76, "large_p": 94.40, "large_c": 94.73},
    "flowers102": {"base_p": 97.68, "base_c": 97.22, "large_p": 99.54, "large_c": 98.80},
    "cifar10": {"base_p": 97.31, "base_c": 97.04, "large_p": 98.22, "large_c": 98.39},
    "cifar100": {"base_p": 83.28, "base_c": 87.25, "large_p": 90.82, "large_c": 90.74},
    "esc50": {"base_p": 95.05, "base_c": 94.55, "large_p": 94.70, "large_c": 95.10},
    "urbansound8k": {"base_p": 89.31, "base_c": 89.18, "large_p": 87.83, "large_c": 88.50},
    "mnli_m": {"base_p": 87.31, "base_c": 87.53, "large_p": 90.23, "large_c": 90.29},
    "mnli_mm": {"base_p": 87.04, "base_c": 87.31, "large_p": 90.39, "large_c": 90.49},
    "qnli": {"base_p": 91.60, "base_c": 91.93, "large_p": 94.45, "large_c": 94.75},
    "qqp": {"base_p": 90.10, "base_c": 90.11, "large_p": 91.74, "large_c": 91.71},
    "sst2": {"base_p": 93.12, "base_c": 93.35, "large_p": 96.10, "large_c": 96.22},
    "cola": {"base_p": 69.12, "base_c": 69.13, "large_p": 83.89, "large_c": 85.23},
    "mrpc": {"base_p": 90.09, "base_c": 90.39, "large_p": 90.56, "large_c": 90.80},
    "rte": {"base_p": 61.73, "base_c": 65.70, "large_p": 74.01, "large_c": 79.42},
}
HUB_TOWERS = {"base": {IMAGE: "openai/clip-vit-base-patch16", AUDIO: "MIT/ast-finetuned-audioset-12-12-0.447",
                       TEXT: "FacebookAI/roberta-base"},
              "large": {IMAGE: "openai/clip-vit-large-patch14", AUDIO: "MIT/ast-finetuned-audioset-10-10-0.4593",
                        TEXT: "FacebookAI/roberta-large"}}  # fmt: skip


def recipe(config_name: str, task: str) -> tuple[int, float, int]:
    table = RECIPES[task]
    return table.get(config_name) or table.get(config_name.split("_")[0]) or next(iter(table.values()))


def accumulation(config_name: str, task: str) -> int:
    """Image/audio: 8 (R5); text: the task's (2 for RTE, MRPC, CoLA, STS-B, else 4; R5.3); the demo: 1."""
    if config_name == "demo":
        return 1
    return glue.TASKS[task].accumulation if modality(task) == TEXT else 8


def decay_epochs(config_name: str, task: str, epochs: int) -> tuple[int, ...]:
    """The epochs after which audio fine-tuning multiplies its rate by 0.99: torch MultiStepLR with milestones
    linspace(0, E, E // 5 + 1)[1:-1] (R5.2; 12 epochs -> (6,), 10 -> (5,), 8 -> none); none elsewhere and for the demo."""
    if config_name == "demo" or modality(task) != AUDIO:
        return ()
    return tuple(int(m) for m in np.linspace(0, epochs, epochs // 5 + 1)[1:-1])


# The legal values of the numeric fields, checked before the job does anything (0 or a negative value often means
# "the recipe's").
RANGES = {
    "holdout_fraction": cli.Range(0, 1, low_open=True, high_open=True),
    "seeds": cli.COUNT,
    "epochs": cli.COUNT,
    "batch_size": cli.COUNT,
    "accum_steps": cli.COUNT,
    **{f"optimizer.{field}": allowed for field, allowed in train.OPTIMIZER_RANGES.items()},
    "optimizer.weight_decay": cli.Range(),  # < 0: the recipe's
    "head_learning_rate_multiplier": cli.POSITIVE,
    "projection_dim": cli.Range(integer=True),  # < 0: the run's
    "text_max_length": cli.COUNT,
    "eval_batch_size": cli.AT_LEAST_ONE,
    "workers": cli.COUNT,
    "log_every": cli.AT_LEAST_ONE,
    "keep_checkpoints": cli.AT_LEAST_ONE,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = arg or "demo"
    if name not in ("demo", "base_c", "base_p", "large_c", "large_p"):
        raise ValueError(f"unknown finetune config {name!r}; known: demo, base_c, base_p, large_c, large_p")
    config = ml_collections.ConfigDict()
    config.name = name
    config.task = "demo" if name == "demo" else ""  # required for the paper configs (--task); one of TASK_NAMES
    config.init = "runs/demo" if name == "demo" else ""  # pre-training run folder, hub id / folder, or 'scratch'
    config.scratch_like = ""  # init=scratch: the run (or hub id) whose tower architecture is trained from random init
    config.compare = ("scratch", "zero_shot") if name == "demo" else ()  # baselines run beside: scratch, zero_shot
    config.data_dir = ""  # the dataset (ESC-50 root, GLUE folder, TFDS data dir, class folders); demo: the run's
    config.workdir = ""  # '': runs/finetune_<name>_<task>
    config.mesh = "-1x1"
    config.sharding = "replicate"
    config.protocol = "clean"  # the reported column; both 'clean' and 'reference' are always computed
    config.folds = "all"  # k-fold tasks: all | 1,3 | 1-5
    config.seeds = ()  # () -> SEEDS[task]
    config.holdout_fraction = 0.1  # clean protocol: share of train held out for model selection (no official val)
    config.reference_flowers_splits = False  # True: train Flowers-102 on 'test', evaluate on 'validation' (bug 41)
    config.reference_normalization = False  # True: the reference's per-dataset image normalisations (bug 41)
    config.reference_cola_accuracy = False  # True: CoLA's headline number is accuracy, not MCC (bug 44)
    config.epochs = 0  # 0: the task's recipe
    config.batch_size = 0  # global examples per forward; a step takes batch_size x accum_steps; 0: the recipe
    config.accum_steps = 0  # 0: the recipe (image/audio 8, text 2 or 4, demo 1)
    config.optimizer = train.optimizer_config()
    config.optimizer.learning_rate = 0.0  # 0: the recipe
    config.optimizer.weight_decay = -1.0  # < 0: the recipe (image/audio 0.05 on all, text 0.01 on matrices)
    config.head_learning_rate_multiplier = 1.0  # the new classifier's rate / the tower's (1: the reference)
    config.projection_dim = -1  # < 0: the run's projection (hub init: none)
    config.dtype = "float32"
    config.remat = False
    config.text_max_length = 0  # 0: the task's (R5.3)
    config.eval_batch_size = 64
    config.workers = 4
    config.export = True  # write the selected model (text: RobertaForSequenceClassification; image/audio: tower+head)
    config.log_every = 10
    config.keep_checkpoints = 2
    config.progress = True
    if name == "demo":
        # The demo's 160 training clips per fold make 20 steps an epoch: the random head needs a faster rate than
        # the tower to learn in 10 epochs (2 folds at 1e-4: head x30 100 % / 100 %, head x1 89 % / 80 %;
        # docs/finetune.md).
        config.head_learning_rate_multiplier = 30.0
        config.eval_batch_size = 32
        config.log_every = 5
    return config


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with every 'recipe default' (0 / empty / negative) replaced by the task's recipe value."""
    if config.task not in TASK_NAMES:
        raise SetupError(f"--task is required: one of {', '.join(TASK_NAMES)}")
    c = config.copy_and_resolve_references()
    epochs, lr, batch = recipe(c.name, c.task)
    text_task = modality(c.task) == TEXT
    with c.unlocked():
        c.epochs, c.batch_size = c.epochs or epochs, c.batch_size or batch
        c.accum_steps = c.accum_steps or accumulation(c.name, c.task)
        c.seeds = tuple(c.seeds) or SEEDS[c.task]
        c.workdir = c.workdir or str(Path("runs") / f"finetune_{c.name}_{c.task}")
        c.optimizer.learning_rate = c.optimizer.learning_rate or lr
        if c.optimizer.weight_decay < 0:  # R5: AdamW wd 0.05 on everything; R5.3: the Trainer's 0.01, no biases/norms
            c.optimizer.weight_decay, c.optimizer.weight_decay_on = (0.01, "matrices") if text_task else (0.05, "all")
        if text_task:  # the Trainer's linear decay to 0 and gradient clipping at 1.0 (R5.3)
            c.optimizer.schedule, c.optimizer.clip_grad_norm = "linear", c.optimizer.clip_grad_norm or 1.0
    return c
