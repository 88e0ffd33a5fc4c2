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

from synergy_jax import parallel
from synergy_jax.errors import CheckpointError
from synergy_jax.models import param_groups
from synergy_jax.models.synergy import SynergyCLIP, example_batch
from synergy_jax.record import RunRecord

STATE, DATA, CONFIG = "state", "data", "config"
CHECKPOINT_SUBDIR = "checkpoints"
LOGIT_SCALES = ("logit_scale_it", "logit_scale_ta", "logit_scale_ai")


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
    state: Any,
    record: RunRecord,
    data_state: Mapping[str, Any] | None = None,
    force: bool = False,
) -> bool:
    """Saves (asynchronously) if `step` is due or `force`; returns whether a save started."""
    import grain

    items = {STATE: ocp.args.PyTreeSave(state), CONFIG: ocp.args.JsonSave(record.to_json())}
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


def saved_record(manager: ocp.CheckpointManager, step: int | None = None) -> RunRecord:
    """The run record of a checkpoint (default: the latest)."""
    step = _latest(manager, step)
    saved = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
    return RunRecord.from_json(saved, f"{manager.directory}/{step}")


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


def restore_train_state(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
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
    known = tuple(name for m in ("image", "text", "audio") for name in param_groups(m)) + LOGIT_SCALES
    if groups is None:
        return known
    out: list[str] = []
    for group in groups:
        names = param_groups(group) if group in ("image", "text", "audio") else (group,)
        for name in names:
            if name not in known:
                raise ValueError(f"unknown parameter group {group!r}; known: image, text, audio + {known}")
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
) -> tuple[dict[str, Any], RunRecord]:
    """(params, run record) of a pre-training run: only the named parameter groups, sharded on `mesh` by `rules`.

    `groups`: e.g. ('image', 'text') or ('audio_model',); None = all parameters. Optimizer state is never read.
    """
    manager = make_manager(workdir, read_only=True)
    try:
        step = _latest(manager, step)
        record = saved_record(manager, step)
        model_config = record.synergy_config(dtype=dtype)
        model = SynergyCLIP(model_config)
        boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), example_batch(model_config, 1))["params"]
        shardings = parallel.param_shardings(boxed, mesh, rules)
        shapes = nn.unbox(boxed)
        target = {
            name: jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes[name],
                               shardings[name])  # fmt: skip
            for name in resolve_groups(groups)
        }
        restored = _restore_tree(manager, step, {"params": target}, partial=True)
    finally:
        manager.close()
    return dict(restored["params"]), record
