"""Missing Modality Reconstruction (MMR) from a pre-training run.

    python experiments/mmr.py --missing=image                                   # demo run and config, CPU, minutes
    python experiments/mmr.py --checkpoint=runs/base_c --missing=audio --config=experiments/configs/mmr.py:base \
        --workdir=runs/mmr_base_c_audio --mesh=8x1

What is this job's own: the frozen encoders (only the two towers the task needs, restored onto this mesh), the
pre-training run's data read without augmentation, the fusion encoder + decoder and its loss (synergy_jax.mmr_train),
the input-free baselines, its run record and its report. The loop, step, checkpoints and the reconstruction
evaluator are the library's. Rerunning with the same --workdir resumes; SIGTERM saves and exits 0. docs/mmr.md lists
the reference's bugs we fix and the flags that restore them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections

from data_pipelines import pipeline, sources
from experiments.configs import mmr as configs
from synergy_jax import augmentation, checkpoint, cli, loop, mmr_train, parallel, run_lock, text, train
from synergy_jax.distributed import log
from synergy_jax.errors import SetupError
from synergy_jax.evaluators import reconstruction
from synergy_jax.models import mmr, param_groups
from synergy_jax.models.synergy import SynergyConfig
from synergy_jax.record import DataSource, RunRecord, optimizer_structure, run_facts

CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "mmr.py"
SHORTCUTS = (
    cli.Shortcut("checkpoint", "checkpoint", "Pre-training run folder (default: the main job's demo run)."),
    cli.Shortcut("missing", "missing", "The modality to reconstruct.", ("image", "text", "audio")),
    cli.Shortcut("workdir", "workdir", "MMR run folder; default runs/mmr_<config>_<missing>."),
    cli.Shortcut("mesh", "mesh", "Device mesh DxM (the pre-training mesh need not match)."),
)

# ================================================================================================ data + model


def data_source(config: ml_collections.ConfigDict, pretrain_dir: Path, pretrained: RunRecord) -> DataSource:
    """The pre-training run's data (dir, tokenizer, text mode), each overridable by --config.data.*."""
    overrides = {"dir": config.data.dir, "tokenizer": config.data.tokenizer, "text_mode": config.data.text_mode}
    source = dataclasses.replace(pretrained.data.resolve(pretrain_dir), **{k: v for k, v in overrides.items() if v})
    if not Path(source.dir).is_dir():
        raise SetupError(f"precomputed data {source.dir} does not exist: pass --config.data.dir")
    return source


def mmr_config(config: ml_collections.ConfigDict, synergy: SynergyConfig, max_length: int) -> mmr.MMRConfig:
    fields = config.model.to_dict()
    as_info = lambda info: tuple(tuple(int(v) for v in row) for row in info)  # noqa: E731
    fields.update(
        img_decoder_layer_info=as_info(fields["img_decoder_layer_info"]),
        aud_decoder_layer_info=as_info(fields["aud_decoder_layer_info"]),
        aud_size=tuple(fields["aud_size"]),
        vocab_size=synergy.text.vocab_size,
        text_length=max_length,
    )
    c = mmr.MMRConfig(**fields)
    for name, info, size in (("img", c.img_decoder_layer_info, (c.img_size, c.img_size)),
                             ("aud", c.aud_decoder_layer_info, c.aud_size)):  # fmt: skip
        if mmr.final_size(info) != tuple(size):
            raise SetupError(f"--config.model.{name}_decoder_layer_info ends at {mmr.final_size(info)} after the final "
                             f"x{info[-1][0]} upscale, but {name}_size is {tuple(size)}")  # fmt: skip
    return c


def step_options(config: ml_collections.ConfigDict, missing: str) -> mmr_train.StepOptions:
    return mmr_train.StepOptions(
        missing=missing, image_mean=tuple(map(float, augmentation.CLIP_MEAN)),
        image_std=tuple(map(float, augmentation.CLIP_STD)),
        reference_unnormalized_images=config.reference_unnormalized_images, text_loss_on_pads=config.text_loss_on_pads,
        reference_batch_stats_at_eval=config.reference_batch_stats_at_eval, alpha=config.alpha,
    )  # fmt: skip


