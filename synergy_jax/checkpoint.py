"""Orbax checkpoints of a pre-training run, and partial restore for the jobs that consume them.

Layout under a run's workdir:

    <workdir>/checkpoints/<step>/state/    TrainState (params, opt_state, step, rng), sharded arrays (Orbax PyTree)
                                 data/     the Grain iterator state of every process (process_<i>-of-<n>.json)
                                 config/   JSON: the resolved run config, the model config (tower configs in
                                           Hugging Face form, projection, temperatures) and run facts

Saving is asynchronous (arrays are copied to host, then written in a background thread); `wait_until_finished()`
before exit. Restoring takes the target shardings, so a checkpoint written on one mesh restores onto any other.
`restore_params` restores only the parameters (or only some towers) and rebuilds the model config from the JSON,
so evaluation jobs need nothing but the workdir.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from synergy_jax import parallel, train
from synergy_jax.models import TOWERS
from synergy_jax.models.synergy import SynergyCLIP, SynergyConfig, example_batch

STATE, DATA, CONFIG = "state", "data", "config"
CHECKPOINT_SUBDIR = "checkpoints"
PARAM_GROUPS = ("vision_model", "text_model", "audio_model", "vision_projection", "text_projection",
                "audio_projection", "logit_scale_it", "logit_scale_ta", "logit_scale_ai")  # fmt: skip
MODALITY_PARAMS = {
    "image": ("vision_model", "vision_projection"),
    "text": ("text_model", "text_projection"),
    "audio": ("audio_model", "audio_projection"),
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or written by an incompatible config."""


# ------------------------------------------------------------------------------------------ model config <-> JSON


def model_config_to_dict(config: SynergyConfig) -> dict[str, Any]:
    """What rebuilds the model: each tower's Hugging Face config fields, the projection and the temperatures."""
    return {
        "vision": config.vision.to_hf_dict(),
        "text": config.text.to_hf_dict(),
        "audio": config.audio.to_hf_dict(),
        "projection_dim": config.projection_dim,
        "logit_scale_init": config.logit_scale_init,
        "logit_scale_max": config.logit_scale_max,
    }


def model_config_from_dict(saved: Mapping[str, Any], dtype: str = "float32", remat: bool = False) -> SynergyConfig:
    towers = {name: TOWERS[name].config_cls.from_hf_dict(saved[name], dtype=dtype, remat=remat) for name in TOWERS}
    return SynergyConfig(
        **towers,
        projection_dim=saved["projection_dim"],
        logit_scale_init=saved["logit_scale_init"],
        logit_scale_max=saved["logit_scale_max"],
    )


def _differences(saved: Any, current: Any, path: str = "") -> list[str]:
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in saved or key not in current:
                out.append(f"{where}: {'absent' if key not in saved else saved[key]!r} -> "
                           f"{'absent' if key not in current else current[key]!r}")  # fmt: skip
            else:
                out.extend(_differences(saved[key], current[key], where))
        return out
    same = saved == current or (isinstance(saved, (list, tuple)) and list(saved) == list(current))
    return [] if same else [f"{path}: {saved!r} -> {current!r}"]


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """Raises CheckpointError naming every field that makes the saved state unusable for the current run.

    Compared: the model config (and, when given, the config fields that define it) and the optimizer options that change the optimizer state's structure. Everything
    else (learning rate, steps, batch size, mesh, logging) may change between runs.
    """
    problems = _differences(saved.get("model", {}), current["model"], "model")
    if "model_spec" in current:
        problems += _differences(saved.get("model_spec", {}), current["model_spec"], "model_spec")
    problems += _differences(saved.get("optimizer_structure", {}), current["optimizer_structure"], "optimizer")
    if problems:
        raise CheckpointError(
            f"the checkpoint in {where} was written by an incompatible config ({len(problems)} difference(s), "
            f"saved -> now): " + "; ".join(problems[:12]) + ". Use another --workdir for a new run, or the config "
            "that wrote it."
        )


def optimizer_structure(optimizer_config: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer options that decide the shape of its state (see `train.make_optimizer`)."""
    return {"clip_grad_norm": optimizer_config["clip_grad_norm"] > 0, "weight_decay_on": optimizer_config["weight_decay_on"]}


# ------------------------------------------------------------------------------------------ the manager


class _DataState:
    """A frozen Grain iterator state in the shape Grain's Orbax handler expects (`get_state` -> bytes).

    The state is captured when `save` is called, so an asynchronous save never records a later position.
    """

    def __init__(self, state: Mapping[str, Any] | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        pass


def checkpoint_dir(workdir: str | Path) -> Path:
    """A run's checkpoint folder; also accepts the checkpoint folder itself."""
    workdir = Path(workdir).expanduser().absolute()
    return workdir if workdir.name == CHECKPOINT_SUBDIR else workdir / CHECKPOINT_SUBDIR


def make_manager(
    workdir: str | Path, *, save_every: int = 1, keep: int | None = 3, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
    """CheckpointManager for a run: saves at multiples of `save_every` (and when forced), keeps the last `keep`."""
    import grain

    handlers = {
        STATE: ocp.PyTreeCheckpointHandler(),
        DATA: grain.checkpoint.CheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
    }
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=0 if read_only else max(1, save_every),
        max_to_keep=None if read_only else keep,
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
    )
    # Orbax warns 'Given directory is read only' on every read-only open.
    with _absl_logging_at(logging.ERROR) if read_only else contextlib.nullcontext():
        return ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers=handlers, options=options)


