"""The jobs' restart with a malloc that keeps large buffers (synergy_jax/host_memory.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import glibc_reads_every_tunable
from synergy_jax import host_memory

ROOT = Path(__file__).resolve().parents[1]
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MIMALLOC = host_memory.mimalloc_library()
TUNABLE = "glibc.malloc.hugetlb=1"
KEEP = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184"

# Restarts itself (asking for PROBE_DEFAULT unless SYNERGY_JAX_MALLOC chooses), then PROBE_ROUNDS (10) times
# allocates, touches and frees the blocks PROBE_BLOCKS_MIB lists through malloc, all live at once (default one of
# 64 MiB: what XLA:CPU does with a step's temporaries; a precomputed clip's buffers are a few of 0.2-5 MiB), and
# prints its process id, its malloc settings, its arguments and the page faults of each round.
PROBE = """
import ctypes, json, os, resource, sys
from synergy_jax import host_memory
print("started", flush=True)
host_memory.use_fast_malloc(os.environ.get("PROBE_DEFAULT", "mimalloc"))
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
sizes = [int(mib) << 20 for mib in os.environ.get("PROBE_BLOCKS_MIB", "64").split(",")]
faults = []
for _ in range(int(os.environ.get("PROBE_ROUNDS", "10"))):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [libc.malloc(size) for size in sizes]
    for buffer, size in zip(buffers, sizes):
        ctypes.memset(buffer, 1, size)
    for buffer in buffers:
        libc.free(buffer)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:],
                  "preload": os.environ.get("LD_PRELOAD"), "purge": os.environ.get("MIMALLOC_PURGE_DELAY"),
                  "arena_max": os.environ.get("MIMALLOC_ARENA_MAX_OBJECT_SIZE"),
                  "mapped": "libmimalloc" in open("/proc/self/maps").read(),
                  "module": __spec__.name if __spec__ else None, "faults": faults,
                  "described": host_memory.describe()}))
"""


def _restarted(environment: dict, **settings) -> dict | None:
    """The restart's environment, less its record of how the process started (`as_shipped` reads that)."""
    restart = host_memory.environment_with_fast_malloc(environment, **settings)
    return None if restart is None else {k: v for k, v in restart.items() if k != host_memory.STARTED_WITH}


def test_mimalloc_is_preloaded_before_the_users_libraries_and_only_once():
    restart = _restarted({"A": "1"}, mimalloc="/lib/libmimalloc.so.3")
    assert restart == {"A": "1", "LD_PRELOAD": "/lib/libmimalloc.so.3", "MIMALLOC_PURGE_DELAY": "-1",
                       "MIMALLOC_ARENA_MAX_OBJECT_SIZE": "1TiB"}
    mine = {"LD_PRELOAD": "/x/libfoo.so", "MIMALLOC_PURGE_DELAY": "500",  # the user's settings are kept
            "MIMALLOC_ARENA_MAX_OBJECT_SIZE": "4GiB"}
    assert _restarted(mine, mimalloc="/lib/libmimalloc.so.3") == {
        "LD_PRELOAD": "/lib/libmimalloc.so.3:/x/libfoo.so", "MIMALLOC_PURGE_DELAY": "500",
        "MIMALLOC_ARENA_MAX_OBJECT_SIZE": "4GiB"}
    for preloaded in ("/lib/libmimalloc.so.3", "/x/libfoo.so /y/libmimalloc.so"):  # a restart's, or the user's own
        assert _restarted({"LD_PRELOAD": preloaded}, mimalloc="/lib/libmimalloc.so.3") is None


def test_huge_pages_are_the_fallback_and_join_the_users_tunables():
    assert _restarted({"A": "1"}, mimalloc=None) == {"A": "1", "GLIBC_TUNABLES": TUNABLE}
    chosen = {host_memory.CHOICE: "huge_pages", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert _restarted(chosen, mimalloc="/lib/libmimalloc.so.3")["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:" + TUNABLE)
    # Already set (to any value), not supported by this C library, or opted out: nothing to change, no restart.
    assert _restarted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:x=1"}, mimalloc=None) is None
    for glibc in (None, (2, 34)):
        assert _restarted({}, mimalloc=None, glibc=glibc) is None
    assert _restarted({host_memory.CHOICE: "system"}, mimalloc="/lib/libmimalloc.so.3") is None


def test_glibc_keep_is_a_jobs_default_that_the_user_can_override_and_joins_their_tunables():
    keep = _restarted({"GLIBC_TUNABLES": "x=1"}, mimalloc="/lib/libmimalloc.so.3", default="glibc_keep")
    assert keep == {"GLIBC_TUNABLES": f"x=1:{KEEP}"}
    assert _restarted({"GLIBC_TUNABLES": f"x=1:{KEEP}"}, mimalloc=None, default="glibc_keep") is None
    assert _restarted({}, mimalloc=None, glibc=(2, 26), default="glibc_keep") == {"GLIBC_TUNABLES": KEEP}
    # the user's own trim threshold or preloaded mimalloc is theirs; a glibc without the tunables: no restart
    for mine in ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, {"LD_PRELOAD": "/x/libmimalloc.so.2"}):
        assert _restarted(mine, mimalloc=None, default="glibc_keep") is None
    for glibc in (None, (2, 25)):
        assert _restarted({}, mimalloc=None, glibc=glibc, default="glibc_keep") is None
    chosen = {host_memory.CHOICE: "mimalloc"}
    assert "LD_PRELOAD" in _restarted(chosen, mimalloc="/lib/libmimalloc.so.3", default="glibc_keep")


