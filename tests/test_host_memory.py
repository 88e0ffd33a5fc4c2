"""The jobs' restart with malloc on transparent huge pages (synergy_jax/host_memory.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synergy_jax import host_memory

ROOT = Path(__file__).resolve().parents[1]
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# Restarts itself, then maps and touches 64 MiB through malloc ten times (what XLA:CPU does with a step's
# temporaries) and prints its process id, the tunables, its arguments and the page faults that took.
PROBE = """
import ctypes, json, os, resource, sys
from synergy_jax import host_memory
print("started", flush=True)
host_memory.use_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    buffer = libc.malloc(64 << 20)
    ctypes.memset(buffer, 1, 64 << 20)
    libc.free(buffer)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:],
                  "module": __spec__.name if __spec__ else None, "faults": faults,
                  "described": host_memory.describe()}))
"""


def test_the_tunable_joins_the_users_own_and_is_added_once():
    assert host_memory.environment_with_huge_pages({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    mine = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert host_memory.environment_with_huge_pages(mine)["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    # Already set, by a restart or by the user (to any value), or opted out: nothing to change, no restart.
    assert host_memory.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is None
    assert host_memory.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:x=1"}) is None
    assert host_memory.environment_with_huge_pages({"SYNERGY_JAX_HUGE_PAGES": "0"}) is None


def _run_probe(tmp_path: Path, **environment: str) -> tuple[list[str], dict, int]:
    """The probe's lines before its report, its report, and its process id."""
    (tmp_path / "probe.py").write_text(PROBE)
    env = {key: value for key, value in os.environ.items() if key not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    env.update(environment, PYTHONPATH=str(ROOT))
    process = subprocess.Popen([sys.executable, "-m", "probe", "first", "--second=2"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    *lines, report = out.splitlines()
    return lines, json.loads(report), process.pid


@pytest.mark.skipif(not host_memory.glibc_supports_tunable(), reason="needs Linux with glibc 2.35+")
def test_a_job_restarts_once_as_the_same_command_and_process(tmp_path):
    lines, report, pid = _run_probe(tmp_path)
    assert lines == ["started", "started"]  # the code before the restart ran twice, the rest once
    assert report["pid"] == pid
    assert report["tunables"] == "glibc.malloc.hugetlb=1"
    assert report["described"].startswith("transparent huge pages")
    assert report["argv"] == ["first", "--second=2"] and report["module"] == "probe"  # `python -m probe ...` again
    lines, report, _ = _run_probe(tmp_path, SYNERGY_JAX_HUGE_PAGES="0")
    assert lines == ["started"] and report["tunables"] is None
    assert report["described"].startswith("4 KiB pages")


@pytest.mark.skipif(not host_memory.glibc_supports_tunable() or not THP_SETTING.exists()
                    or "[never]" in THP_SETTING.read_text(), reason="needs glibc 2.35+ and transparent huge pages")  # fmt: skip
def test_after_the_restart_large_buffers_fault_in_huge_pages(tmp_path):
    huge_faults = _run_probe(tmp_path)[1]["faults"]
    small_faults = _run_probe(tmp_path, SYNERGY_JAX_HUGE_PAGES="0")[1]["faults"]
    assert small_faults > 100_000  # 640 MiB in 4 KiB pages
    assert huge_faults < small_faults / 4, (huge_faults, small_faults)