def run_record(config, model_config: mmr.MMRConfig, pretrain_dir: Path, source: DataSource, mesh) -> RunRecord:
    """What every checkpoint stores (a resumed run is checked against `model` and the optimizer)."""
    return RunRecord(
        kind="mmr", model={"missing": config.missing, **json.loads(json.dumps(model_config.__dict__))},
        optimizer_structure=optimizer_structure(config.optimizer), config=json.loads(config.to_json_best_effort()),
        run=run_facts(mesh, pretrain_checkpoint=str(pretrain_dir)),
        data=source, seed=config.seed,
    )  # fmt: skip


class HeldOutEval:
    """The loop's eval hook: the reconstruction evaluator on the held-out split; keeps the last call's samples."""

    def __init__(self, eval_step, encoder_params, make_input: Callable, mesh, config, stats, ssim_range: float):
        self.eval_step, self.encoder_params, self.make_input, self.mesh = eval_step, encoder_params, make_input, mesh
        self.config, self.stats, self.ssim_range, self.samples = config, stats, ssim_range, None

    def __call__(self, state, step: int) -> dict[str, float]:
        metrics, self.samples = reconstruction.evaluate(
            lambda batch: self.eval_step(state, self.encoder_params, batch),
            self.make_input(self.config.data.eval_split, False, self.config.eval_batch_size), self.mesh,
            self.config.missing, self.stats, self.config.num_samples, self.ssim_range,
        )  # fmt: skip
        return {f"eval/{k}": v for k, v in metrics.items()}


# ================================================================================================ the job


def run(config: ml_collections.ConfigDict, stop_at: Callable[[int], bool] | None = None) -> dict[str, Any]:
    """Trains (or resumes) MMR to the configured steps, evaluates on the held-out split; returns the summary.
    Nothing is written before the config and the mesh are checked; then the job holds its folder's writer lock (the
    pre-training run is only read)."""
    started, missing = time.time(), config.missing
    cli.check_ranges(config, configs.RANGES)
    if missing not in mmr.TASKS:
        raise SetupError(f"--missing={{image,text,audio}} is required (the modality to reconstruct), got {missing!r}")
    workdir = Path(config.workdir or Path("runs") / f"mmr_{config.name}_{missing}").expanduser().absolute()
    mesh = parallel.make_mesh(config.mesh)
    for field in ("batch_size", "eval_batch_size"):
        train.check_batch(config[field], mesh, name=f"--config.{field}")
    checkpoint.latest_step(config.checkpoint)  # the pre-training run has a checkpoint that verifies
    with run_lock.writing(workdir):
        return train_mmr(config, mesh, workdir, started, stop_at)


