"""Orbax checkpoints of a pre-training run, and partial restore for the jobs that consume them.

Layout under a run's workdir:

    <workdir>/checkpoints/<step>/state/    TrainState (params, opt_state, step, rng), sharded arrays (Orbax PyTree)
                                 data/     the Grain iterator state of every process (process_<i>-of-<n>.json)
                                 config/   JSON: the resolved run config, the model config (tower configs in
                                           Hugging Face form, projection, temperatures) and run facts

                                 integrity.json  the size and sha256 of every file above (the seal)

Saving is asynchronous (arrays are copied to host, then written in a background thread); `wait_until_finished()`
before exit. Restoring takes the target shardings, so a checkpoint written on one mesh restores onto any other.
`restore_params` restores only the parameters (or only some towers) and rebuilds the model config from the JSON,
so evaluation jobs need nothing but the workdir.

Integrity: Orbax's save thread seals each checkpoint (`integrity.json`) after every file is written and before the
step folder gets its final name, so a checkpoint that has a name has a seal. Every restore checks the seal first
(`verify`): a missing, truncated or changed file, an added one, a missing commit marker or a missing seal makes the
checkpoint damaged. Readers use the newest checkpoint that verifies (or refuse the one asked for); a resuming writer
moves damaged ones newer than that to `<workdir>/damaged_checkpoints/` (so their steps can be saved again) and says
so. With none left, the job exits 2 saying what to move away.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from synergy_jax import parallel
from synergy_jax.distributed import is_main_process, log
from synergy_jax.errors import CheckpointError
from synergy_jax.models import param_groups
from synergy_jax.models.synergy import SynergyCLIP, example_batch
from synergy_jax.record import RunRecord

STATE, DATA, CONFIG = "state", "data", "config"
CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "damaged_checkpoints"
SEAL = "integrity.json"
# Orbax's commit markers of a step folder, written after the seal (the step metadata gets its commit time, the
# success file is the last write): they must be there and the metadata must parse, but their bytes are not sealed.
STEP_METADATA, COMMIT_MARKER = "_CHECKPOINT_METADATA", "commit_success.txt"
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
) -> SealingManager:
    """CheckpointManager for a run: saves at multiples of `save_every` (and when forced), keeps the last `keep`,
    seals every checkpoint it writes. `async_save=False` makes `save` wait until the checkpoint is on disk."""
    import grain

    handlers = {
        STATE: ocp.PyTreeCheckpointHandler(),
        DATA: grain.checkpoint.CheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
    }
    directory = checkpoint_dir(workdir)
    sealer = _Sealer(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=0 if read_only else max(1, save_every),
        max_to_keep=None if read_only else keep,
        # Always Orbax's asynchronous checkpointer: only it runs the sealing callback; `save` waits when asked to.
        enable_async_checkpointing=True,
        async_options=None if read_only else ocp.options.AsyncOptions(post_finalization_callback=sealer),
        read_only=read_only,
        create=not read_only,
    )
    # Orbax warns 'Given directory is read only' on every read-only open.
    with _absl_logging_at(logging.ERROR) if read_only else contextlib.nullcontext():
        return SealingManager(directory, item_handlers=handlers, options=options, sealer=sealer, wait=not async_save)


class SealingManager(ocp.CheckpointManager):
    """Orbax's CheckpointManager plus what `save` needs to seal: the sealer (told each save's step) and whether a
    save waits for its checkpoint."""

    def __init__(self, *args, sealer: _Sealer, wait: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.sealer, self.wait = sealer, wait


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
    manager: SealingManager,
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
    manager.wait_until_finished()  # the seal of the previous save names its step
    manager.sealer.step = step
    started = manager.save(step, args=ocp.args.Composite(**items), force=force)
    if started and manager.wait:
        manager.wait_until_finished()
    return started


# ------------------------------------------------------------------------------------------ integrity


class _Sealer:
    """Orbax's post-finalization callback: writes the seal of the checkpoint being committed.

    It runs on the primary process in Orbax's save thread after every process has written its files and Orbax has
    finalised them, and before the temporary folder is renamed to the step, so the rename commits files and seal
    together. (On filesystems where Orbax writes in place and marks success with a file instead, the folder already
    has its final name.)
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.step: int | None = None

    def __call__(self) -> None:
        temporary = self.directory / f"{self.step}{ocp.path.atomicity_types.TMP_DIR_SUFFIX}"
        write_seal(temporary if temporary.is_dir() else self.directory / str(self.step))


