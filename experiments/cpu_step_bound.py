"""A lower bound on the CPU train step's time from its matmuls alone, with each library's own matmul speed.

Every matmul of the towers' blocks (forward and backward: q/k/v/out projections, MLP, attention scores and values,
per tower, at the step's real shapes; the patch embeddings and the three projections, about 2 % of the FLOPs, are
left out, which only lowers the bound) is timed alone with XLA:CPU (jax) and, when torch is importable,
with torch's kernels. The sum over the step's matmuls of their best time is what a step takes if it ran every
matmul as fast as the faster library runs it alone and everything else (softmax, norms, GELU, AdamW, copies)
took no time at all. No implementation built on these kernels goes below it.

    python experiments/cpu_step_bound.py --layers=4 --width=256 --heads=4 --projection=256 --batch=8 \
        --reference_seconds=5.60          # with torch: .venv-torch/bin/python (the fixtures venv, README)

Pin it like the side-by-side step: `taskset -c 0` for one core; XLA:CPU and torch then both use the cores allowed.
docs/performance.md has the figures against the reference's measured step.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU bound: no accelerator probing

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "base", "Preset whose towers are resized: base or large.")
flags.DEFINE_integer("layers", 4, "Blocks per tower.")
flags.DEFINE_integer("width", 256, "Hidden size of every tower (MLP 4x).")
flags.DEFINE_integer("heads", 4, "Attention heads of every tower.")
flags.DEFINE_integer("projection", 256, "Shared embedding size.")
flags.DEFINE_integer("batch", 8, "Examples per step.")
flags.DEFINE_integer("text_length", 32, "Text tokens.")
flags.DEFINE_integer("threads", 0, "torch threads (0: the cores this process may run on, as XLA:CPU uses).")
flags.DEFINE_float("reference_seconds", 0.0, "The reference's measured step (experiments/torch_reference_step.py).")
flags.DEFINE_integer("repeats", 5, "Timings per matmul; the best is kept.")

Matmul = tuple[int, int, int, int]  # (batch, m, k, n): batch x (m x k) @ (k x n)


def tower_matmuls(tokens: int, width: int, mlp: int, heads: int, layers: int, batch: int) -> list[tuple[Matmul, int]]:
    """(shape, count) of every matmul of one tower's blocks in a train step: each dense layer's forward, input
    gradient and weight gradient; the attention's q kᵀ and p v forward and their four backward products."""
    rows, head = batch * tokens, width // heads
    dense = [(width, 3 * width), (width, width), (width, mlp), (mlp, width)]  # fused qkv, out, MLP in, MLP out
    shapes: list[tuple[Matmul, int]] = []
    for k, n in dense:
        shapes += [((1, rows, k, n), layers), ((1, rows, n, k), layers), ((1, k, rows, n), layers)]
    groups = batch * heads
    shapes += [((groups, tokens, head, tokens), 2 * layers),  # scores q kᵀ; grad of p through dO vᵀ
               ((groups, tokens, tokens, head), 4 * layers)]  # p v; grads of v, q and k
    return shapes


def step_matmuls() -> list[tuple[Matmul, int]]:
    from synergy_jax.models import synergy

    config = synergy.resized(synergy.preset_config(FLAGS.model), FLAGS.layers, FLAGS.width, FLAGS.heads,
                             FLAGS.projection)  # fmt: skip
    towers = [(config.vision, config.vision.num_tokens), (config.text, FLAGS.text_length),
              (config.audio, config.audio.num_tokens)]  # fmt: skip
    return [shape for tower, tokens in towers
            for shape in tower_matmuls(tokens, tower.hidden_size, tower.intermediate_size, tower.num_attention_heads,
                                       tower.num_hidden_layers, FLAGS.batch)]  # fmt: skip


def best_seconds(run) -> float:
    run()
    best = float("inf")
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def jax_timer(shape: Matmul):
    import jax
    import jax.numpy as jnp

    b, m, k, n = shape
    x, y = jnp.ones((b, m, k), jnp.float32), jnp.ones((b, k, n), jnp.float32)
    product = jax.jit(jnp.matmul)
    return lambda: product(x, y).block_until_ready()


def torch_timer(shape: Matmul):
    import torch

    b, m, k, n = shape
    x, y = torch.randn(b, m, k), torch.randn(b, k, n)
    return lambda: torch.bmm(x, y)


def libraries() -> dict:
    found = {"jax": jax_timer}
    try:
        import torch

        torch.set_num_threads(FLAGS.threads or len(os.sched_getaffinity(0)))
        found["torch"] = torch_timer
    except ImportError:
        print("torch is not importable here: XLA:CPU only (run with .venv-torch/bin/python for both)")
    return found


def main(argv: list[str]) -> None:
    del argv
    matmuls, timers = step_matmuls(), libraries()
    total = {name: 0.0 for name in timers} | {"best of both": 0.0}
    flop = 0
    for shape, count in matmuls:
        b, m, k, n = shape
        flop += 2 * b * m * k * n * count
        seconds = {name: best_seconds(timer(shape)) * count for name, timer in timers.items()}
        for name, value in seconds.items():
            total[name] += value
        total["best of both"] += min(seconds.values())
    print(f"train step matmuls: {flop / 1e9:.1f} GFLOP ({flop} FLOP, {len(matmuls)} shapes), batch {FLAGS.batch}, "
          f"{len(os.sched_getaffinity(0))} core(s)")  # fmt: skip
    for name, seconds in total.items():
        print(f"  every matmul at {name + ' speed':24s} {seconds:7.2f} s  ({flop / seconds / 1e9:5.1f} GFLOP/s)")
    if FLAGS.reference_seconds:
        target = FLAGS.reference_seconds / 1.5
        print(f"reference step {FLAGS.reference_seconds:.2f} s; 1.5x its throughput is {target:.2f} s per step; the "
              f"matmuls alone need at least {total['best of both']:.2f} s")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
