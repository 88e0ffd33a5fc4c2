"""Missing Modality Reconstruction (MMR) from a pre-training checkpoint.

    python experiments/mmr.py --checkpoint=runs/demo --missing=image            # demo config, CPU, minutes
    python experiments/mmr.py --checkpoint=runs/base_c --missing=audio --config=experiments/configs/mmr.py:base \
        --workdir=runs/mmr_base_c_audio --mesh=8x1

Sections: mesh -> frozen encoders (only the two towers the task needs, restored onto this mesh) -> data (the
pre-training run's precomputed splits, no augmentation) -> model/optimizer/state (fresh or resumed from --workdir)
-> baselines (mean training target; majority tokens) -> train loop (mini-batches of the train split) -> evaluation
on the held-out split -> metrics.jsonl, summary.json, reconstructions.png / text_samples.txt (process 0).

Rerunning with the same --workdir resumes from its latest checkpoint (state, optimizer, rng, input position).
SIGTERM saves a checkpoint and exits 0. See docs/mmr.md for the reference's bugs we fix and the flags that restore them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
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

from data_pipelines import augment, pipeline
from synergy_jax import checkpoint, distributed, mmr_train, parallel, text, train
from synergy_jax import reconstruction_losses as rl
from synergy_jax.distributed import StopRequest, is_main_process, log
from synergy_jax.models import mmr
from synergy_jax.models.synergy import SynergyConfig
from synergy_jax.train import NonFiniteLossError

CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "mmr.py"


def define_flags() -> dict[str, flags.FlagHolder]:
    """The command line. Defined only when this file runs as a script (absl flags are process-global, and the
    pre-training job defines --config too)."""
    return dict(
        config=config_flags.DEFINE_config_file("config", f"{CONFIG_FILE}:demo", "Config file[:name].", lock_config=True),
        checkpoint=flags.DEFINE_string("checkpoint", "runs/demo", "Pre-training run folder (its checkpoints/ hold the "
                                       "towers); default: where `python experiments/pretrain.py` writes the demo run."),
        missing=flags.DEFINE_enum("missing", None, ["image", "text", "audio"], "The modality to reconstruct."),
        workdir=flags.DEFINE_string("workdir", None, "MMR run folder; default runs/mmr_<config>_<missing>."),
        mesh=flags.DEFINE_string("mesh", "-1x1", "Device mesh DxM (the pre-training mesh need not match)."),
    )


# ================================================================================================ data


def data_source(config: ml_collections.ConfigDict, pretrain_dir: Path, saved: dict) -> tuple[Path, str, str, int, int]:
    """(precomputed dir, tokenizer, text mode, max length, image size): the pre-training run's, unless overridden."""
    pre = saved["config"]["data"]
    if config.data.dir:
        data_dir = Path(config.data.dir)
        tokenizer = config.data.tokenizer or pre.get("tokenizer") or saved["config"]["model"]["text"]
    elif pre.get("demo"):
        root = Path(pre["dir"]) if pre.get("dir") else pretrain_dir / "data"
        data_dir, tokenizer = root / "precomputed", config.data.tokenizer or str(root / "raw" / "tokenizer")
    else:
        if not pre.get("dir"):
            raise ValueError("the pre-training run names no data folder: pass --config.data.dir")
        data_dir = Path(pre["dir"])
        tokenizer = config.data.tokenizer or pre.get("tokenizer") or saved["config"]["model"]["text"]
    if not data_dir.is_dir():
        raise FileNotFoundError(f"precomputed data {data_dir} does not exist: pass --config.data.dir")
    return data_dir, tokenizer, config.data.text_mode or pre["text_mode"], pre["max_length"], pre["image_size"]


def pipeline_config(config, data_dir: Path, tokenizer: str, text_mode: str, max_length: int, image_size: int,
                    split: str, train_split: bool, batch_size: int) -> pipeline.PipelineConfig:  # fmt: skip
    """No augmentation anywhere (the reference's MMR had none)."""
    return pipeline.PipelineConfig(
        data_dir=str(data_dir), split=split, batch_size=batch_size, train=train_split, text_mode=text_mode,
        tokenizer=tokenizer, max_length=max_length, image_size=image_size, seed=config.seed, augment_image=False,
        augment_audio=False, read_threads=config.data.read_threads, prefetch=config.data.prefetch,
    )  # fmt: skip