def _sealed_files(folder: Path) -> list[Path]:
    unsealed = {folder / SEAL, folder / STEP_METADATA, folder / COMMIT_MARKER}
    return sorted(p for p in folder.rglob("*") if p.is_file() and p not in unsealed)


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_seal(folder: Path) -> None:
    """Records the size and sha256 of every file of a written checkpoint folder in its `integrity.json`."""
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _sealed_files(folder)}
    partial = folder / f"{SEAL}.tmp"
    partial.write_text(json.dumps({"format": 1, "files": files}, indent=0))
    partial.replace(folder / SEAL)


def verify(folder: str | Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (missing or unreadable seal, a sealed file missing, cut, changed,
    an unsealed file added, the commit marker missing or unreadable), or None when it verifies."""
    folder = Path(folder)
    try:
        sealed = json.loads((folder / SEAL).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {SEAL} seal: its save did not finish, or it was written before checkpoints were sealed"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {SEAL} seal is unreadable ({type(error).__name__}: {error})"
    try:
        json.loads((folder / STEP_METADATA).read_text())
    except (OSError, ValueError) as error:
        return f"its commit marker {STEP_METADATA} is missing or unreadable ({type(error).__name__})"
    if not (folder / COMMIT_MARKER).is_file():
        return f"its commit marker {COMMIT_MARKER} is missing"
    present = {str(p.relative_to(folder)) for p in _sealed_files(folder)}
    if missing := sorted(set(sealed) - present):
        return f"{len(missing)} sealed file(s) are missing: {', '.join(missing[:3])}"
    if extra := sorted(present - set(sealed)):
        return f"{len(extra)} file(s) are not in its seal: {', '.join(extra[:3])}"
    for name, expected in sealed.items():
        path = folder / name
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} were written"
        if _sha256(path) != expected["sha256"]:
            return f"{name} has changed since it was written (sha256 differs)"
    return None


_VERIFIED: dict[Path, tuple[Any, str | None]] = {}


def _verify_once(folder: Path) -> str | None:
    """`verify`, remembered for this process while the folder's seal is the same file (a job asks several times)."""
    try:
        key = (folder / SEAL).stat()
        key = (key.st_ino, key.st_mtime_ns, key.st_size)
    except OSError:
        key = None
    if folder in _VERIFIED and key is not None and _VERIFIED[folder][0] == key:
        return _VERIFIED[folder][1]
    reason = verify(folder)
    _VERIFIED[folder] = (key, reason)
    return reason


def _damage_report(directory: Path, damaged: list[tuple[int, str]]) -> str:
    return " ".join(f"Checkpoint {directory / str(step)} is damaged: {reason}." for step, reason in damaged)


def _trusted(manager: ocp.CheckpointManager) -> tuple[int | None, list[tuple[int, str]]]:
    """(the newest step that verifies or None, [(step, reason)] of the damaged ones newer than it)."""
    directory, damaged = Path(manager.directory), []
    manager.reload()  # another process (the writer) may have saved or removed checkpoints since this manager opened
    for step in sorted(manager.all_steps(), reverse=True):
        reason = _verify_once(directory / str(step))
        if reason is None:
            return step, damaged
        damaged.append((step, reason))
    return None, damaged


def _no_trusted_checkpoint(manager: ocp.CheckpointManager, damaged: list[tuple[int, str]]) -> CheckpointError:
    directory = Path(manager.directory)
    if not damaged:
        return CheckpointError(
            f"no checkpoint in {directory}: train one with `python experiments/pretrain.py` (it writes "
            "runs/<config name>, runs/demo by default, under the working directory) or pass its run folder"
        )
    return CheckpointError(
        f"{_damage_report(directory, damaged)} No checkpoint of {directory.parent} is left that verifies. Move the "
        f"damaged step folder(s) out of {directory} (or the whole folder, to start that run again from step 0), or "
        "pass another run folder."
    )


def _latest(manager: ocp.CheckpointManager, step: int | None) -> int:
    """`step` if it verifies (else a CheckpointError saying why), or the newest step that verifies (saying which it
    passed over)."""
    directory = Path(manager.directory)
    if step is not None:
        manager.reload()
        if step not in manager.all_steps():
            raise CheckpointError(f"no checkpoint at step {step} in {directory} (steps: {list(manager.all_steps())})")
        if reason := _verify_once(directory / str(step)):
            raise CheckpointError(f"{_damage_report(directory, [(step, reason)])} Pick another step "
                                  f"({[s for s in manager.all_steps() if s != step]}) or another run.")  # fmt: skip
        return step
    trusted, damaged = _trusted(manager)
    if trusted is None:
        raise _no_trusted_checkpoint(manager, damaged)
    if damaged:
        log(f"warning: {_damage_report(directory, damaged)} Using step {trusted}, the newest that verifies.")
    return trusted


def resume_step(manager: ocp.CheckpointManager) -> int | None:
    """For the run's writer: the newest step that verifies, or None for a run folder without checkpoints.

    Damaged checkpoints newer than it are moved to `<workdir>/damaged_checkpoints/` (their steps will be saved
    again), saying so; a folder whose checkpoints are all damaged is a CheckpointError (exit 2) naming them.
    """
    trusted, damaged = _trusted(manager)
    if trusted is None and damaged:
        raise _no_trusted_checkpoint(manager, damaged)
    if damaged and is_main_process():
        directory = Path(manager.directory)
        aside = directory.parent / DAMAGED_SUBDIR
        aside.mkdir(exist_ok=True)
        for step, _ in damaged:
            target = aside / str(step)
            target = target if not target.exists() else aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            shutil.move(str(directory / str(step)), str(target))
        log(f"warning: {_damage_report(directory, damaged)} Resuming from step {trusted}, the newest that verifies; "
            f"the damaged one(s) were moved to {aside}.")  # fmt: skip
    if damaged:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("synergy_jax: damaged checkpoints moved aside")
        manager.reload()
    return trusted


def latest_step(workdir: str | Path, step: int | None = None) -> int:
    """`step` if the run has it and it verifies, else its newest step that verifies; a CheckpointError that says what
    to do when there is none."""
    manager = make_manager(workdir, read_only=True)
    try:
        return _latest(manager, step)
    finally:
        manager.close()


def saved_record(manager: ocp.CheckpointManager, step: int | None = None) -> RunRecord:
    """The run record of a checkpoint (default: the newest that verifies)."""
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
    """This process's Grain iterator state at `step` (a verified checkpoint: a missing file means another process
    count wrote it)."""
    import grain

    holder = _DataState()
    try:
        manager.restore(step, args=ocp.args.Composite(**{DATA: grain.checkpoint.CheckpointRestore(holder)}))
    except (ValueError, FileNotFoundError) as error:
        saved = sorted(p.name for p in (Path(manager.directory) / str(step) / DATA).glob("process_*.json"))
        raise CheckpointError(
            f"{manager.directory}/{step}: no input-pipeline state for process {jax.process_index()} of "
            f"{jax.process_count()}; it holds {saved or 'none'}, so another number of processes wrote it. Resume "
            "with that number of processes, or set --config.resume_data=False to restart the data order."
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