@contextlib.contextmanager
def _absl_logging_at(level: int):
    absl_logger = logging.getLogger("absl")
    previous = absl_logger.level
    absl_logger.setLevel(level)
    try:
        yield
    finally:
        absl_logger.setLevel(previous)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: train.TrainState,
    config: Mapping[str, Any],
    data_state: Mapping[str, Any] | None = None,
    force: bool = False,
) -> bool:
    """Saves (asynchronously) if `step` is due or `force`; returns whether a save started."""
    import grain

    items = {STATE: ocp.args.PyTreeSave(state), CONFIG: ocp.args.JsonSave(dict(config))}
    if data_state is not None:
        items[DATA] = grain.checkpoint.CheckpointSave(_DataState(data_state))
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def _latest(manager: ocp.CheckpointManager, step: int | None) -> int:
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(
                f"no checkpoint in {manager.directory}: train one with `python experiments/pretrain.py` (it writes "
                "runs/<config name>, runs/demo by default, under the working directory) or pass its run folder"
            )
    if step not in manager.all_steps():
        raise CheckpointError(f"no checkpoint at step {step} in {manager.directory} (steps: {list(manager.all_steps())})")
    return step


def latest_step(workdir: str | Path, step: int | None = None) -> int:
    """`step` if the run has it, else its latest step; a CheckpointError that says what to do when there is none."""
    manager = make_manager(workdir, read_only=True)
    try:
        return _latest(manager, step)
    finally:
        manager.close()


def saved_config(manager: ocp.CheckpointManager, step: int | None = None) -> dict[str, Any]:
    """The config JSON of a checkpoint (default: the latest)."""
    step = _latest(manager, step)
    return manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]


def _restore_tree(manager: ocp.CheckpointManager, step: int, target: Any, partial: bool) -> Any:
    args = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=partial
    )
    try:
        return manager.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{manager.directory}/{step}: the saved state does not match the model being restored ({error})"
        ) from error


def restore_train_state(
    manager: ocp.CheckpointManager, abstract_state: train.TrainState, step: int | None = None
) -> train.TrainState:
    """The full train state of a checkpoint, placed in `abstract_state`'s shardings (any mesh)."""
    return _restore_tree(manager, _latest(manager, step), abstract_state, partial=False)


def restore_data_state(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """This process's Grain iterator state at `step`."""
    import grain

    holder = _DataState()
    try:
        manager.restore(step, args=ocp.args.Composite(**{DATA: grain.checkpoint.CheckpointRestore(holder)}))
    except (ValueError, FileNotFoundError) as error:
        raise CheckpointError(
            f"{manager.directory}/{step}: no input-pipeline state for process {jax.process_index()} of "
            f"{jax.process_count()} ({error}); the run was saved with another number of processes. Resume with the "
            "same number of processes, or set --config.resume_data=False to restart the data order."
        ) from error
    return holder.state


def resolve_groups(groups: Iterable[str] | None) -> tuple[str, ...]:
    """Parameter groups by name; modality names ('image', 'text', 'audio') expand to tower + projection."""
    if groups is None:
        return PARAM_GROUPS
    out: list[str] = []
    for group in groups:
        names = MODALITY_PARAMS.get(group, (group,))
        for name in names:
            if name not in PARAM_GROUPS:
                raise ValueError(f"unknown parameter group {group!r}; known: {list(MODALITY_PARAMS)} + {PARAM_GROUPS}")
            if name not in out:
                out.append(name)
    return tuple(out)


def restore_params(
    workdir: str | Path,
    mesh: Mesh,
    groups: Iterable[str] | None = None,
    *,
    rules: str = "replicate",
    step: int | None = None,
    dtype: str = "float32",
) -> tuple[dict[str, Any], SynergyConfig, dict[str, Any]]:
    """(params, model config, saved config JSON): only the named parameter groups, sharded on `mesh` by `rules`.

    `groups`: e.g. ('image', 'text') or ('audio_model',); None = all parameters. Optimizer state is never read.
    """
    manager = make_manager(workdir, read_only=True)
    step = _latest(manager, step)
    saved = saved_config(manager, step)
    if not all(name in saved.get("model", {}) for name in TOWERS):
        manager.close()
        raise CheckpointError(f"{workdir} is not a pre-training run (its checkpoint has no tower configs): pass the "
                              "workdir of experiments/pretrain.py")  # fmt: skip
    model_config = model_config_from_dict(saved["model"], dtype=dtype)
    model = SynergyCLIP(model_config)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), example_batch(model_config, 1))["params"]
    shardings = parallel.param_shardings(boxed, mesh, rules)
    shapes = nn.unbox(boxed)
    wanted = resolve_groups(groups)
    target = {
        name: jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes[name], shardings[name])
        for name in wanted
    }  # fmt: skip
    restored = _restore_tree(manager, step, {"params": target}, partial=True)
    manager.close()
    return dict(restored["params"]), model_config, saved