def test_as_shipped_is_the_environment_the_process_started_with():
    """What a restart set (and what it found: the user's own tunables, preload and delay) is undone exactly, for
    timing the reference as its users run it; without a restart the environment is as it is."""
    started = {"A": "1", "GLIBC_TUNABLES": "x=1", "LD_PRELOAD": "/x/libfoo.so"}
    for settings in (dict(mimalloc="/lib/libmimalloc.so.3"), dict(mimalloc=None),
                     dict(mimalloc=None, default="glibc_keep")):  # fmt: skip
        restart = host_memory.environment_with_fast_malloc(started, **settings)
        assert restart != started and host_memory.as_shipped(restart) == started, settings
        assert host_memory.environment_with_fast_malloc(restart, **settings) is None  # restarted once
    # a second restart (a job started by a restarted precompute) keeps the first record
    keep = host_memory.environment_with_fast_malloc(started, mimalloc=None, default="glibc_keep")
    both = host_memory.environment_with_fast_malloc(keep, mimalloc="/lib/libmimalloc.so.3")
    assert both["LD_PRELOAD"].startswith("/lib/libmimalloc.so.3") and host_memory.as_shipped(both) == started
    assert host_memory.as_shipped({"GLIBC_TUNABLES": KEEP}) == {"GLIBC_TUNABLES": KEEP}  # the user's own


def test_the_description_names_every_setting_in_effect_reading_the_last_entry_of_a_tunable():
    both = {"GLIBC_TUNABLES": f"glibc.malloc.hugetlb=0:{KEEP}:glibc.malloc.hugetlb=1"}
    assert host_memory.description(both, False, (2, 36)) == (
        "glibc malloc, keeping freed memory (glibc.malloc.mmap_threshold=33554432, "
        "glibc.malloc.trim_threshold=17179869184); transparent huge pages (glibc.malloc.hugetlb=1)")
    assert host_memory.description(both, False, (2, 30)).startswith("glibc malloc, keeping freed memory")
    assert host_memory.description(both, False, None) == "the system's malloc, as it comes"
    off = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.hugetlb=0"}
    assert host_memory.description(off, False, (2, 36)) == "the system's malloc, as it comes"
    assert host_memory.description(both, True, (2, 36)) == (
        "mimalloc, preloaded (MIMALLOC_PURGE_DELAY=its default, MIMALLOC_ARENA_MAX_OBJECT_SIZE=its default)")


def test_a_bad_choice_names_the_good_ones():
    with pytest.raises(ValueError, match="SYNERGY_JAX_MALLOC='tcmalloc': must be one of mimalloc, glibc_keep, "
                                         "huge_pages, system"):  # fmt: skip
        host_memory.environment_with_fast_malloc({host_memory.CHOICE: "tcmalloc"}, None)


