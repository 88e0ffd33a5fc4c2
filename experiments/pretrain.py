"""Tri-modal contrastive pre-training of Synergy-CLIP: the main job (docs/pretrain.md).

    python experiments/pretrain.py                                   # demo: embedded data, tiny model, CPU ok
    python experiments/pretrain.py --config=experiments/configs/pretrain.py:base_c --mesh=2x1 \
        --config.data.dir=data/vggsound_pre --workdir=runs/base_c

This job's own: its data, the tri-modal model (hub towers, presets, or the run being resumed), the contrastive loss,
its run record and report; the loop, step, checkpoints and evaluators are the library's. Same --workdir resumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections

from data_pipelines import pipeline, sources
from data_pipelines.sources import RunData
from experiments.configs import pretrain as configs
from synergy_jax import checkpoint, cli, flops, loop, losses, parallel, run_lock, text, train
from synergy_jax.distributed import log
from synergy_jax.errors import SetupError
from synergy_jax.evaluators import contrastive, embed, retrieval, zero_shot
from synergy_jax.models import preset
from synergy_jax.models.synergy import SynergyCLIP, SynergyConfig, example_batch
from synergy_jax.record import RunRecord, model_config_to_dict, optimizer_structure, run_facts

CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "pretrain.py"
SHORTCUTS = (cli.Shortcut("workdir", "workdir", "Run folder (checkpoints, metrics, TensorBoard); default runs/<name>."),
             cli.Shortcut("mesh", "mesh", "Device mesh DxM: D-way data, M-way model parallel (-1: the rest)."))  # fmt: skip
EVALUATORS = ("contrastive", "retrieval", "zero_shot")

# ================================================================================================ input


def pipeline_config(config: ml_collections.ConfigDict, data: RunData, train_split: bool, batch_size: int):
    c = config.data
    split = data.source.train_split if train_split else data.source.eval_split
    return sources.pipeline_config(
        data.source, split, train=train_split, batch_size=batch_size, seed=config.seed, augment_on=c.augment_on,
        augment_image=c.augment_image, augment_audio=c.augment_audio, label_names=tuple(data.eval_metadata["labels"]),
        reference_eval_augmentation=c.reference_eval_augmentation, workers=c.workers, read_threads=c.read_threads,
        prefetch=c.prefetch,
    )  # fmt: skip


# ================================================================================================ model


def build_model_config(config: ml_collections.ConfigDict, data: RunData, tokenizer,
                       saved: RunRecord | None) -> tuple[SynergyConfig, dict[str, Any] | None]:
    """(model config, pretrained tower params or None): the resumed run's (no weights loaded), hub/folder towers
    for init=hub, presets for init=scratch."""
    m = config.model
    runtime = dict(dtype=m.dtype, remat=m.remat, attention=m.attention)
    clamp = m.logit_scale_max or None
    if saved is not None:
        return saved.synergy_config(**runtime), None
    if m.init == "hub":
        from synergy_jax import weights

        hub = {tower: m[tower] for tower in ("vision", "text", "audio")}
        return weights.load_hf_synergy(hub, m.projection_dim, logit_scale_max=clamp, **runtime)
    if m.init != "scratch":
        raise SetupError(f"--config.model.init must be 'hub' or 'scratch', got {m.init!r}")
    fbank = data.train_metadata["config"]["fbank"]
    fixed = {"vision": dict(image_size=config.data.image_size),
             "text": dict(vocab_size=len(tokenizer), max_position_embeddings=config.data.max_length + 2),
             "audio": dict(max_length=fbank["max_frames"], num_mel_bins=fbank["num_mel_bins"])}  # fmt: skip
    towers = {tower: preset(tower, m[tower], **runtime).replace(**{**m[f"{tower}_overrides"].to_dict(), **fixed[tower]})
              for tower in fixed}  # fmt: skip
    return SynergyConfig(**towers, projection_dim=m.projection_dim, logit_scale_max=clamp), None


def run_record(config: ml_collections.ConfigDict, model_config: SynergyConfig, mesh, data: RunData, workdir: Path):
    """What every checkpoint stores (and what a resumed run is checked against)."""
    return RunRecord(
        kind="pretrain", model=model_config_to_dict(model_config), optimizer_structure=optimizer_structure(config.optimizer),
        config=json.loads(config.to_json_best_effort()), data=data.source.relative_to(workdir), seed=config.seed,
        model_spec={k: v for k, v in config.model.to_dict().items() if k not in ("dtype", "remat", "attention")},
        run=run_facts(mesh, input_slices=pipeline.input_slices(config.data.input_slices)),
    )  # fmt: skip


# ================================================================================================ evals


def make_evaluate(config, model: SynergyCLIP, mesh, data: RunData, tokenizer, contrastive_batch: int) -> Callable:
    """The loop's eval hook: the whole eval split embedded once, then each evaluator of `config.evals` on it."""
    loss_config = losses.LossConfig(**config.loss)
    templates = {"image": config.zero_shot_image_templates, "audio": config.zero_shot_audio_templates}

    eval_split = pipeline_config(config, data, False, config.eval_batch_size // jax.process_count())

    def evaluate(state, step: int) -> dict[str, float]:  # a fresh pass over the whole eval split, padding marked
        columns = embed.embed_split(lambda batch: embed.embed_all_modalities(model, state.params, batch),
                                    pipeline.build_dataset(eval_split, tokenizer), mesh, keep=("label_id",))  # fmt: skip
        scales = model.apply({"params": state.params}, method=SynergyCLIP.logit_scales)  # clamped as in training
        embed_prompts = embed.prompt_embedder(model, state.params, mesh, tokenizer, config.data.max_length,
                                              config.eval_batch_size)  # fmt: skip
        evaluators = {
            "contrastive": lambda: contrastive.evaluator({p: float(parallel.gather(s)) for p, s in scales.items()},
                                                         contrastive_batch, loss_config.pair_weights),
            "retrieval": lambda: retrieval.evaluate,
            "zero_shot": lambda: zero_shot.evaluator(embed_prompts, data.eval_metadata["labels"], templates),
        }  # fmt: skip
        metrics = {}
        for name in config.evals:
            metrics.update(evaluators[name]()(columns))
        return {**{f"eval/{k}": v for k, v in metrics.items()}, "eval/examples": len(columns["label_id"])}

    return evaluate


# ================================================================================================ the job


def total_steps(config: ml_collections.ConfigDict, data: RunData) -> tuple[int, int]:
    """(total steps, steps per epoch)."""
    steps_per_epoch = pipeline.steps_per_epoch(data.train_metadata["num_examples"], config.batch_size,
                                               pipeline.input_slices(config.data.input_slices))  # fmt: skip
    return (config.total_steps or config.epochs * steps_per_epoch), steps_per_epoch


def check_setup(config: ml_collections.ConfigDict, mesh) -> None:
    """Shape and name errors before any expensive work."""

    def batch_problem(accum_steps: int) -> str | None:  # the batch must split into microbatches and groups
        try:
            train.check_batch(config.batch_size, mesh, accum_steps)
            losses.LossConfig(**config.loss).contrastive_batch(config.batch_size // accum_steps, mesh.shape["data"])
        except ValueError as error:
            return str(error)
        return None

    if problem := batch_problem(config.accum_steps):
        fitting = [k for k in range(config.accum_steps - 1, 0, -1) if batch_problem(k) is None]
        hint = f"; --config.accum_steps={fitting[0]} fits this mesh (same batch)" if fitting else ""
        raise SetupError(f"{problem}{hint}")
    if problem := pipeline.slices_problem(pipeline.input_slices(config.data.input_slices), config.batch_size):
        raise SetupError(f"--config.data.{problem}")
    train.check_batch(config.eval_batch_size, mesh, name="--config.eval_batch_size")
    if not (config.epochs or config.total_steps):
        raise SetupError("--config.epochs and --config.total_steps are both 0: set one of them")
    cli.check_runtime(mesh, config.model.dtype, config.sharding)
    if config.total_steps:
        train.check_schedule_length(config.total_steps, config.optimizer, "--config.total_steps", "--config.optimizer.")
    if problem := pipeline.augmentation_problem(*(config.data[k] for k in ("augment_on", "augment_image",
                                                                           "augment_audio"))):  # fmt: skip
        raise SetupError(f"--config.data: {problem}")
    if unknown := set(config.evals) - set(EVALUATORS):
        raise SetupError(f"--config.evals: unknown evaluator(s) {sorted(unknown)}; known: {list(EVALUATORS)}")


def run(config: ml_collections.ConfigDict, stop_at: Callable[[int], bool] | None = None) -> dict[str, Any]:
    """Trains (or resumes) to the configured number of steps; returns the summary (see `print_summary`).

    `stop_at(step)` -> True acts as a preemption after that step (tests); SIGTERM does the same. Nothing is written
    before the config and the mesh are checked; then the job holds the run folder's writer lock.
    """
    started = time.time()
    cli.check_ranges(config, configs.RANGES)
    workdir = Path(config.workdir or Path("runs") / (config.name or "run")).expanduser().absolute()
    # ---- mesh
    mesh = parallel.make_mesh(config.mesh)
    check_setup(config, mesh)
    with run_lock.writing(workdir):
        return train_run(config, mesh, workdir, started, stop_at)


def train_run(config: ml_collections.ConfigDict, mesh, workdir: Path, started: float, stop_at) -> dict[str, Any]:
    """The run itself, under the writer lock: input -> model -> shardings -> state -> step -> evals -> loop."""
    # ---- input
    data = sources.prepare(config.data, workdir, config.model.text, config.progress)
    tokenizer = text.load_tokenizer(data.source.tokenizer)
    steps, steps_per_epoch = total_steps(config, data)
    train_iter = pipeline.sliced_input(pipeline_config(config, data, True, config.batch_size),
                                       pipeline.input_slices(config.data.input_slices), tokenizer)  # fmt: skip
    # ---- model, optimizer (the checkpoint on disk decides whether pretrained weights are loaded at all)
    manager = checkpoint.make_manager(workdir, save_every=config.checkpoint_every, keep=config.keep_checkpoints,
                                      async_save=config.async_checkpoints)  # fmt: skip
    resume = checkpoint.resume_step(manager)  # the newest checkpoint that verifies
    saved = checkpoint.saved_record(manager, resume) if resume is not None else None
    model_config, pretrained = build_model_config(config, data, tokenizer, saved)
    sources.check_fits(model_config, data, tokenizer)
    optimizer = train.resolve_optimizer(config.optimizer, steps)
    tx, model = train.make_optimizer(optimizer), SynergyCLIP(model_config)
    example = example_batch(model_config, 1, config.data.max_length)
    # ---- shardings + state (born sharded, or restored onto this mesh)
    record = run_record(config, model_config, mesh, data, workdir)
    state, shardings = loop.start_train_state(manager, record, model, tx, mesh, config.sharding, example, config.seed,
                                              pretrained, train_iter, config.resume_data)  # fmt: skip
    pretrained = None  # the host copy of hub weights is no longer needed
    # ---- step, evals, loop
    loss_config = losses.LossConfig(**config.loss)
    augment = sources.device_augmentation(data, config.data.augment_on)  # None: the input pipeline augments
    train_step = train.make_train_step(model, tx, loss_config, mesh, shardings, config.accum_steps,
                                       train.learning_rate_schedule(optimizer), augment)  # fmt: skip
    microbatch = config.batch_size // config.accum_steps
    contrastive_batch = config.eval_contrastive_batch or loss_config.contrastive_batch(microbatch, mesh.shape["data"])
    loop_config = loop.LoopConfig(
        total_steps=steps, batch_size=config.batch_size, log_every=config.log_every, steps_per_epoch=steps_per_epoch,
        eval_every=config.eval_every or steps_per_epoch, progress=config.progress, desc="train",
        flops_per_sample=flops.train_flops_per_sample(model_config.forward_flops(config.data.max_length),
                                                      model_config.vision.remat),
        peak_flops=flops.peak_flops_per_device(jax.devices()[0].device_kind, config.peak_tflops),
    )  # fmt: skip
    log(f"{config.name or 'run'}: {steps} steps ({steps_per_epoch}/epoch), global batch {config.batch_size} "
        f"(x{config.accum_steps} accumulation), mesh {dict(mesh.shape)}, {jax.process_count()} process(es), "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), workdir {workdir}")  # fmt: skip
    result = loop.train_loop(loop_config, state, train_step, train_iter, manager, record, loop.MetricWriter(workdir),
                             make_evaluate(config, model, mesh, data, tokenizer, contrastive_batch), stop_at,
                             place=lambda batch: pipeline.global_batch(batch, mesh))  # fmt: skip
    return loop.summarize(result, workdir, started)


def print_summary(summary: dict[str, Any]) -> None:
    if summary.get("preempted"):
        print(f"stopped at step {summary['step']}/{summary['total_steps']} (checkpoint saved); rerun to resume")
        return
    get = lambda key: summary.get(key, float("nan"))  # noqa: E731
    print(f"\n=== pre-training done: step {summary['step']}, {summary['wall_seconds']:.0f} s, {summary['workdir']}")
    print(f"held-out eval: {summary.get('eval/examples')} examples, loss {get('eval/loss'):.3f} (IT "
          f"{get('eval/loss/it'):.3f}, TA {get('eval/loss/ta'):.3f}, AI {get('eval/loss/ai'):.3f})")  # fmt: skip
    for modality in ("image", "audio"):
        key = f"eval/zero_shot/{modality}->text"
        if f"{key}/top1" in summary:
            top5 = f"{100 * summary[f'{key}/top5']:.1f}%" if f"{key}/top5" in summary else "- (under 5 classes)"
            print(f"zero-shot {modality}->text (label prompts): top-1 {100 * summary[f'{key}/top1']:.1f}% "
                  f"(chance {100 * summary[f'{key}/chance']:.1f}%), top-5 {top5}")  # fmt: skip
    print(f"{'retrieval':16s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s}")
    for query, candidate in retrieval.DIRECTIONS:
        key = f"eval/retrieval/{query}->{candidate}"
        if f"{key}/R@1" in summary:
            print(f"{query + '->' + candidate:16s} " + " ".join(f"{100 * summary[f'{key}/R@{k}']:6.1f}" for k in (1, 5, 10)))


if __name__ == "__main__":
    cli.start(CONFIG_FILE, run, print_summary, SHORTCUTS, default_config="demo")
