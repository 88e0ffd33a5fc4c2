"""A malloc that keeps XLA:CPU's step buffers between steps, for the jobs' processes.

XLA:CPU allocates each execution's buffers with malloc and frees them when it ends. glibc hands large blocks back
to the kernel on free (it unmaps them, or trims a worker thread's arena), so every step touches its temporaries
(the attention logits and their gradients, the MLP activations, the embedding gradient) through fresh pages, each
a page fault in which the kernel zeroes the page. On two cores this cost the side-by-side step 0.35-1.4 s of
system time a step (docs/performance.md, "Stop 26").

Two remedies, in this order of preference:
- **mimalloc** (the `cmeel-mimalloc` wheel, a requirement on Linux), preloaded with `LD_PRELOAD`, told never to
  return freed memory (`MIMALLOC_PURGE_DELAY=-1`) and to serve large blocks from the memory it keeps
  (`MIMALLOC_ARENA_MAX_OBJECT_SIZE=1TiB`: a block above its default of 2 GiB is mapped afresh on every malloc and
  unmapped on free, and XLA:CPU allocates a step's temporaries as one block, 2.1 GiB for towers of width 512;
  mimalloc 3.4 still maps blocks above about 16 GiB, the size of its largest arena, afresh). After the first
  step nothing is faulted in again: the process keeps the pages of its peak, as a caching allocator does.
- **glibc's huge pages** (glibc 2.35+, tunable `glibc.malloc.hugetlb=1`): malloc asks for transparent huge pages
  on what it maps, so the same bytes fault in 2 MiB at a time. It removes most of the faults on one core, few on
  two (worker threads' arenas). Transparent huge pages must be enabled in the kernel ('madvise' or 'always' in
  /sys/kernel/mm/transparent_hugepage/enabled, the usual defaults).

Precompute's work is different: per clip a few buffers of 0.2-5 MiB (the decoded frame and waveform, the
frames' spectrum), on two threads. There glibc itself does best once told to keep what is freed (`glibc_keep`:
`mmap_threshold` at 32 MiB, the most every glibc accepts, so such blocks come from its heaps instead of fresh
mappings, and `trim_threshold` at 16 GiB, so the heaps are not handed back); it beat both glibc as it comes and
mimalloc there (docs/performance.md, "Stop 28"). Precompute and its benchmark ask for it with
`use_fast_malloc(default="glibc_keep")`.

All of these are read once, when the process starts, so `use_fast_malloc` re-executes the process with them in
its environment (the same command line, the same process id). It does nothing where none applies, when the
environment already holds the choice (so it runs once), and when `SYNERGY_JAX_MALLOC=system`. Child processes
(Grain and precompute workers) inherit the environment.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Mapping

CHOICE = "SYNERGY_JAX_MALLOC"
CHOICES = ("mimalloc", "glibc_keep", "huge_pages", "system")
TUNABLE = "glibc.malloc.hugetlb"
KEEP_TUNABLES = {"glibc.malloc.mmap_threshold": str(32 << 20), "glibc.malloc.trim_threshold": str(16 << 30)}
MIN_GLIBC = {"huge_pages": (2, 35), "glibc_keep": (2, 26)}  # the first glibc with the hugetlb / malloc tunables
PURGE_DELAY = "MIMALLOC_PURGE_DELAY"  # milliseconds before mimalloc returns freed memory; -1: never
ARENA_MAX_OBJECT = "MIMALLOC_ARENA_MAX_OBJECT_SIZE"  # larger blocks bypass mimalloc's arenas (the OS's, each time)
MIMALLOC_SETTINGS = {PURGE_DELAY: "-1", ARENA_MAX_OBJECT: "1TiB"}  # what a restart sets unless the user did
# The variables a restart sets, as the process was started with them (JSON), for `as_shipped`.
STARTED_WITH = "SYNERGY_JAX_MALLOC_STARTED_WITH"
SET_BY_RESTART = ("LD_PRELOAD", "GLIBC_TUNABLES", *MIMALLOC_SETTINGS)


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library on Linux with glibc (the one that reads `GLIBC_TUNABLES`), else None."""
    if sys.platform != "linux":
        return None
    library, version = platform.libc_ver()
    try:
        return tuple(int(part) for part in version.split(".")[:2]) if library == "glibc" else None
    except ValueError:
        return None


def mimalloc_library() -> str | None:
    """The path of the installed mimalloc shared library on Linux, else None (other systems preload differently,
    and a path with a space or colon cannot be preloaded)."""
    if sys.platform != "linux":
        return None
    try:
        files = importlib.metadata.distribution("cmeel-mimalloc").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [file for file in files if file.name.startswith("libmimalloc.so.")]
    shortest = min(found, key=lambda file: len(file.name), default=None)  # libmimalloc.so.3, not .so.3.4
    path = str(shortest.locate()) if shortest is not None else ""
    usable = Path(path).is_file() and " " not in path and ":" not in path  # LD_PRELOAD splits at both
    return path if usable else None


def _tunables(environment: Mapping[str, str]) -> list[str]:
    """The entries of `GLIBC_TUNABLES` ('name=value:name=value'), as written."""
    return [entry for entry in environment.get("GLIBC_TUNABLES", "").split(":") if entry]


def _tunable_value(environment: Mapping[str, str], tunable: str = TUNABLE) -> str | None:
    """The value `GLIBC_TUNABLES` gives `tunable`, or None where it does not name it."""
    values = [value for name, _, value in (entry.partition("=") for entry in _tunables(environment)) if name == tunable]
    return values[-1] if values else None  # glibc applies the last