def train_mmr(config: ml_collections.ConfigDict, mesh, workdir: Path, started: float, stop_at) -> dict[str, Any]:
    """The run itself, under the writer lock: frozen encoders, data, model, baselines, state, loop, samples."""
    missing, pretrain_dir = config.missing, Path(config.checkpoint).expanduser().absolute()
    steps_default, lr_default = config.task_defaults[missing]
    steps = config.total_steps or int(steps_default)
    # ---- frozen encoders (only the task's two towers), the pre-training run's data
    towers = [param_groups(m)[0] for m in mmr.TASKS[missing].inputs]
    encoder_params, pretrained = checkpoint.restore_params(pretrain_dir, mesh, groups=towers)
    synergy, encoder_shardings = pretrained.synergy_config(), jax.tree.map(lambda x: x.sharding, encoder_params)
    source = data_source(config, pretrain_dir, pretrained)
    tokenizer = text.load_tokenizer(source.tokenizer)

    def make_input(split: str, is_train: bool, batch: int):  # no augmentation anywhere (the reference had none)
        pipe = sources.pipeline_config(source, split, train=is_train, batch_size=batch // jax.process_count(),
                                       seed=config.seed, read_threads=config.data.read_threads,
                                       prefetch=config.data.prefetch)  # fmt: skip
        return pipeline.build_dataset(pipe, tokenizer)

    # ---- model, optimizer, baselines (training split only; audio SSIM's data range = the training targets' range)
    model_config = mmr_config(config, synergy, source.max_length)
    model, optimizer = mmr.MMRModel(model_config, missing), train.resolve_optimizer(config.optimizer, steps, lr_default)
    tx, options = train.make_optimizer(optimizer), step_options(config, missing)
    stats = reconstruction.target_statistics(jax.jit(lambda b: mmr_train.targets(b, model_config, options)),
                                             make_input(config.data.train_split, False, config.eval_batch_size), mesh,
                                             missing, model_config.vocab_size, config.baseline_examples)  # fmt: skip
    if missing == "audio" and not config.reference_audio_ssim_data_range:
        options = dataclasses.replace(options, audio_ssim_data_range=float(stats["target_range"]))
    # ---- state (fresh or resumed), steps, loop
    train_iter = iter(make_input(config.data.train_split, True, config.batch_size))
    record = run_record(config, model_config, pretrain_dir, source.relative_to(workdir), mesh)
    manager = checkpoint.make_manager(workdir, save_every=config.checkpoint_every, keep=config.keep_checkpoints)
    state = loop.start_state(manager, record, mmr_train.abstract_state(model, tx, synergy, mesh),
                             lambda: mmr_train.create_state(model, tx, synergy, mesh, jax.random.PRNGKey(config.seed)),
                             train_iter)  # fmt: skip
    train_step = mmr_train.make_train_step(model, tx, synergy, options, mesh, encoder_shardings)
    held_out = HeldOutEval(mmr_train.make_eval_step(model, synergy, options, mesh, encoder_shardings), encoder_params,
                           make_input, mesh, config, stats, options.audio_ssim_data_range if missing == "audio" else 1.0)
    log(f"MMR {config.name} missing={missing}: {steps} steps, batch {config.batch_size}, lr {optimizer.learning_rate:g}, "
        f"encoders {towers} frozen from {pretrain_dir}, data {source.dir}, mesh {dict(mesh.shape)}, workdir {workdir}")
    loop_config = loop.LoopConfig(total_steps=steps, batch_size=config.batch_size, log_every=config.log_every,
                                  eval_every=config.eval_every, progress=config.progress, desc=f"mmr/{missing}")
    result = loop.train_loop(loop_config, state, lambda s, b: train_step(s, b, encoder_params), train_iter, manager,
                             record, loop.MetricWriter(workdir), held_out, stop_at,
                             place=lambda batch: pipeline.global_batch(batch, mesh))  # fmt: skip
    outputs = []
    if not result.preempted and jax.process_index() == 0:
        outputs = reconstruction.write_samples(workdir, missing, held_out.samples, tokenizer)
    return loop.summarize(result, workdir, started, missing=missing, baseline_examples=stats["examples"], outputs=outputs)


def print_summary(summary: dict[str, Any]) -> None:
    if summary["preempted"]:
        print(f"stopped at step {summary['step']}/{summary['total_steps']} (checkpoint saved); rerun to resume")
        return
    s = summary
    print(f"\n=== MMR missing={s['missing']}: {s['step']} steps, {s['wall_seconds']:.0f} s, held-out examples "
          f"{s['eval/examples']}, {s['workdir']}")  # fmt: skip
    if s["missing"] == "text":
        print(f"token accuracy (non-pad) {100 * s['eval/accuracy']:.1f}%  CE {s['eval/ce']:.3f}   "
              f"[reference's pad-inclusive: accuracy {100 * s['eval/accuracy_with_pads']:.1f}%, CE "
              f"{s['eval/ce_with_pads']:.3f}]")  # fmt: skip
        for name in ("majority_token", "majority_token_per_position"):
            print(f"baseline {name}: accuracy {100 * s[f'eval/baseline_{name}/accuracy']:.1f}% "
                  f"(pad-inclusive {100 * s[f'eval/baseline_{name}/accuracy_with_pads']:.1f}%)")  # fmt: skip
        print(f"baseline unigram_per_position: CE {s['eval/baseline_unigram_per_position/ce']:.3f}")
    else:
        print(f"reconstruction:        PSNR {s['eval/psnr']:.2f} dB  SSIM {s['eval/ssim']:.4f}  MSE {s['eval/mse']:.5f}")
        print(f"baseline (mean train): PSNR {s['eval/baseline_mean_target/psnr']:.2f} dB  SSIM "
              f"{s['eval/baseline_mean_target/ssim']:.4f}  MSE {s['eval/baseline_mean_target/mse']:.5f}")  # fmt: skip
    print("outputs: " + ", ".join(s["outputs"]))


if __name__ == "__main__":
    cli.start(CONFIG_FILE, run, print_summary, SHORTCUTS, default_config="demo")
