"""experiments/benchmark.py compiles the real step and runs it on the tiny config (numbers are not asserted)."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "experiments" / "benchmark.py"


def test_benchmark_compiles_and_runs_the_tiny_step(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model=tiny", "--mesh=4x2", "--rules=tp", "--steps=2", "--accum=2",
         "--batch_per_device=2"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "global_batch=16 (=2/device x 4 x accum 2)" in out
    for field in ("compile time", "analytic train FLOPs/sample", "XLA cost-analysis", "temporaries", "throughput", "MFU"):
        assert field in out, field
    assert re.search(r"throughput\s+[\d.]+ samples/s/device", out)  # printed, not judged: timing is not a test
    assert re.search(r"loss after 3 steps\s+[\d.]+", out)


def test_benchmark_rejects_a_mesh_that_does_not_fit(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model=tiny", "--mesh=3x1"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode != 0
    assert "this job has 8" in result.stderr


def test_a_topology_compile_without_libtpu_says_what_to_install(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model=tiny", "--topology=v5e:2x4", "--mesh=8x1"], capture_output=True,
        text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--topology=v5e:2x4 needs libtpu: pip install --no-deps --target" in result.stderr