def _with_tunables(environment: Mapping[str, str], tunables: Mapping[str, str]) -> dict[str, str] | None:
    """`environment` with `tunables` after the user's own in `GLIBC_TUNABLES`, or None where it already names any
    of them (set by a restart or by the user, whose values are kept as written)."""
    if any(_tunable_value(environment, name) is not None for name in tunables):
        return None
    entries = [*_tunables(environment), *(f"{name}={value}" for name, value in tunables.items())]
    return _marked(environment) | {"GLIBC_TUNABLES": ":".join(entries)}


def _preloads_mimalloc(environment: Mapping[str, str]) -> bool:
    """Whether `LD_PRELOAD` (colon- or space-separated, as ld.so reads it) names a mimalloc library."""
    entries = environment.get("LD_PRELOAD", "").replace(" ", ":").split(":")
    return any(Path(entry).name.startswith("libmimalloc") for entry in entries if entry)


def choice(environment: Mapping[str, str], default: str = CHOICES[0]) -> str:
    """`SYNERGY_JAX_MALLOC` (else `default`); a ValueError naming the choices for anything else."""
    value = environment.get(CHOICE, default)
    if value not in CHOICES:
        raise ValueError(f"{CHOICE}={value!r}: must be one of {', '.join(CHOICES)}")
    return value


def environment_with_fast_malloc(environment: Mapping[str, str], mimalloc: str | None,
                                 glibc: tuple[int, int] | None = MIN_GLIBC["huge_pages"],
                                 default: str = CHOICES[0]) -> dict[str, str] | None:  # fmt: skip
    """`environment` with the chosen malloc set up, or None when the process needs no restart: opted out, nothing
    applies, or the environment already holds it (set by a restart or by the user; theirs is kept as written).
    `mimalloc` is the library's path (None: not installed), and without it the choice falls back to huge pages;
    `glibc` is the C library's version (None: not glibc), which must read the tunables a choice sets."""
    wanted = choice(environment, default)
    if wanted == "mimalloc" and mimalloc is not None:
        if _preloads_mimalloc(environment):
            return None
        preload = ":".join(filter(None, [mimalloc, environment.get("LD_PRELOAD", "")]))
        settings = {name: environment.get(name, value) for name, value in MIMALLOC_SETTINGS.items()}
        return _marked(environment) | settings | {"LD_PRELOAD": preload}
    wanted = "huge_pages" if wanted == "mimalloc" else wanted
    if wanted == "system" or glibc is None or glibc < MIN_GLIBC[wanted] or _preloads_mimalloc(environment):
        return None  # (a process already on mimalloc, preloaded by the user or inherited from a job, keeps it)
    return _with_tunables(environment, KEEP_TUNABLES if wanted == "glibc_keep" else {TUNABLE: "1"})


def _marked(environment: Mapping[str, str]) -> dict[str, str]:
    """`environment` with what it holds of SET_BY_RESTART recorded under STARTED_WITH (kept if already there)."""
    started_with = {name: environment.get(name) for name in SET_BY_RESTART}
    return {STARTED_WITH: json.dumps(started_with), **environment}


def as_shipped(environment: Mapping[str, str]) -> dict[str, str]:
    """`environment` as the process was started, before any restart changed its malloc: for timing another program
    (the reference's input path) as it runs when users start it."""
    if STARTED_WITH not in environment:
        return dict(environment)
    started_with = json.loads(environment[STARTED_WITH])
    shipped = {name: value for name, value in environment.items() if name not in (STARTED_WITH, *SET_BY_RESTART)}
    return shipped | {name: value for name, value in started_with.items() if value is not None}


def describe() -> str:
    """How this process's malloc keeps large buffers, for benchmark reports (from what is loaded, not asked for)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    return description(os.environ, "libmimalloc" in maps, glibc_version())


def description(environment: Mapping[str, str], mimalloc_loaded: bool, glibc: tuple[int, int] | None) -> str:
    """`describe` for a process with this environment, mimalloc loaded or not, and this glibc (None: another C
    library): every setting that is in effect."""
    if mimalloc_loaded:
        settings = ", ".join(f"{name}={environment.get(name, 'its default')}" for name in MIMALLOC_SETTINGS)
        return f"mimalloc, preloaded ({settings})"
    ways = []
    keeps = all(_tunable_value(environment, name) == value for name, value in KEEP_TUNABLES.items())
    if glibc is not None and glibc >= MIN_GLIBC["glibc_keep"] and keeps:
        ways.append("keeping freed memory (" + ", ".join(map("=".join, KEEP_TUNABLES.items())) + ")")
    if glibc is not None and glibc >= MIN_GLIBC["huge_pages"] and _tunable_value(environment) == "1":
        ways.append(f"transparent huge pages ({TUNABLE}=1)")
    return "glibc malloc, " + "; ".join(ways) if ways else "the system's malloc, as it comes"


def use_fast_malloc(default: str = CHOICES[0]) -> None:
    """Re-execute this process with the fast malloc (see the module docstring): `default` unless
    `SYNERGY_JAX_MALLOC` chooses; returns only when no re-execution is needed or possible. Call it first in a
    job's `__main__`, before any work. A bad `SYNERGY_JAX_MALLOC` exits 2 with one line, as the jobs' other bad
    settings do."""
    try:
        environment = environment_with_fast_malloc(os.environ, mimalloc_library(), glibc_version(), default)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), environment)
    except OSError as error:  # no executable to re-run (an embedded interpreter): run on without
        print(f"warning: could not restart with a faster malloc ({error}); running on without", file=sys.stderr)
