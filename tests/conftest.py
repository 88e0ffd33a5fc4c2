"""Test environment: 8 fake CPU devices and an offline Hugging Face, set before jax or transformers import."""

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

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_collection_modifyitems(items):
    """The notebooks' run is the longest test (minutes): collected first, it starts at once on one xdist worker
    (`--dist loadfile` hands out files in collection order) while the other worker runs the rest beside it."""
    items.sort(key=lambda item: item.path.name != "test_notebooks.py")