# ================================================================================================ model


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
            raise ValueError(f"--config.model.{name}_decoder_layer_info ends at {mmr.final_size(info)} after the final "
                             f"x{info[-1][0]} upscale, but {name}_size is {tuple(size)}")  # fmt: skip
    return c


def run_record(config, missing: str, model_config: mmr.MMRConfig, pretrain_dir: Path, mesh) -> dict:
    """The config JSON stored with every checkpoint (a resumed run is checked against `model` and the optimizer)."""
    return {
        "config": json.loads(config.to_json_best_effort()),
        "model": {"missing": missing, **json.loads(json.dumps(model_config.__dict__))},
        "optimizer_structure": checkpoint.optimizer_structure(config.optimizer),
        "run": {"pretrain_checkpoint": str(pretrain_dir), "mesh": dict(mesh.shape), "jax": jax.__version__},
    }


# ================================================================================================ evaluation


def gather(x: jax.Array) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def global_batch(host_batch: dict, mesh) -> dict:
    return pipeline.global_batch({k: v for k, v in host_batch.items() if k != "label_id"}, mesh)


def training_target_statistics(config, missing, model_config, options, mesh, make_input) -> dict[str, np.ndarray]:
    """Mean training target (image/audio) or token counts per position (text), over up to `baseline_examples`."""
    target_fn = jax.jit(lambda b: mmr_train.targets(b, model_config, options))
    total, count, low, high = None, 0, np.inf, -np.inf
    for host_batch in make_input():
        batch = global_batch(host_batch, mesh)
        valid = gather(batch["valid"])
        target = gather(target_fn(batch))[valid]
        if missing == "text":
            mask = gather(batch["attention_mask"])[valid].astype(bool)
            counts = np.zeros((target.shape[1], model_config.vocab_size))
            for position in range(target.shape[1]):
                np.add.at(counts[position], target[mask[:, position], position], 1)
            total = counts if total is None else total + counts
        else:
            low, high = min(low, float(target.min())), max(high, float(target.max()))
            summed = target.astype(np.float64).sum(0)
            total = summed if total is None else total + summed
        count += int(valid.sum())
        if count >= config.baseline_examples:
            break
    if missing == "text":
        return {"position_counts": total, "examples": count}
    return {"mean_target": (total / count).astype(np.float32), "examples": count, "target_range": high - low}


def evaluate(state, encoder_params, eval_step, mesh, make_input, missing, stats, num_samples,
             ssim_data_range: float = 1.0) -> tuple[dict, dict]:  # fmt: skip
    """Metrics over the whole held-out split (padding excluded), the baselines' metrics, and the first samples."""
    parts: dict[str, list[np.ndarray]] = {}
    baseline_ssim = jax.jit(lambda t, m: jnp.mean(rl.ssim_per_channel(jnp.broadcast_to(m, t.shape), t, ssim_data_range), axis=1))
    for host_batch in make_input():
        batch = global_batch(host_batch, mesh)
        out = {k: gather(v) for k, v in eval_step(state, encoder_params, batch).items()}
        valid = gather(batch["valid"])
        if missing != "text":
            out["baseline_ssim"] = gather(baseline_ssim(out["target"], stats["mean_target"]))
            out["baseline_mse"] = np.mean((out["target"] - stats["mean_target"][None]) ** 2, axis=(1, 2, 3))
        for key, value in out.items():
            if key in ("recon", "target") and missing != "text" and sum(map(len, parts.get(key, []))) >= num_samples:
                continue  # images and spectrograms: the metrics are per example, keep only the samples' pixels
            parts.setdefault(key, []).append(value[valid])
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    samples = {k: v[:num_samples] for k, v in cols.items() if k in ("recon", "target", "predicted", "mask")}
    if missing != "text":
        metrics = mmr_train.grid_metrics(cols["mse"], cols["ssim"])
        baseline = mmr_train.grid_metrics(cols["baseline_mse"], cols["baseline_ssim"])
        metrics.update({f"baseline_mean_target/{k}": v for k, v in baseline.items()})
    else:
        tokens, positions = cols["mask"].sum(), cols["mask"].size
        metrics = mmr_train.text_metrics(cols["nll"], cols["correct"], cols["nll_all"], cols["correct_all"], tokens,
                                         positions)  # fmt: skip
        metrics.update(text_baselines(stats["position_counts"], cols["target"], cols["mask"]))
    metrics["examples"] = int(len(cols["mse" if missing != "text" else "nll"]))
    if missing != "text":
        metrics["ssim_data_range"] = float(ssim_data_range)
    return metrics, samples


