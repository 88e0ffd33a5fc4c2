"""One writer per run folder: the lock a training job holds on its workdir while it runs.

Two jobs writing one run folder race on its data preparation, its checkpoints and its logs. So every job that writes
a run folder (pre-training, MMR, fine-tuning) takes `<workdir>/writer.lock` before it creates anything there, and a
second one exits 2 at once naming the holder. Jobs that only read a run (zero-shot, MMR and fine-tuning reading a
pre-training run) take no lock and may run beside its writer.

The lock is an exclusive `flock` on the file, so the kernel releases it when the holder dies, even on `kill -9`; the
file records the holder (pid, host, start time, command) for the message. A lock left by a crashed job is stale and
is taken over, saying so. Where `flock` is not shared between hosts (some network filesystems), a record naming
another host that never released it is trusted and refused: delete the file once that job is surely gone. The file is
emptied on release, not deleted (a job that had opened it would hold a lock on a deleted file), except with the
folder it created when the job wrote nothing else there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from synergy_jax.distributed import log
from synergy_jax.errors import SetupError

LOCK_FILE = "writer.lock"


def _holder_text(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')} "
            f"({holder.get('command', '?')})")  # fmt: skip


def _read_holder(file) -> dict:
    file.seek(0)
    try:
        return json.loads(file.read() or "{}")
    except ValueError:
        return {}


def _alive_here(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """The exclusive writer lock of one run folder (`with RunLock(workdir): ...`); creates the folder."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.file = None
        self.created: list[Path] = []  # the folders `acquire` made, the run folder first, then its new parents

    def acquire(self) -> None:
        self.created = [p for p in (self.workdir, *self.workdir.absolute().parents) if not p.exists()]
        self.workdir.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live process (this host, or any host where flock is shared)
            holder = _read_holder(file)
            file.close()
            raise SetupError(self._in_use(holder)) from None
        previous = _read_holder(file)
        if previous and self._still_held(previous):
            fcntl.flock(file, fcntl.LOCK_UN)
            file.close()
            raise SetupError(self._in_use(previous))
        if previous:
            log(f"{self.path}: taking over the lock of {_holder_text(previous)}, which ended without releasing it")
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))  # fmt: skip
        file.flush()
        self.file = file

    @staticmethod
    def _still_held(holder: dict) -> bool:
        """A record left in an unlocked file: its job crashed, unless it runs on another host (flock may not reach
        across hosts) or is alive here (flock unsupported by this filesystem)."""
        if holder.get("host") != socket.gethostname():
            return True
        return isinstance(holder.get("pid"), int) and holder["pid"] != os.getpid() and _alive_here(holder["pid"])

    def _in_use(self, holder: dict) -> str:
        who = _holder_text(holder) if holder else "another process"
        return (f"{self.workdir} is in use: {who} is writing it ({self.path}). One job writes a run folder at a time; "
                "wait for it, stop it, or pass another --workdir. If that job is no longer running (e.g. it ran on "
                f"another host that crashed), delete {self.path}.")  # fmt: skip

    def release(self) -> None:
        if self.file is None:
            return
        self.file.seek(0)
        self.file.truncate()
        self.file.flush()
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        self.file = None
        if self.created and [p.name for p in self.workdir.iterdir()] == [LOCK_FILE]:
            # A job that failed before writing anything leaves no empty run folder (or parents it made) behind.
            self.path.unlink()
            for folder in self.created:
                try:
                    folder.rmdir()  # refused while the folder holds anything (another job's folder, say)
                except OSError:
                    break

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def writing(workdir: str | Path) -> Iterator[None]:
    """Holds the run folder's writer lock on process 0 for the block (the other processes of a multi-process job
    write under its lock); if process 0 cannot take it, every process raises."""
    from synergy_jax import distributed

    lock = RunLock(workdir)
    distributed.on_main_process(f"lock {workdir}", lock.acquire)
    try:
        yield
    finally:
        lock.release()
