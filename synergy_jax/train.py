"""Train state, optimizer, and `make_step`: the one jitted, sharded train step builder of every job.

A job hands `make_step` its loss function (pre-training: `contrastive_loss`; MMR: `mmr_train`'s reconstruction
loss); the step is one pure function `(state, batch[, frozen]) -> (state, metrics)`, jitted once with explicit
in/out shardings and a donated state. Parameters and optimizer state are born sharded: shapes come from `jax.eval_shape`, shardings from
the parameters' logical axis names and a rule set, and `parallel.initialise` (a jit with those `out_shardings`)
creates them in place.

Gradient accumulation runs inside the step under `lax.scan`. Microbatch i takes rows i, i+k, i+2k, ... of the
batch, so every device keeps its own rows (no data movement). The contrastive batch is the microbatch: with `global`
negatives each microbatch is contrasted across all devices, with `local` negatives within each device's part of it
(the reference: 35 per GPU, 2 GPUs, 4 accumulation steps).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from synergy_jax import cli, losses, parallel
from synergy_jax.models.synergy import PAIRS, SynergyCLIP

Params = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Params
    opt_state: optax.OptState
    rng: jax.Array


def optimizer_config() -> ml_collections.ConfigDict:
    """The reference's optimizer (torch AdamW defaults, lr 5e-6, constant) and the options on top of it."""
    return ml_collections.ConfigDict(
        dict(
            learning_rate=5e-6,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            weight_decay_on="all",  # 'all' (the reference: biases, norms and temperatures too) or 'matrices'
            schedule="constant",  # or 'warmup_cosine', 'linear' (transformers' Trainer), 'step' (torch MultiStepLR)
            warmup_steps=0,
            total_steps=0,  # length of the decay (warmup included) of 'warmup_cosine' and 'linear'
            final_learning_rate_ratio=0.0,
            decay_boundaries=(0,),  # 'step': the steps at which the rate is multiplied by decay_factor
            decay_factor=1.0,
            clip_grad_norm=0.0,  # 0: no clipping (the reference)
        )
    )


# The legal values of `optimizer_config()`'s numeric fields (a job checks them as `optimizer.<field>`).
OPTIMIZER_RANGES = {
    "learning_rate": cli.NON_NEGATIVE,  # 0: the job's default
    "b1": cli.BELOW_ONE,
    "b2": cli.BELOW_ONE,
    "eps": cli.POSITIVE,
    "weight_decay": cli.NON_NEGATIVE,
    "warmup_steps": cli.COUNT,
    "total_steps": cli.COUNT,
    "final_learning_rate_ratio": cli.FRACTION,
    "decay_boundaries": cli.COUNT,
    "decay_factor": cli.NON_NEGATIVE,
    "clip_grad_norm": cli.NON_NEGATIVE,
}


def resolve_optimizer(
    config: ml_collections.ConfigDict, steps: int, default_learning_rate: float = 0.0
) -> ml_collections.ConfigDict:
    """A job's optimizer config with its run-dependent defaults filled in: a learning rate of 0 means the job's
    `default_learning_rate`, and a decaying schedule's length defaults to the run's `steps`."""
    optimizer = config.copy_and_resolve_references()
    with optimizer.unlocked():
        optimizer.learning_rate = optimizer.learning_rate or float(default_learning_rate)
        if optimizer.schedule != "constant" and optimizer.total_steps == 0:
            optimizer.total_steps = steps
    return optimizer


