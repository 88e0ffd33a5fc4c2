"""MMR train state and jitted train/eval steps: frozen encoders in, fusion encoder + decoder trained.

The encoders' parameters are an argument of every step, never part of the train state: they get no gradient (the
features are also under `stop_gradient`), no optimizer state, and run deterministically (dropout off; the reference
left RoBERTa's dropout on while frozen, docs/reference.md bug 16). Batches are sharded over the mesh's 'data' axis; the
(small) MMR parameters are replicated.

Targets (docs/reference.md R4.4): image = the encoder's input image in [0, 1] resized (torch bicubic) to img_size, NHWC;
audio = the AST features resized to aud_size, (B, frames, mel, 1); text = the input ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from synergy_jax import parallel, train
from synergy_jax import reconstruction_losses as rl
from synergy_jax.models import mmr
from synergy_jax.models.synergy import SynergyConfig

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class MMRState(train.TrainState):
    batch_stats: Any  # BatchNorm running statistics of the text decoder ({'none': 0} for image/audio)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What turns a batch into encoder inputs and targets, and the reference-behaviour switches."""

    missing: str
    image_mean: tuple[float, float, float]  # the pipeline's normalisation, undone for [0, 1] targets
    image_std: tuple[float, float, float]
    reference_unnormalized_images: bool = False  # docs/reference.md bug 38: feed [0, 1] images to the vision tower
    text_loss_on_pads: bool = False  # docs/reference.md bug 19: CE over all positions, pads included
    reference_batch_stats_at_eval: bool = False  # the reference never left train mode: BatchNorm batch stats
    alpha: float = rl.ALPHA
    audio_ssim_data_range: float = 1.0  # SSIM data range of audio targets (the job: the training targets' range)


def images_01(batch: Batch, options: StepOptions) -> jax.Array:
    mean, std = jnp.asarray(options.image_mean), jnp.asarray(options.image_std)
    return batch["image"] * std + mean


def encoder_inputs(batch: Batch, options: StepOptions) -> Batch:
    if options.reference_unnormalized_images and "image" in batch:
        return {**batch, "image": images_01(batch, options)}
    return batch


def targets(batch: Batch, config: mmr.MMRConfig, options: StepOptions) -> jax.Array:
    if options.missing == "image":
        return rl.bicubic_resize(images_01(batch, options), config.img_size, config.img_size)
    if options.missing == "audio":
        return rl.bicubic_resize(batch["audio"][..., None], *config.aud_size)
    return batch["input_ids"]


def empty_stats() -> dict[str, jax.Array]:
    """A placeholder for tasks without BatchNorm (Orbax does not round-trip empty trees)."""
    return {"none": jnp.zeros((), jnp.float32)}


def init_variables(model: mmr.MMRModel, feature_dims: dict[str, int], rng: jax.Array) -> tuple[Any, Any]:
    features = {m: jnp.zeros((1, d), jnp.float32) for m, d in feature_dims.items()}
    variables = nn.unbox(model.init({"params": rng, "dropout": rng}, features, train=False))
    return variables["params"], variables.get("batch_stats", empty_stats())


def feature_dims(synergy: SynergyConfig, missing: str) -> dict[str, int]:
    widths = {"image": synergy.vision.hidden_size, "text": synergy.text.hidden_size, "audio": synergy.audio.hidden_size}
    return {m: widths[m] for m in mmr.TASKS[missing].inputs}


def create_state(
    model: mmr.MMRModel, tx: optax.GradientTransformation, synergy: SynergyConfig, mesh: Mesh, rng: jax.Array
) -> MMRState:
    """A fresh, replicated train state."""
    init_rng, state_rng = jax.random.split(rng)

    def init() -> MMRState:
        params, stats = init_variables(model, feature_dims(synergy, model.missing), init_rng)
        return MMRState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng,
                        batch_stats=stats)

    return parallel.initialise(init, parallel.replicated(mesh))


def abstract_state(
    model: mmr.MMRModel, tx: optax.GradientTransformation, synergy: SynergyConfig, mesh: Mesh
) -> MMRState:
    """ShapeDtypeStructs (replicated on `mesh`) of the train state, for restores."""
    def init() -> MMRState:
        params, stats = init_variables(model, feature_dims(synergy, model.missing), jax.random.PRNGKey(0))
        return MMRState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                        rng=jax.random.PRNGKey(0), batch_stats=stats)

    sharding = parallel.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), jax.eval_shape(init))