def text_baselines(position_counts: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """What ignoring the image and audio scores on the non-pad tokens (and, for accuracy, all positions): predicting
    the most frequent training token overall or at each position, and the cross-entropy of the training tokens'
    distribution at each position (one pseudo-example spread over the vocabulary, so unseen tokens stay finite).
    A decoder that uses its inputs beats the last on cross-entropy even where its argmax ties the per-position
    majority (docs/mmr.md)."""
    mask = mask.astype(bool)
    overall = np.full(target.shape, position_counts.sum(0).argmax())
    per_position = np.broadcast_to(position_counts.argmax(1)[None, :], target.shape)
    out = {}
    for name, guess in (("majority_token", overall), ("majority_token_per_position", per_position)):
        correct = guess == target
        out[f"baseline_{name}/accuracy"] = float(correct[mask].mean())
        out[f"baseline_{name}/accuracy_with_pads"] = float(correct.mean())
    vocab = position_counts.shape[1]
    probs = (position_counts + 1.0 / vocab) / (position_counts.sum(1, keepdims=True) + 1.0)
    positions = np.broadcast_to(np.arange(target.shape[1])[None, :], target.shape)
    out["baseline_unigram_per_position/ce"] = float(-np.log(probs[positions[mask], target[mask]]).mean())
    return out


# ================================================================================================ outputs


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def reconstruction_grid(targets: np.ndarray, recons: np.ndarray, spectrogram: bool, zoom: int) -> np.ndarray:
    """One row per sample: target | reconstruction, uint8 RGB. Spectrograms: mel upwards, time rightwards, each pair
    scaled by its target's range."""
    rows = []
    for target, recon in zip(targets, recons):
        if spectrogram:
            low, high = float(target.min()), float(target.max())
            scale = lambda a: np.repeat(((a[..., 0] - low) / max(high - low, 1e-6)).T[::-1, :, None], 3, -1)  # noqa: E731
            target, recon = scale(target), scale(recon)
        pair = np.concatenate([target, np.ones((target.shape[0], 2, 3)), recon], axis=1)
        rows.extend([pair, np.ones((2, pair.shape[1], 3))])
    grid = np.concatenate(rows[:-1], axis=0)
    return np.repeat(np.repeat(_to_uint8(grid), zoom, 0), zoom, 1)


def write_samples(workdir: Path, missing: str, samples: dict, tokenizer) -> list[str]:
    """reconstructions.png (image/audio) or text_samples.txt (text); returns the written paths."""
    if missing == "text":
        lines = []
        for predicted, target, mask in zip(samples["predicted"], samples["target"], samples["mask"]):
            keep = mask.astype(bool)
            lines.append(f"target:        {tokenizer.decode(target[keep].tolist())}\n"
                         f"reconstructed: {tokenizer.decode(predicted[keep].tolist())}\n")  # fmt: skip
        path = workdir / "text_samples.txt"
        path.write_text("\n".join(lines))
        return [str(path)]
    from PIL import Image

    zoom = max(1, 128 // max(samples["target"].shape[1:3]))
    grid = reconstruction_grid(samples["target"], samples["recon"], missing == "audio", zoom)
    path = workdir / "reconstructions.png"
    Image.fromarray(grid).save(path)
    return [str(path)]


# ================================================================================================ the job


def run(config: ml_collections.ConfigDict, checkpoint_dir: str | Path, missing: str, workdir: str | Path,
        mesh_spec: str = "-1x1", stop_at: Callable[[int], bool] | None = None) -> dict[str, Any]:  # fmt: skip
    """Trains (or resumes) MMR to the configured steps, evaluates on the held-out split; returns the summary."""
    started = time.time()
    if missing not in mmr.TASKS:
        raise ValueError(f"--missing must be one of {sorted(mmr.TASKS)}, got {missing!r}")
    pretrain_dir = Path(checkpoint_dir).expanduser().absolute()
    workdir = Path(workdir).expanduser().absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh(mesh_spec)
    train.check_batch(config.batch_size, mesh, 1)
    train.check_batch(config.eval_batch_size, mesh, 1)
    steps_default, lr_default = config.task_defaults[missing]
    steps = config.total_steps or int(steps_default)

    # ---- frozen encoders: only the two towers of the task
    towers = [mmr.TOWER_OF[m] for m in mmr.TASKS[missing].inputs]
    encoder_params, synergy, saved = checkpoint.restore_params(pretrain_dir, mesh, groups=towers)
    encoder_shardings = jax.tree.map(lambda x: x.sharding, encoder_params)

    # ---- data
    data_dir, tokenizer_name, text_mode, max_length, image_size = data_source(config, pretrain_dir, saved)
    tokenizer = text.load_tokenizer(tokenizer_name)
    per_process = lambda n: n // jax.process_count()  # noqa: E731
    make_config = lambda split, is_train, batch: pipeline_config(config, data_dir, tokenizer_name, text_mode,  # noqa: E731
                                                                 max_length, image_size, split, is_train, per_process(batch))
    train_iter = iter(pipeline.build_dataset(make_config(config.data.train_split, True, config.batch_size), tokenizer))
    make_eval_input = lambda: pipeline.build_dataset(make_config(config.data.eval_split, False, config.eval_batch_size), tokenizer)  # noqa: E731
    make_train_pass = lambda: pipeline.build_dataset(make_config(config.data.train_split, False, config.eval_batch_size), tokenizer)  # noqa: E731

    # ---- model, optimizer, state
    model_config = mmr_config(config, synergy, max_length)
    model = mmr.MMRModel(model_config, missing)
    optimizer_config = config.optimizer.copy_and_resolve_references()
    with optimizer_config.unlocked():
        optimizer_config.learning_rate = optimizer_config.learning_rate or float(lr_default)
        if optimizer_config.schedule != "constant" and optimizer_config.total_steps == 0:
            optimizer_config.total_steps = steps
    tx = train.make_optimizer(optimizer_config)
    options = mmr_train.StepOptions(
        missing=missing, image_mean=tuple(map(float, augment.CLIP_MEAN)), image_std=tuple(map(float, augment.CLIP_STD)),
        reference_unnormalized_images=config.reference_unnormalized_images, text_loss_on_pads=config.text_loss_on_pads,
        reference_batch_stats_at_eval=config.reference_batch_stats_at_eval, alpha=config.alpha,
    )  # fmt: skip
    # ---- baselines (from the training split only); the audio SSIM's data range is the training targets' range
    stats = training_target_statistics(config, missing, model_config, options, mesh, make_train_pass)
    if missing == "audio" and not config.reference_audio_ssim_data_range:
        options = dataclasses.replace(options, audio_ssim_data_range=float(stats["target_range"]))
    ssim_range = options.audio_ssim_data_range if missing == "audio" else 1.0
    record = run_record(config, missing, model_config, pretrain_dir, mesh)
    manager = checkpoint.make_manager(workdir, save_every=config.checkpoint_every, keep=config.keep_checkpoints)
    resume_step = manager.latest_step()
    if resume_step is not None:
        checkpoint.check_compatible(checkpoint.saved_config(manager, resume_step), record, str(manager.directory))
        abstract = mmr_train.abstract_state(model, tx, synergy, mesh)
        state = checkpoint.restore_train_state(manager, abstract, resume_step)
        train_iter.set_state(checkpoint.restore_data_state(manager, resume_step))
        log(f"resumed {workdir} at step {resume_step}")
    else:
        state = mmr_train.create_state(model, tx, synergy, mesh, jax.random.PRNGKey(config.seed))
    if is_main_process():
        (workdir / "config.json").write_text(json.dumps(record, indent=1))
    train_step = mmr_train.make_train_step(model, tx, synergy, options, mesh, encoder_shardings)
    eval_step = mmr_train.make_eval_step(model, synergy, options, mesh, encoder_shardings)

    # ---- loop
    log(f"MMR {config.name} missing={missing}: {steps} steps, batch {config.batch_size}, lr "
        f"{optimizer_config.learning_rate:g}, encoders {towers} frozen from {pretrain_dir}, data {data_dir}, "
        f"mesh {dict(mesh.shape)}, workdir {workdir}")  # fmt: skip
    metrics_file = open(workdir / "metrics.jsonl", "a") if is_main_process() else None
    write = lambda step, m: metrics_file and (metrics_file.write(json.dumps({"step": step, **m}) + "\n"), metrics_file.flush())  # noqa: E731
    bar = None
    step = int(jax.device_get(state.step))
    if is_main_process() and config.progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=step, desc=f"mmr/{missing}", unit="step", dynamic_ncols=True)
    stop, window, preempted = StopRequest(), [], False
    train_seconds = 0.0

    def save(force: bool) -> None:
        checkpoint.save(manager, step, state, record, train_iter.get_state(), force=force)

    try:
        while step < steps:
            t0 = time.perf_counter()
            state, metrics = train_step(state, encoder_params, global_batch(next(train_iter), mesh))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            train_seconds += time.perf_counter() - t0
            step += 1
            if metrics["nonfinite"]:
                raise NonFiniteLossError(f"step {step}: non-finite loss or gradient ({metrics['loss']}); not applied. "
                                         f"Latest checkpoint: {manager.latest_step()}. Lower the learning rate.")  # fmt: skip
            window.append(metrics)
            if bar is not None:
                bar.update(1)
            if step % config.log_every == 0 or step == steps:
                summary = {f"train/{k}": float(np.mean([m[k] for m in window])) for k in window[0]}
                write(step, summary)
                if bar is not None:
                    bar.set_postfix(loss=f"{summary['train/loss']:.4f}", refresh=False)
                window.clear()
            if (stop_at is not None and stop_at(step)) or stop.agreed():
                save(force=True)
                preempted = True
                log(f"stop requested: saved step {step}; rerun with the same --workdir to resume")
                break
            if config.eval_every and step % config.eval_every == 0 and step != steps:
                eval_metrics, _ = evaluate(state, encoder_params, eval_step, mesh, make_eval_input, missing, stats, 0,
                                          ssim_range)
                write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
            if manager.should_save(step) and step != steps:
                save(force=False)
        eval_metrics: dict[str, Any] = {}
        outputs: list[str] = []
        if not preempted:
            if manager.latest_step() != step:
                save(force=True)
            eval_metrics, samples = evaluate(state, encoder_params, eval_step, mesh, make_eval_input, missing, stats,
                                             config.num_samples, ssim_range)  # fmt: skip
            write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
            if is_main_process():
                outputs = write_samples(workdir, missing, samples, tokenizer)
    finally:
        stop.restore()
        manager.wait_until_finished()
        manager.close()
        if metrics_file:
            metrics_file.close()
        if bar is not None:
            bar.close()
    summary = {"missing": missing, "step": step, "total_steps": steps, "preempted": preempted,
               "wall_seconds": time.time() - started, "train_seconds": train_seconds, "workdir": str(workdir),
               "baseline_examples": stats["examples"], "outputs": outputs,
               **{f"eval/{k}": v for k, v in eval_metrics.items()}}  # fmt: skip
    if is_main_process():
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


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


def main(argv, command_line: dict[str, flags.FlagHolder]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.default_log_verbosity()
    checkpoint_dir, missing = command_line["checkpoint"].value, command_line["missing"].value
    if not missing:
        print("error: --missing={image,text,audio} is required (the modality to reconstruct)", file=sys.stderr)
        sys.exit(2)
    distributed.initialize(distributed.distributed_arguments())  # env / TPU pod / SLURM / MPI; None: 1 process
    config = command_line["config"].value
    workdir = command_line["workdir"].value or str(Path("runs") / f"mmr_{config.name}_{missing}")
    summary = distributed.run_or_exit(run, config, checkpoint_dir, missing, workdir, command_line["mesh"].value)
    if is_main_process():
        print_summary(summary)


if __name__ == "__main__":
    distributed.start_job(define_flags, main, CONFIG_FILE)