def check_schedule_length(total_steps: int, config: ml_collections.ConfigDict, flag: str = "optimizer.total_steps",
                          prefix: str = "optimizer.") -> None:
    """A warm-up schedule (warmup_cosine, linear) needs more steps than its warm-up; `flag` and `prefix` name the
    fields as the caller's command line spells them."""
    if config.schedule in ("warmup_cosine", "linear") and total_steps <= config.warmup_steps:
        raise ValueError(f"{flag}={total_steps} must exceed {prefix}warmup_steps={config.warmup_steps} for the "
                         f"{config.schedule!r} schedule")  # fmt: skip


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    lr, end = config.learning_rate, config.learning_rate * config.final_learning_rate_ratio
    if config.schedule == "constant":
        return optax.constant_schedule(lr)
    if config.schedule == "step":
        boundaries = {int(b): config.decay_factor for b in config.decay_boundaries if b > 0}
        return optax.piecewise_constant_schedule(lr, boundaries)
    if config.schedule not in ("warmup_cosine", "linear"):
        raise ValueError(f"unknown optimizer.schedule {config.schedule!r}; use 'constant', 'warmup_cosine', "
                         "'linear' or 'step'")  # fmt: skip
    check_schedule_length(config.total_steps, config)
    if config.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, config.warmup_steps, config.total_steps, end)
    decay = optax.linear_schedule(lr, end, config.total_steps - config.warmup_steps)
    if not config.warmup_steps:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, config.warmup_steps), decay], [config.warmup_steps])