def task_loss(recon: jax.Array, target: jax.Array, batch: Batch, options: StepOptions) -> dict[str, jax.Array]:
    if options.missing == "image":
        return rl.image_loss(recon, target, options.alpha)
    if options.missing == "audio":
        return rl.audio_loss(recon, target, options.alpha, options.audio_ssim_data_range)
    m = rl.token_metrics(recon, target, batch["attention_mask"])
    loss = m["ce_with_pads"] if options.text_loss_on_pads else m["ce"]
    return {"loss": loss, "ce": m["ce"], "accuracy": m["accuracy"], "ce_with_pads": m["ce_with_pads"],
            "accuracy_with_pads": m["accuracy_with_pads"]}  # fmt: skip


def make_train_step(
    model: mmr.MMRModel,
    tx: optax.GradientTransformation,
    synergy: SynergyConfig,
    options: StepOptions,
    mesh: Mesh,
    encoder_shardings: Any,
) -> Callable[[MMRState, Batch, Any], tuple[MMRState, dict[str, jax.Array]]]:
    """`(state, batch, encoder params) -> (state, metrics)`: `train.make_step` with the reconstruction loss; the
    frozen encoders are the step's third argument and the BatchNorm statistics its mutable field."""
    config = model.config

    def loss_fn(params, batch: Batch, rng: jax.Array, mutable: dict, encoder_params: Any):
        features = mmr.encoder_features(synergy, encoder_params, encoder_inputs(batch, options), options.missing,
                                        config.text_mean_over_pads)  # fmt: skip
        variables = {"params": params, "batch_stats": mutable["batch_stats"]}
        recon, updates = model.apply(variables, features, train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
        metrics = task_loss(recon, targets(batch, config, options), batch, options)
        return metrics["loss"], (metrics, {"batch_stats": updates.get("batch_stats", mutable["batch_stats"])})

    return train.make_step(loss_fn, tx, parallel.replicated(mesh), mesh, frozen_shardings=encoder_shardings,
                           mutable=("batch_stats",))  # fmt: skip


def make_eval_step(
    model: mmr.MMRModel, synergy: SynergyConfig, options: StepOptions, mesh: Mesh, encoder_shardings: Any
) -> Callable[[MMRState, Any, Batch], dict[str, jax.Array]]:
    """Deterministic forward: per-example outputs (sharded on 'data') for pooling over a whole split.

    image/audio: recon, target, per-example MSE and SSIM; text: predicted ids and per-example NLL/correct sums
    over non-pad tokens and over all positions. BatchNorm uses its running statistics unless
    `reference_batch_stats_at_eval` (then the eval batch's own statistics, padding rows included).
    """
    config = model.config

    def evaluate(state: MMRState, encoder_params: Any, batch: Batch) -> dict[str, jax.Array]:
        features = mmr.encoder_features(synergy, encoder_params, encoder_inputs(batch, options), options.missing,
                                        config.text_mean_over_pads)  # fmt: skip
        target = targets(batch, config, options)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if options.missing == "text" and options.reference_batch_stats_at_eval:
            recon, _ = model.apply(variables, features, train=True, rngs={"dropout": state.rng}, mutable=["batch_stats"])
        else:
            recon = model.apply(variables, features, train=False)
        if options.missing in ("image", "audio"):
            ssim_range = options.audio_ssim_data_range if options.missing == "audio" else 1.0
            err = jnp.square(recon.astype(jnp.float32) - target)
            return {"recon": recon, "target": target, "mse": jnp.mean(err, axis=(1, 2, 3)),
                    "ssim": jnp.mean(rl.ssim_per_channel(recon, target, ssim_range), axis=1)}  # fmt: skip
        logits = recon.astype(jnp.float32)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, target[..., None], -1)[..., 0]
        predicted = jnp.argmax(logits, -1)
        correct = (predicted == target).astype(jnp.float32)
        mask = batch["attention_mask"].astype(jnp.float32)
        return {"predicted": predicted, "target": target, "mask": mask, "nll": jnp.sum(nll * mask, 1),
                "correct": jnp.sum(correct * mask, 1), "nll_all": jnp.sum(nll, 1), "correct_all": jnp.sum(correct, 1)}  # fmt: skip

    by_batch = parallel.batch_sharding(mesh)
    return parallel.jit_on_mesh(evaluate, mesh, in_shardings=(parallel.replicated(mesh), encoder_shardings, by_batch),
                                out_shardings=by_batch)  # fmt: skip
