"""The project's error types, one per concern, and the exit code each maps to in the jobs (docs/pretrain.md).

- `SetupError`: bad flags, config values, data or files found before or while setting a job up -> exit 2.
- `CheckpointError`: a checkpoint (Orbax run or Hugging Face folder) that is missing, unreadable or incompatible
  with the model being restored -> exit 2. A setup error too.
- `Preempted`: SIGTERM arrived outside the training loop (which saves and stops by itself), e.g. while the data is
  prepared; what was finished is kept -> exit 0, rerun to continue.
- `NonFiniteLossError`: training produced a non-finite loss, gradient or parameter; the update was not applied and
  the last good checkpoint is kept -> exit 1.

Both setup kinds subclass ValueError, so code that validates arguments in the usual Python way stays compatible.
"""

from __future__ import annotations


class SetupError(ValueError):
    """A job cannot start (or go on) because of its configuration, its data or its files."""


class CheckpointError(SetupError):
    """A checkpoint that is missing, unreadable, or written by an incompatible config."""


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss, gradient or parameter; the jobs stop instead of applying it."""


class Preempted(Exception):
    """SIGTERM outside the training loop: the job stops where it is; its finished work (shards, checkpoints) is
    kept and a rerun continues from it."""