def _run_probe(tmp_path: Path, **environment: str) -> subprocess.CompletedProcess:
    (tmp_path / "probe.py").write_text(PROBE)
    env = {key: value for key, value in os.environ.items()
           if key not in ("GLIBC_TUNABLES", "LD_PRELOAD", *host_memory.MIMALLOC_SETTINGS, host_memory.CHOICE,
                          host_memory.STARTED_WITH, "PROBE_DEFAULT", "PROBE_BLOCKS_MIB", "PROBE_ROUNDS")}  # fmt: skip
    env.update(environment, PYTHONPATH=str(ROOT))
    process = subprocess.Popen([sys.executable, "-m", "probe", "first", "--second=2"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.pid, process.returncode, out, err)


def _probe_report(tmp_path: Path, **environment: str) -> tuple[list[str], dict, int]:
    """The probe's lines before its report, its report, and its process id."""
    result = _run_probe(tmp_path, **environment)
    assert result.returncode == 0, result.stderr
    *lines, report = result.stdout.splitlines()
    return lines, json.loads(report), result.args


@pytest.mark.skipif(MIMALLOC is None, reason="cmeel-mimalloc is a requirement on Linux x86_64 / aarch64 only")
def test_a_job_restarts_once_as_the_same_command_and_process_with_mimalloc(tmp_path):
    lines, report, pid = _probe_report(tmp_path)
    assert lines == ["started", "started"]  # the code before the restart ran twice, the rest once
    assert report["pid"] == pid
    assert report["preload"] == MIMALLOC and report["purge"] == "-1" and report["arena_max"] == "1TiB"
    assert report["mapped"]
    assert report["described"] == "mimalloc, preloaded (MIMALLOC_PURGE_DELAY=-1, MIMALLOC_ARENA_MAX_OBJECT_SIZE=1TiB)"
    assert report["argv"] == ["first", "--second=2"] and report["module"] == "probe"  # `python -m probe ...` again
    lines, report, _ = _probe_report(tmp_path, SYNERGY_JAX_MALLOC="system")
    assert lines == ["started"] and report["preload"] is None and not report["mapped"]
    assert report["described"] == "the system's malloc, as it comes"


@pytest.mark.skipif(MIMALLOC is None, reason="cmeel-mimalloc is a requirement on Linux x86_64 / aarch64 only")
def test_with_mimalloc_freed_buffers_are_reused_without_faulting_again(tmp_path):
    first, *again = _probe_report(tmp_path)[1]["faults"]
    assert 0 < first <= (64 << 20) // 4096 and sum(again) <= 8, (first, again)  # faulted in once, then kept
    first, *again = _probe_report(tmp_path, SYNERGY_JAX_MALLOC="system")[1]["faults"]
    assert min(again) >= (64 << 20) // 4096  # glibc maps each 64 MiB block afresh, in 4 KiB pages
    # a purge after every free (mimalloc's own default waits 10 ms) faults the block in again every time
    first, *again = _probe_report(tmp_path, MIMALLOC_PURGE_DELAY="0")[1]["faults"]
    assert min(again) >= first / 2, (first, again)


@pytest.mark.skipif(MIMALLOC is None, reason="cmeel-mimalloc is a requirement on Linux x86_64 / aarch64 only")
def test_with_mimalloc_a_block_above_2_gib_is_reused_too(tmp_path):
    """XLA:CPU allocates a step's temporaries as one block; above mimalloc's default arena_max_object_size (2 GiB)
    it maps such a block afresh on every malloc, so a large step faulted its 2.1 GiB in again every time."""
    rounds = {"PROBE_BLOCKS_MIB": "2100", "PROBE_ROUNDS": "3"}
    first, *again = _probe_report(tmp_path, **rounds)[1]["faults"]
    assert first > 0 and sum(again) <= 8, (first, again)
    first, *again = _probe_report(tmp_path, **rounds, MIMALLOC_ARENA_MAX_OBJECT_SIZE="2GiB")[1]["faults"]
    assert min(again) >= first / 2, (first, again)  # mimalloc's default: faulted in afresh every round


@pytest.mark.skipif(not glibc_reads_every_tunable(), reason="needs Linux with glibc 2.35+")
def test_the_huge_page_restart_sets_the_tunable_once(tmp_path):
    lines, report, pid = _probe_report(tmp_path, SYNERGY_JAX_MALLOC="huge_pages")
    assert lines == ["started", "started"] and report["pid"] == pid
    assert report["tunables"] == TUNABLE and report["preload"] is None
    assert report["described"] == f"glibc malloc, transparent huge pages ({TUNABLE})"


@pytest.mark.skipif(not glibc_reads_every_tunable() or not THP_SETTING.exists()
                    or "[never]" in THP_SETTING.read_text(), reason="needs glibc 2.35+ and transparent huge pages")  # fmt: skip
def test_after_the_huge_page_restart_large_buffers_fault_in_huge_pages(tmp_path):
    huge_faults = sum(_probe_report(tmp_path, SYNERGY_JAX_MALLOC="huge_pages")[1]["faults"])
    small_faults = sum(_probe_report(tmp_path, SYNERGY_JAX_MALLOC="system")[1]["faults"])
    assert small_faults > 100_000  # 640 MiB in 4 KiB pages
    assert huge_faults < small_faults / 4, (huge_faults, small_faults)


@pytest.mark.skipif(not glibc_reads_every_tunable(), reason="needs Linux with glibc 2.35+")
def test_with_glibc_keep_a_clips_worth_of_buffers_is_reused_without_faulting_again(tmp_path):
    blocks = {"PROBE_BLOCKS_MIB": "1,2,4,2"}  # live together, as a clip's waveform, frames and spectrum are
    lines, report, pid = _probe_report(tmp_path, PROBE_DEFAULT="glibc_keep", **blocks)
    assert lines == ["started", "started"] and report["pid"] == pid and report["tunables"] == KEEP
    assert report["described"] == ("glibc malloc, keeping freed memory (glibc.malloc.mmap_threshold=33554432, "
                                   "glibc.malloc.trim_threshold=17179869184)")  # fmt: skip
    first, *again = report["faults"]
    assert first > 0 and sum(again) <= 8, (first, again)
    # as glibc comes, each round's blocks are mapped (or the heap grown) afresh and given back on free
    first, *again = _probe_report(tmp_path, SYNERGY_JAX_MALLOC="system", **blocks)[1]["faults"]
    assert min(again) >= (9 << 20) // 4096 // 2, (first, again)


def test_a_bad_choice_exits_2_in_one_line(tmp_path):
    result = _run_probe(tmp_path, SYNERGY_JAX_MALLOC="tcmalloc")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: SYNERGY_JAX_MALLOC='tcmalloc': must be one of mimalloc, glibc_keep, huge_pages, system"]