def weight_decay_mask(which: str) -> Callable[[Params], Params] | None:
    if which == "all":
        return None
    if which == "matrices":  # the common choice: no decay on biases, norm scales and temperatures
        return lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    raise ValueError(f"unknown optimizer.weight_decay_on {which!r}; use 'all' or 'matrices'")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (decoupled decay, as torch.optim.AdamW) with optional global-norm clipping."""
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=weight_decay_mask(config.weight_decay_on),
    )
    if config.clip_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), adamw)
    return adamw


def state_shardings(
    model: SynergyCLIP, tx: optax.GradientTransformation, mesh: Mesh, rules: str, example: Batch
) -> TrainState:
    """NamedShardings of every leaf of the train state, derived from shapes only (nothing is allocated)."""
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), example)["params"]
    params = parallel.param_shardings(boxed, mesh, rules)
    opt_abstract = jax.eval_shape(tx.init, nn.unbox(boxed))
    replicated = parallel.replicated(mesh)
    opt = optax.tree_map_params(tx, lambda _, sharding: sharding, opt_abstract, params,
                                transform_non_params=lambda _: replicated)  # fmt: skip
    return TrainState(step=replicated, params=params, opt_state=opt, rng=replicated)


def abstract_train_state(
    model: SynergyCLIP, tx: optax.GradientTransformation, example: Batch, shardings: TrainState | None = None
) -> TrainState:
    """The train state as ShapeDtypeStructs (with shardings, if given): for AOT compilation and restores."""
    params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), example)["params"])
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
        rng=jax.eval_shape(jax.random.PRNGKey, 0),
    )
    if shardings is None:
        return state
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def create_train_state(
    model: SynergyCLIP,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: str,
    example: Batch,
    rng: jax.Array,
    pretrained: dict[str, Params] | None = None,
) -> tuple[TrainState, TrainState]:
    """(state, shardings): parameters and optimizer state created directly in their shardings.

    `pretrained` maps top-level parameter names (e.g. 'vision_model') to host (numpy) parameter trees, which are
    placed shard by shard into the fresh state; the rest (projections, temperatures) keeps its initialisation. The
    placed groups enter the initialiser as arguments, so XLA drops the random draws they replace instead of
    compiling and running them (Base with its three towers given: 4.3-4.8 s on CPU instead of 24-28 s; the same
    state, docs/performance.md).
    """
    shardings = state_shardings(model, tx, mesh, rules, example)
    init_rng, state_rng = jax.random.split(rng)
    abstract = abstract_train_state(model, tx, example).params if pretrained else {}  # shapes, for the check
    placed = _placed_pretrained(pretrained or {}, abstract, shardings.params)
    init = initialiser(model, tx, example, state_rng)
    return parallel.initialise(init, shardings, init_rng, placed), shardings


def initialiser(model: SynergyCLIP, tx: optax.GradientTransformation, example: Batch, state_rng: jax.Array):
    """`init(rng, placed) -> TrainState`: a fresh state whose parameter groups in `placed` are those given."""

    def init(rng: jax.Array, placed: dict[str, Params]) -> TrainState:
        params = {**nn.unbox(model.init(rng, example)["params"]), **placed}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)

    return init


def _placed_pretrained(pretrained: dict[str, Params], abstract: Params, shardings: Params) -> dict[str, Params]:
    """The pretrained groups on the devices in their shardings, after checking their names and shapes."""
    placed = {}
    for name, tree in pretrained.items():
        if name not in abstract:
            raise KeyError(f"pretrained weights for unknown parameter group {name!r}; known: {sorted(abstract)}")
        expected = jax.tree.map(lambda x: x.shape, abstract[name])
        given = jax.tree.map(lambda x: x.shape, tree)
        if expected != given:
            raise ValueError(f"pretrained {name} does not match the model config: shapes {given} vs {expected}")
        placed[name] = jax.device_put(tree, shardings[name], may_alias=False)  # the state is donated: own buffers
    return placed


def split_microbatches(batch: Batch, steps: int, mesh: Mesh) -> Batch:
    """(k*B, ...) -> (k, B, ...) with microbatch i = rows i, i+k, ...: each device keeps its own rows."""

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, jax.P(None, "data")))

    return jax.tree.map(split, batch)


def check_batch(batch_size: int, mesh: Mesh, accum_steps: int = 1, name: str = "") -> None:
    """Fails early, naming the numbers (and the flag `name`), when a global batch cannot be split over the mesh's
    data axis, the microbatches and the processes (each process feeds a whole share of it)."""
    data, processes = mesh.shape["data"], jax.process_count()
    divisor = math.lcm(data, processes)
    if batch_size % (divisor * accum_steps) == 0:
        return
    what = f"{name}={batch_size}" if name else f"batch size {batch_size}"
    accumulation = f" x accumulation steps {accum_steps}" if accum_steps > 1 else ""
    process_count = f" and by the process count ({processes})" if divisor != data else ""
    raise ValueError(f"{what} must be divisible by data-axis size {data}{accumulation}{process_count}")


# loss_fn(params, batch, rng, mutable, frozen) -> (loss, (metrics, mutable)). `mutable` holds the train-state fields
# the loss may update besides the parameters (e.g. BatchNorm statistics), `frozen` the parameters the step reads but
# never trains (e.g. MMR's encoders; None when there are none).
LossFn = Callable[[Params, Batch, jax.Array, dict[str, Any], Any], tuple[jax.Array, tuple[Metrics, dict[str, Any]]]]


def accumulated_gradients(loss_fn: LossFn, accum_steps: int, mesh: Mesh) -> Callable[..., tuple[Any, Metrics, dict]]:
    """`(params, batch, rng, fields, frozen) -> (grads, metrics, fields)`: the loss's gradients over the batch, as
    the mean over `accum_steps` microbatches (`lax.scan`, each device keeping its own rows) when more than one."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params: Params, batch: Batch, rng: jax.Array, fields: dict, frozen: Any):
        if accum_steps == 1:
            (_, (metrics, fields)), grads = grad_fn(params, batch, rng, fields, frozen)
            return grads, metrics, fields

        def accumulate(carry, inputs):
            grad_sum, fields = carry
            index, microbatch = inputs
            (_, (metrics, fields)), grads = grad_fn(params, microbatch, jax.random.fold_in(rng, index), fields, frozen)
            return (jax.tree.map(jnp.add, grad_sum, grads), fields), metrics

        microbatches = split_microbatches(batch, accum_steps, mesh)
        zeros = jax.tree.map(jnp.zeros_like, params)
        (grad_sum, fields), metrics = jax.lax.scan(accumulate, (zeros, fields), (jnp.arange(accum_steps), microbatches))
        return jax.tree.map(lambda g: g / accum_steps, grad_sum), jax.tree.map(jnp.mean, metrics), fields

    return gradients


def update_if_finite(finite: jax.Array, update: Callable[[Any], Any], state: Any, platform: str) -> Any:
    """`update(state)` where `finite`, else `state` as it was. On CPU a branch: a select between the updated and the
    old state reads every donated buffer after its update is computed, so XLA:CPU copied the whole optimizer state
    each step. On TPU the branch took more memory than the select (0.3 GiB more temporaries for Base on a v5e-8), so
    the select stays there and on GPU (docs/performance.md, stop 28)."""
    if platform == "cpu":
        return jax.lax.cond(finite, update, lambda state: state, state)
    return jax.tree.map(lambda new, old: jnp.where(finite, new, old), update(state), state)


