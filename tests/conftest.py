"""Test environment: 8 fake CPU devices and an offline Hugging Face, set before jax or transformers import."""

import collections
import os
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Many tests compile the same small programs (and the job tests start subprocesses that compile them again):
# share them through JAX's persistent compilation cache. Subprocesses find it through the environment.
CACHE_DIR = Path(os.environ.get("SYNERGY_TEST_JAX_CACHE", Path(tempfile.gettempdir()) / f"synergy_jax_test_cache_{os.getuid()}"))
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(CACHE_DIR)

import jax  # noqa: E402

from synergy_jax import host_memory  # noqa: E402

# The jobs restart themselves with a faster malloc (synergy_jax/host_memory.py) unless their environment already
# holds it: set here, the job subprocesses start with it and skip the restart (tests/test_host_memory.py exercises
# the restart).
os.environ.update(host_memory.environment_with_fast_malloc(os.environ, host_memory.mimalloc_library(),
                                                           host_memory.glibc_version()) or {})

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# Test files in the order the two xdist workers take them (`--dist loadfile --no-loadscope-reorder`): the longest
# first, so that none is left to run alone at the end. The notebooks' run (minutes) starts at once on one worker;
# the files that run whole jobs follow; then the rest, most tests first (xdist's own ordering).
LONGEST_FIRST = ("test_notebooks.py", "test_pretrain.py", "test_finetune.py", "test_mmr_job.py", "test_zero_shot.py",
                 "test_run_safety.py")  # fmt: skip


def pytest_collection_modifyitems(items):
    counts = collections.Counter(item.path for item in items)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -counts[item.path], str(item.path)))
