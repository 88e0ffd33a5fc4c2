"""Tri-modal contrastive pre-training of Synergy-CLIP: the main job.

    python experiments/pretrain.py                                   # demo: embedded data, tiny model, CPU ok
    python experiments/pretrain.py --config=experiments/configs/pretrain.py:base_c --mesh=2x1 \
        --config.data.dir=data/vggsound_pre --workdir=runs/base_c

Sections: mesh -> input -> model/optimizer -> shardings + state -> steps -> checkpoint (resume) -> evals -> loop.
Rerunning with the same --workdir resumes from its latest checkpoint (state, optimizer, rng and input position).
SIGTERM saves a checkpoint and exits 0. A non-finite loss stops the run (exit 1) and keeps the last good checkpoint.
Only process 0 writes logs (metrics.jsonl, TensorBoard, progress bar).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from data_pipelines import demo, pipeline, precompute
from synergy_jax import audio, checkpoint, distributed, evaluation, flops, losses, parallel, text, train
from synergy_jax.distributed import StopRequest, is_main_process, log
from synergy_jax.models import preset
from synergy_jax.models.synergy import TOWER_PARAMS, SynergyCLIP, SynergyConfig, config_from_towers, example_batch
from synergy_jax.train import NonFiniteLossError

CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "pretrain.py"


def define_flags() -> dict[str, flags.FlagHolder]:
    """The command line. Defined only when this file runs as a script, so that tests and other jobs can import it
    (absl flags are process-global: two jobs defining --config at import would clash)."""
    return dict(
        config=config_flags.DEFINE_config_file("config", f"{CONFIG_FILE}:demo", "Config file[:name].", lock_config=True),
        workdir=flags.DEFINE_string("workdir", None, "Run folder (checkpoints, metrics, TensorBoard); default runs/<name>."),
        mesh=flags.DEFINE_string("mesh", "-1x1", "Device mesh DxM: D-way data, M-way model parallel (-1: the rest)."),
        coordinator_address=flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0."),
        num_processes=flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes."),
        process_id=flags.DEFINE_integer("process_id", None, "Multi-process: this process's index."),
    )


# ================================================================================================ input


@dataclasses.dataclass(frozen=True)
class Data:
    data_dir: Path
    tokenizer: str
    train_metadata: dict
    eval_metadata: dict


def precompute_config(config: ml_collections.ConfigDict) -> precompute.PrecomputeConfig:
    fbank = audio.FbankConfig(max_frames=config.data.max_frames, num_mel_bins=config.data.mel_bins)
    return precompute.PrecomputeConfig(image_size=config.data.image_size, fbank=fbank)


def prepare_data(config: ml_collections.ConfigDict, workdir: Path) -> Data:
    """Demo data generated/precomputed if missing; manifests precomputed if given; metadata checked. Process 0
    writes, the others wait for it."""
    c = config.data
    if c.demo:
        root = Path(c.dir) if c.dir else workdir / "data"
        distributed.on_main_process("demo data", demo.ensure_demo_data, root, precompute_config(config),
                                    progress=config.progress)  # fmt: skip
        data_dir, tokenizer = root / "precomputed", str(root / "raw" / "tokenizer")
    else:
        if not c.dir:
            raise ValueError("--config.data.dir is required: the precomputed data folder (see docs/pretrain.md)")
        data_dir, tokenizer = Path(c.dir), c.tokenizer or config.model.text
        for manifest, split in ((c.train_manifest, c.train_split), (c.eval_manifest, c.eval_split)):
            if not manifest:
                continue
            if not Path(manifest).is_file():
                raise FileNotFoundError(f"--config.data.{split}_manifest: {manifest} does not exist")
            distributed.on_main_process(f"precompute {split}", precompute.precompute, manifest, data_dir,
                                        precompute_config(config), split=split, workers=c.workers)  # fmt: skip
    train_metadata = precompute.load_metadata(data_dir, c.train_split)
    eval_metadata = precompute.load_metadata(data_dir, c.eval_split)
    return Data(data_dir, tokenizer, train_metadata, eval_metadata)


def input_slices(config: ml_collections.ConfigDict) -> int:
    """Number of input slices the global batch is assembled from (default: one per process).

    The data order depends only on this number, so a run with a fixed value gives the same batches on 1 process or
    on any number of processes that divides it.
    """
    return config.data.input_slices or jax.process_count()


class SlicedInput:
    """This process's share of the global batch: its input slices' batches, concatenated in slice order."""

    def __init__(self, configs: list[pipeline.PipelineConfig], tokenizer):
        self.iterators = [iter(pipeline.build_dataset(c, tokenizer)) for c in configs]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(iterator) for iterator in self.iterators]
        return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

    def get_state(self) -> dict:
        return {"slices": [iterator.get_state() for iterator in self.iterators]}

    def set_state(self, state: dict) -> None:
        if len(state["slices"]) != len(self.iterators):
            raise checkpoint.CheckpointError(
                f"the checkpoint's input state has {len(state['slices'])} slices for this process, this run "
                f"{len(self.iterators)}: keep --config.data.input_slices and the number of processes, or set "
                "--config.resume_data=False"
            )
        for iterator, slice_state in zip(self.iterators, state["slices"]):
            iterator.set_state(slice_state)


def pipeline_config(config: ml_collections.ConfigDict, data: Data, train_split: bool, **kw) -> pipeline.PipelineConfig:
    c = config.data
    return pipeline.PipelineConfig(
        data_dir=str(data.data_dir),
        split=c.train_split if train_split else c.eval_split,
        train=train_split,
        text_mode=c.text_mode,
        tokenizer=data.tokenizer,
        max_length=c.max_length,
        image_size=c.image_size,
        seed=config.seed,
        augment_image=c.augment_image,
        augment_audio=c.augment_audio,
        reference_eval_augmentation=c.reference_eval_augmentation,
        label_names=tuple(data.eval_metadata["labels"]),
        workers=c.workers,
        read_threads=c.read_threads,
        prefetch=c.prefetch,
        **kw,
    )


def train_input(config: ml_collections.ConfigDict, data: Data, tokenizer) -> SlicedInput:
    slices, processes = input_slices(config), jax.process_count()
    per_process = slices // processes
    first = jax.process_index() * per_process
    configs = [
        pipeline_config(config, data, True, batch_size=config.batch_size // slices, process_index=i,
                        process_count=slices)
        for i in range(first, first + per_process)
    ]  # fmt: skip
    return SlicedInput(configs, tokenizer)


def eval_input(config: ml_collections.ConfigDict, data: Data, tokenizer):
    """A fresh pass over the whole eval split (padded to whole batches, `valid` marks real rows)."""
    batch = config.eval_batch_size // jax.process_count()
    return pipeline.build_dataset(pipeline_config(config, data, False, batch_size=batch), tokenizer)


# ================================================================================================ model


def scratch_tower(modality: str, name: str, overrides: ml_collections.ConfigDict, fixed: dict, runtime: dict):
    return preset(modality, name, **runtime).replace(**{**overrides.to_dict(), **fixed})


def build_model_config(
    config: ml_collections.ConfigDict, data: Data, tokenizer, saved_model: dict | None
) -> tuple[SynergyConfig, dict[str, Any] | None]:
    """(model config, pretrained tower params or None). From the checkpoint when resuming (no weights loaded),
    from hub/folder checkpoints for init=hub, from presets for init=scratch."""
    m = config.model
    runtime = dict(dtype=m.dtype, remat=m.remat)
    clamp = m.logit_scale_max or None
    if saved_model is not None:
        return checkpoint.model_config_from_dict(saved_model, **runtime), None
    if m.init == "hub":
        from synergy_jax import weights

        towers, pretrained = {}, {}
        for modality in ("vision", "text", "audio"):
            module, params = weights.load_hf_tower(m[modality], **runtime)
            towers[modality], pretrained[TOWER_PARAMS[modality]] = module.config, params
        return config_from_towers(towers, m.projection_dim, logit_scale_max=clamp), pretrained
    if m.init == "scratch":
        fbank = data.train_metadata["config"]["fbank"]
        return SynergyConfig(
            vision=scratch_tower("vision", m.vision, m.vision_overrides, dict(image_size=config.data.image_size), runtime),
            text=scratch_tower("text", m.text, m.text_overrides,
                               dict(vocab_size=len(tokenizer), max_position_embeddings=config.data.max_length + 2), runtime),
            audio=scratch_tower("audio", m.audio, m.audio_overrides,
                                dict(max_length=fbank["max_frames"], num_mel_bins=fbank["num_mel_bins"]), runtime),
            projection_dim=m.projection_dim,
            logit_scale_max=clamp,
        ), None  # fmt: skip
    raise ValueError(f"--config.model.init must be 'hub' or 'scratch', got {m.init!r}")


def check_data_fits_model(model_config: SynergyConfig, data: Data, tokenizer, config: ml_collections.ConfigDict) -> None:
    """Image/audio shapes of the precomputed data and the tokenizer against the towers, before any compile."""
    for split, metadata in (("train", data.train_metadata), ("eval", data.eval_metadata)):
        fbank = metadata["config"]["fbank"]
        if (fbank["max_frames"], fbank["num_mel_bins"]) != (model_config.audio.max_length, model_config.audio.num_mel_bins):
            raise ValueError(
                f"{split} data in {data.data_dir} has audio features of {fbank['max_frames']} frames x "
                f"{fbank['num_mel_bins']} mel bins, the audio tower expects {model_config.audio.max_length} x "
                f"{model_config.audio.num_mel_bins}: precompute with --max_frames/--mel_bins to match"
            )
    if config.data.image_size != model_config.vision.image_size:
        raise ValueError(f"--config.data.image_size={config.data.image_size} but the vision tower takes "
                         f"{model_config.vision.image_size} px")  # fmt: skip
    if len(tokenizer) > model_config.text.vocab_size:
        raise ValueError(f"tokenizer {data.tokenizer} has {len(tokenizer)} tokens, more than the text tower's "
                         f"vocabulary of {model_config.text.vocab_size}")  # fmt: skip


def run_record(config: ml_collections.ConfigDict, model_config: SynergyConfig, mesh) -> dict:
    """What a checkpoint stores as its config JSON (and what a resumed run is checked against)."""
    model_spec = {k: v for k, v in config.model.to_dict().items() if k not in ("dtype", "remat")}
    return {
        "config": json.loads(config.to_json_best_effort()),
        "model": checkpoint.model_config_to_dict(model_config),
        "model_spec": model_spec,
        "optimizer_structure": checkpoint.optimizer_structure(config.optimizer),
        "run": {"mesh": dict(mesh.shape), "process_count": jax.process_count(), "input_slices": input_slices(config),
                "jax": jax.__version__},
    }  # fmt: skip


# ================================================================================================ evals


def gather(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) global array as one host numpy array on every process."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def replicated_input(mesh, value: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(parallel.replicated(mesh), np.asarray(value))


def make_text_embedder(model: SynergyCLIP, mesh, shardings: train.TrainState) -> Callable:
    def embed(params, ids, mask):
        return model.apply({"params": params}, ids, mask, method=SynergyCLIP.embed_text)

    return jax.jit(embed, in_shardings=(shardings.params, None, None), out_shardings=parallel.replicated(mesh))


def zero_shot(config, params, tokenizer, embed_text, mesh, embeddings, label_ids, label_names) -> dict[str, float]:
    """Image->text and audio->text classification against the label prompts (synonyms x templates ensembled)."""
    names = evaluation.class_names_from_labels(label_names)
    metrics = {}
    for modality, templates in (("image", config.zero_shot_image_templates), ("audio", config.zero_shot_audio_templates)):
        prompts, owners = evaluation.prompts_for_classes(names, templates)
        tokens = text.tokenize(tokenizer, prompts, config.data.max_length)
        ids, mask = (replicated_input(mesh, tokens[k]) for k in ("input_ids", "attention_mask"))
        classes = evaluation.class_embeddings(np.asarray(embed_text(params, ids, mask)), owners, len(names))
        scores = evaluation.zero_shot_metrics(embeddings[modality], classes, label_ids)
        metrics.update({f"zero_shot/{modality}->text/{k}": v for k, v in scores.items()})
    return metrics


def evaluate(config, model, state, eval_step, embed_text, mesh, data, tokenizer, contrastive_batch) -> dict[str, float]:
    """Pair losses, six-direction retrieval and zero-shot over the whole eval split (padding excluded)."""
    parts: dict[str, list[np.ndarray]] = {"image": [], "text": [], "audio": [], "valid": [], "label_id": []}
    for host_batch in eval_input(config, data, tokenizer):
        batch = pipeline.global_batch(host_batch, mesh)
        _, embeddings = eval_step(state.params, batch)
        for name in ("image", "text", "audio"):
            parts[name].append(gather(embeddings[name]))
        for name in ("valid", "label_id"):
            parts[name].append(gather(batch[name]))
    valid = np.concatenate(parts.pop("valid"))
    columns = {name: np.concatenate(chunks)[valid] for name, chunks in parts.items()}
    label_ids = columns.pop("label_id")
    scales = model.apply({"params": state.params}, method=SynergyCLIP.logit_scales)  # clamped as in training
    log_scales = {pair: float(gather(scale)) for pair, scale in scales.items()}
    loss_config = losses.LossConfig(**config.loss)
    metrics = {f"eval/{k}": v for k, v in evaluation.contrastive_losses(columns, log_scales, contrastive_batch,
                                                                       loss_config.pair_weights).items()}  # fmt: skip
    metrics.update({f"eval/{k}": v for k, v in evaluation.retrieval_metrics(columns).items()})
    zs = zero_shot(config, state.params, tokenizer, embed_text, mesh, columns, label_ids, data.eval_metadata["labels"])
    metrics.update({f"eval/{k}": v for k, v in zs.items()})
    metrics["eval/examples"] = int(valid.sum())
    return metrics


# ================================================================================================ logging


class MetricWriter:
    """JSON lines + TensorBoard scalars, written by process 0 only."""

    def __init__(self, workdir: Path):
        self.enabled = is_main_process()
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.jsonl = open(workdir / "metrics.jsonl", "a")
            self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and value is not None:
                self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()


@jax.jit
def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# ================================================================================================ the job


def total_steps(config: ml_collections.ConfigDict, data: Data) -> tuple[int, int]:
    """(total steps, steps per epoch): an epoch is every input slice's examples in whole batches."""
    slices = input_slices(config)
    per_slice = data.train_metadata["num_examples"] // slices
    steps_per_epoch = per_slice // (config.batch_size // slices)
    if steps_per_epoch == 0:
        raise ValueError(f"{data.train_metadata['num_examples']} training examples are fewer than one batch of "
                         f"{config.batch_size}")  # fmt: skip
    return (config.total_steps or config.epochs * steps_per_epoch), steps_per_epoch