def make_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    shardings: Any,
    mesh: Mesh,
    accum_steps: int = 1,
    *,
    frozen_shardings: Any = None,
    mutable: tuple[str, ...] = (),
    schedule: optax.Schedule | None = None,
    extra_metrics: Callable[[Params], Metrics] | None = None,
) -> Callable[..., tuple[Any, Metrics]]:
    """The jitted train step `(state, batch[, frozen]) -> (state, metrics)` of every job.

    It owns what all of them share: gradient accumulation over `accum_steps` microbatches (`lax.scan`, each device
    keeping its own rows), the gradient norm, the non-finite guard (a non-finite loss or gradient leaves the whole
    state untouched and sets metrics['nonfinite']), the learning rate of `schedule`, and donation of the state.
    `shardings` is the state's sharding tree (or one sharding for all of it); `extra_metrics(params)` adds the
    job's own read-outs of the parameters before the update (e.g. temperatures).
    """
    gradients = accumulated_gradients(loss_fn, accum_steps, mesh)
    platform = parallel.platform_of(mesh)

    def step(state, batch: Batch, *frozen: Any):
        rng = jax.random.fold_in(state.rng, state.step)
        fields = {name: getattr(state, name) for name in mutable}
        grads, metrics, fields = gradients(state.params, batch, rng, fields, frozen[0] if frozen else None)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

        def update(state):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                 opt_state=opt_state, **fields)  # fmt: skip

        new_state = update_if_finite(finite, update, state, platform)
        extra = extra_metrics(state.params) if extra_metrics is not None else {}
        metrics = {**metrics, **extra, "grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.float32)}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return new_state, metrics

    batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    in_shardings = (shardings, batch_sharding) + (() if frozen_shardings is None else (frozen_shardings,))
    return parallel.jit_on_mesh(step, mesh, in_shardings=in_shardings, out_shardings=(shardings, replicated),
                                donate_argnums=(0,))  # fmt: skip


def contrastive_loss(model: SynergyCLIP, loss_config: losses.LossConfig, mesh: Mesh,
                     prepare: Callable[[Batch], Batch] | None = None) -> LossFn:  # fmt: skip
    """Pre-training's loss for `make_step`: the tri-modal InfoNCE of the model's embeddings (dropout on).
    `prepare` maps each (micro)batch to the model's inputs first (device_augment.augment_batch)."""
    loss_on_mesh = losses.tri_modal_loss(mesh, loss_config)

    def loss_fn(params: Params, batch: Batch, rng: jax.Array, mutable: dict, frozen: Any):
        if prepare is not None:
            batch = prepare(batch)
        embeddings, log_scales = model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng})
        metrics = loss_on_mesh(embeddings, log_scales)
        return metrics["loss"], (metrics, mutable)

    return loss_fn


def temperatures(model: SynergyCLIP) -> Callable[[Params], Metrics]:
    """The three learned logit scales (exp of the log parameters, clamped if configured), for the step's metrics."""

    def read(params: Params) -> Metrics:
        log_scales = model.apply({"params": params}, method=SynergyCLIP.logit_scales)
        return {f"logit_scale/{pair}": jnp.exp(log_scales[pair]) for pair in PAIRS}

    return read


def make_train_step(
    model: SynergyCLIP,
    tx: optax.GradientTransformation,
    loss_config: losses.LossConfig,
    mesh: Mesh,
    shardings: TrainState,
    accum_steps: int = 1,
    schedule: optax.Schedule | None = None,
    prepare: Callable[[Batch], Batch] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Pre-training's step: `make_step` with the contrastive loss (of `prepare(batch)` when given) and the
    temperatures in the metrics."""
    return make_step(contrastive_loss(model, loss_config, mesh, prepare), tx, shardings, mesh, accum_steps,
                     schedule=schedule, extra_metrics=temperatures(model))  # fmt: skip
