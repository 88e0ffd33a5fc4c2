"""XLA:CPU's step buffers on transparent huge pages, for the jobs' processes.

XLA:CPU allocates each execution's buffers with malloc and frees them when it ends. glibc serves large allocations
(over 32 MiB, and large ones in worker threads' arenas) with a fresh mmap and unmaps it on free, so every step
touches its temporaries (the attention logits and their gradients, the MLP activations, the embedding gradient)
through new 4 KiB pages, each a page fault in which the kernel zeroes the page. glibc 2.35+ has a tunable,
`glibc.malloc.hugetlb=1`, with which malloc asks for transparent huge pages on the memory it maps
(`madvise(MADV_HUGEPAGE)`): the same bytes come in 2 MiB pages, a fault per 512 of the small ones. The page faults
and the step times with and without are in docs/performance.md.

glibc reads tunables once, when the process starts, so `use_huge_pages` re-executes the process with the tunable
added to `GLIBC_TUNABLES` (the same command line, the same process id). It does nothing where it has no effect
(not Linux or not glibc 2.35+), when the tunable is already set (so it runs once), and when
`SYNERGY_JAX_HUGE_PAGES=0` opts out. Child processes (Grain and precompute workers) inherit the environment.
Transparent huge pages must be enabled in the kernel ('madvise' or 'always' in
/sys/kernel/mm/transparent_hugepage/enabled, the usual defaults); with 'never' the tunable changes nothing.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "SYNERGY_JAX_HUGE_PAGES"
MIN_GLIBC = (2, 35)  # the first glibc with the hugetlb tunable


def glibc_supports_tunable() -> bool:
    """Linux with glibc 2.35 or newer (the C library that reads `GLIBC_TUNABLES`)."""
    if sys.platform != "linux":
        return False
    library, version = platform.libc_ver()
    try:
        return library == "glibc" and tuple(int(part) for part in version.split(".")[:2]) >= MIN_GLIBC
    except ValueError:
        return False


def _tunables(environment: Mapping[str, str]) -> list[str]:
    """The entries of `GLIBC_TUNABLES` ('name=value:name=value'), as written."""
    return [entry for entry in environment.get("GLIBC_TUNABLES", "").split(":") if entry]


def _tunable_value(environment: Mapping[str, str]) -> str | None:
    """The value `GLIBC_TUNABLES` gives the huge-page tunable, or None where it does not name it."""
    values = [value for name, _, value in (entry.partition("=") for entry in _tunables(environment)) if name == TUNABLE]
    return values[0] if values else None


def environment_with_huge_pages(environment: Mapping[str, str]) -> dict[str, str] | None:
    """`environment` with the tunable added to `GLIBC_TUNABLES` (kept beside any others there), or None when the
    process needs no change: opted out, or the tunable is already set (by us or by the user, to any value)."""
    if environment.get(OPT_OUT, "1") == "0" or _tunable_value(environment) is not None:
        return None
    return {**environment, "GLIBC_TUNABLES": ":".join([*_tunables(environment), f"{TUNABLE}=1"])}


def describe() -> str:
    """How this process's malloc maps large buffers, for benchmark reports."""
    on = glibc_supports_tunable() and _tunable_value(os.environ) == "1"
    return f"transparent huge pages ({TUNABLE}=1)" if on else f"4 KiB pages ({TUNABLE} not set)"


def use_huge_pages() -> None:
    """Re-execute this process with malloc on transparent huge pages (see the module docstring); returns only when
    no re-execution is needed or possible. Call it first in a job's `__main__`, before any work."""
    environment = environment_with_huge_pages(os.environ)
    if environment is None or not glibc_supports_tunable():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), environment)
    except OSError as error:  # no executable to re-run (an embedded interpreter): run on with 4 KiB pages
        print(f"warning: could not restart with huge pages ({error}); running on without", file=sys.stderr)