def check_batch_split(config: ml_collections.ConfigDict, mesh, accum_steps: int) -> None:
    """The global batch must split into `accum_steps` microbatches over the data axis (and contrastive groups)."""
    train.check_batch(config.batch_size, mesh, accum_steps)
    losses.LossConfig(**config.loss).contrastive_batch(config.batch_size // accum_steps, mesh.shape["data"])


def batch_splits(config: ml_collections.ConfigDict, mesh, accum_steps: int) -> bool:
    try:
        check_batch_split(config, mesh, accum_steps)
    except ValueError:
        return False
    return True


def check_setup(config: ml_collections.ConfigDict, mesh) -> None:
    """Shape errors before any expensive work."""
    try:
        check_batch_split(config, mesh, config.accum_steps)
    except ValueError as error:
        fitting = [k for k in range(config.accum_steps - 1, 0, -1) if batch_splits(config, mesh, k)]
        hint = f"; --config.accum_steps={fitting[0]} fits this mesh (same batch)" if fitting else ""
        raise ValueError(f"{error}{hint}") from None
    slices, processes = input_slices(config), jax.process_count()
    if slices % processes or config.batch_size % slices:
        raise ValueError(f"--config.data.input_slices={slices} must be a multiple of the {processes} processes and "
                         f"divide --config.batch_size={config.batch_size}")  # fmt: skip
    if config.eval_batch_size % math.lcm(mesh.shape["data"], processes):
        raise ValueError(f"--config.eval_batch_size={config.eval_batch_size} must be divisible by the data axis "
                         f"({mesh.shape['data']}) and the process count ({processes})")  # fmt: skip


def run(
    config: ml_collections.ConfigDict, workdir: str | Path, mesh_spec: str, stop_at: Callable[[int], bool] | None = None
) -> dict[str, Any]:
    """Trains (or resumes) to the configured number of steps; returns the final summary (see `print_summary`).

    `stop_at(step)` -> True simulates a preemption after that step (tests); SIGTERM does the same.
    """
    started = time.time()
    workdir = Path(workdir).expanduser().absolute()
    workdir.mkdir(parents=True, exist_ok=True)

    # ---- mesh
    mesh = parallel.make_mesh(mesh_spec)
    check_setup(config, mesh)

    # ---- input
    data = prepare_data(config, workdir)
    tokenizer = text.load_tokenizer(data.tokenizer)
    steps, steps_per_epoch = total_steps(config, data)

    # ---- checkpoint state on disk (decides whether pretrained weights are loaded at all)
    manager = checkpoint.make_manager(workdir, save_every=config.checkpoint_every, keep=config.keep_checkpoints,
                                      async_save=config.async_checkpoints)  # fmt: skip
    resume_step = manager.latest_step()
    saved = checkpoint.saved_config(manager, resume_step) if resume_step is not None else None

    # ---- model, optimizer
    model_config, pretrained = build_model_config(config, data, tokenizer, saved["model"] if saved else None)
    check_data_fits_model(model_config, data, tokenizer, config)
    record = run_record(config, model_config, mesh)
    if saved is not None:
        checkpoint.check_compatible(saved, record, str(manager.directory))
    optimizer_config = config.optimizer.copy_and_resolve_references()
    if optimizer_config.schedule != "constant" and optimizer_config.total_steps == 0:
        with optimizer_config.unlocked():
            optimizer_config.total_steps = steps
    schedule = train.learning_rate_schedule(optimizer_config)
    tx = train.make_optimizer(optimizer_config)
    model = SynergyCLIP(model_config)
    example = example_batch(model_config, 1, config.data.max_length)

    # ---- shardings + state (born sharded, or restored onto this mesh)
    shardings = train.state_shardings(model, tx, mesh, config.sharding, example)
    train_iter = train_input(config, data, tokenizer)
    if resume_step is not None:
        abstract = train.abstract_train_state(model, tx, example, shardings)
        state = checkpoint.restore_train_state(manager, abstract, resume_step)
        if config.resume_data:
            train_iter.set_state(checkpoint.restore_data_state(manager, resume_step))
        log(f"resumed {workdir} at step {resume_step}")
    else:
        state, shardings = train.create_train_state(model, tx, mesh, config.sharding, example,
                                                    jax.random.PRNGKey(config.seed), pretrained)  # fmt: skip
        del pretrained
    if is_main_process():
        (workdir / "config.json").write_text(json.dumps(record, indent=1))

    # ---- steps
    loss_config = losses.LossConfig(**config.loss)
    train_step = train.make_train_step(model, tx, loss_config, mesh, shardings, config.accum_steps, schedule)
    eval_step = train.make_eval_step(model, loss_config, mesh, shardings)
    embed_text = make_text_embedder(model, mesh, shardings)
    microbatch = config.batch_size // config.accum_steps
    contrastive_batch = config.eval_contrastive_batch or loss_config.contrastive_batch(microbatch, mesh.shape["data"])
    eval_every = config.eval_every or steps_per_epoch
    train_flops = flops.train_flops_per_sample(model_config.forward_flops(config.data.max_length), model_config.vision.remat)
    peak = flops.peak_flops_per_device(jax.devices()[0].device_kind, config.peak_tflops)

    def do_eval(step: int) -> dict[str, float]:
        metrics = evaluate(config, model, state, eval_step, embed_text, mesh, data, tokenizer, contrastive_batch)
        writer.write(step, metrics)
        return metrics

    def do_save(step: int, force: bool) -> None:
        if not bool(all_finite(state.params)):
            raise NonFiniteLossError(f"parameters became non-finite by step {step}; not saving them")
        checkpoint.save(manager, step, state, record, train_iter.get_state(), force=force)

    # ---- loop
    writer = MetricWriter(workdir)
    stop = StopRequest()
    step = int(jax.device_get(state.step))
    log(f"{config.name or 'run'}: {steps} steps ({steps_per_epoch}/epoch), global batch {config.batch_size} "
        f"(x{config.accum_steps} accumulation), mesh {dict(mesh.shape)}, {jax.process_count()} process(es), "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), workdir {workdir}")  # fmt: skip
    bar = None
    if is_main_process() and config.progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    window: list[dict[str, float]] = []
    pending: tuple[int, dict] | None = None
    timer = {"t": None, "steps": 0}
    eval_metrics: dict[str, float] = {}
    preempted = False

    def settle() -> None:
        """Fetch the metrics of the step in flight; stop on non-finite; log every log_every steps."""
        nonlocal pending
        if pending is None:
            return
        done_step, metrics = pending
        pending = None
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if metrics["nonfinite"]:
            raise NonFiniteLossError(
                f"step {done_step}: non-finite loss or gradient (loss {metrics['loss']}, grad norm "
                f"{metrics['grad_norm']}); the update was not applied. Latest checkpoint: step "
                f"{manager.latest_step()} in {manager.directory}. Lower the learning rate or check the data."
            )
        window.append(metrics)
        if timer["t"] is None:  # the first step compiles: time from its end
            timer["t"], timer["steps"] = time.perf_counter(), 0
        else:
            timer["steps"] += 1
        if bar is not None:
            bar.update(1)
        if done_step % config.log_every == 0 or done_step == steps:
            summary = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
            elapsed = time.perf_counter() - timer["t"]
            if timer["steps"] > 0 and elapsed > 0:
                samples_per_second = timer["steps"] * config.batch_size / elapsed
                summary["samples_per_second"] = samples_per_second
                summary["samples_per_second_per_device"] = samples_per_second / jax.device_count()
                utilisation = flops.mfu(samples_per_second, train_flops, jax.device_count(), peak)
                if utilisation is not None:
                    summary["mfu"] = utilisation
            summary["epoch"] = done_step / steps_per_epoch
            writer.write(done_step, summary)
            if bar is not None:
                bar.set_postfix(loss=f"{summary['loss']:.3f}",
                                samples_s=f"{summary.get('samples_per_second', 0):.1f}", refresh=False)  # fmt: skip
            window.clear()
            timer["t"], timer["steps"] = time.perf_counter(), 0

    try:
        while step < steps:
            host_batch = next(train_iter)
            state, metrics = train_step(state, pipeline.global_batch(host_batch, mesh))
            settle()  # the previous step's metrics, while this one runs
            step += 1
            pending = (step, metrics)
            boundary = step % config.log_every == 0 or step == steps
            if (stop_at is not None and stop_at(step)) or (
                stop.agreed() if (jax.process_count() == 1 or boundary) else False
            ):
                settle()
                do_save(step, force=True)
                preempted = True
                log(f"stop requested: saved step {step} to {manager.directory}; rerun with the same --workdir to resume")
                break
            if step % eval_every == 0 and step != steps:
                settle()
                eval_metrics = do_eval(step)
                timer["t"] = None
            if manager.should_save(step) and step != steps:
                settle()
                do_save(step, force=False)
        settle()
        if not preempted:
            if manager.latest_step() != step:
                do_save(step, force=True)
            eval_metrics = do_eval(step)
    finally:
        stop.restore()
        manager.wait_until_finished()
        manager.close()
        writer.close()
        if bar is not None:
            bar.close()
    summary = {"step": step, "total_steps": steps, "preempted": preempted, "wall_seconds": time.time() - started,
               "workdir": str(workdir), "devices": jax.device_count(), **eval_metrics}  # fmt: skip
    if is_main_process():
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    if summary.get("preempted"):
        print(f"stopped at step {summary['step']}/{summary['total_steps']} (checkpoint saved); rerun to resume")
        return
    print(f"\n=== pre-training done: step {summary['step']}, {summary['wall_seconds']:.0f} s, {summary['workdir']}")
    print(f"held-out eval: {summary.get('eval/examples')} examples, loss {summary.get('eval/loss', float('nan')):.3f} "
          f"(IT {summary.get('eval/loss/it', float('nan')):.3f}, TA {summary.get('eval/loss/ta', float('nan')):.3f}, "
          f"AI {summary.get('eval/loss/ai', float('nan')):.3f})")  # fmt: skip
    for modality in ("image", "audio"):
        key = f"eval/zero_shot/{modality}->text"
        if f"{key}/top1" in summary:
            print(f"zero-shot {modality}->text (label prompts): top-1 {100 * summary[f'{key}/top1']:.1f}% "
                  f"(chance {100 * summary[f'{key}/chance']:.1f}%), top-5 {100 * summary.get(f'{key}/top5', 0):.1f}%")  # fmt: skip
    print(f"{'retrieval':16s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s}")
    for query, candidate in evaluation.DIRECTIONS:
        key = f"eval/retrieval/{query}->{candidate}"
        if f"{key}/R@1" in summary:
            print(f"{query + '->' + candidate:16s} " + " ".join(f"{100 * summary[f'{key}/R@{k}']:6.1f}" for k in (1, 5, 10)))


def main(argv, command_line: dict[str, flags.FlagHolder]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.default_log_verbosity()
    distributed.initialize(
        distributed.distributed_arguments(
            command_line["coordinator_address"].value, command_line["num_processes"].value, command_line["process_id"].value
        )
    )
    config = command_line["config"].value
    workdir = command_line["workdir"].value or str(Path("runs") / (config.name or "run"))
    summary = distributed.run_or_exit(run, config, workdir, command_line["mesh"].value)
    if is_main_process():
        print_summary(summary)


if __name__ == "__main__":
    distributed.start_job(define_flags, main, CONFIG_FILE)
