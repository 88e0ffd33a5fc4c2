"""Times the attention implementations alone, forward and backward, as the towers call them (issue #14, item 2).

    python experiments/benchmark_attention.py                                   # this backend's defaults
    python experiments/benchmark_attention.py --lengths=32,64,128,197 --masked=both --dtype=bfloat16   # on a GPU
    python experiments/benchmark_attention.py --lengths=854 --batch=8 --heads=4 --dtype=float32         # on CPU

Each row is one length (and mask), each column one implementation: the median time of `--repeats` calls of the
jitted value-and-gradient of sum(out * cotangent), and the largest gradient error against XLA's path in float32 at
full precision, as a fraction of the largest gradient (so bfloat16 shows its own rounding, about 0.5 %). This is
what chose `attention.CUDNN_MIN_LENGTH` and `HEADS_FIRST_MIN_LENGTH` (docs/performance.md).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from synergy_jax import cli, errors
from synergy_jax.models import attention

flags.DEFINE_list("lengths", ["32", "197", "1214"], "Sequence lengths (queries = keys).")
flags.DEFINE_integer("batch", 0, "Examples per call (0: 64 on GPU and TPU, 8 on CPU).")
flags.DEFINE_integer("heads", 12, "Attention heads.")
flags.DEFINE_integer("head_dim", 64, "Width of each head.")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Dtype of queries, keys and values.")
flags.DEFINE_enum("masked", "both", ["yes", "no", "both"], "With a key-padding mask (random lengths per example, "
                  "padded at the end, as the text tower's), without, or both.")
flags.DEFINE_list("implementations", [], "Implementations to time (default: xla and this backend's own: "
                  "heads_first on CPU, cudnn on GPU, splash on TPU).")
flags.DEFINE_integer("repeats", 0, "Timed calls per cell, after one untimed (0: 20 on GPU and TPU, 3 on CPU).")
FLAGS = flags.FLAGS

BACKEND_OWN = {"cpu": "heads_first", "gpu": "cudnn", "tpu": "splash"}


def for_backend(flag_value: int, accelerator: int, cpu: int) -> int:
    """The flag's value, or (0) a default sized for the backend: a bare run on CPU (AST's 1214 tokens, both masks)
    takes a minute, not an hour."""
    return flag_value or (cpu if jax.default_backend() == "cpu" else accelerator)


def fwd_bwd(implementation: str, mask):
    """The jitted value and gradients (q, k, v) of sum(attention * cotangent); the cotangent is an argument, not a
    constant XLA would fold into the program."""

    def loss(q, k, v, cotangent):
        out = attention.dot_product_attention(q, k, v, mask, implementation).astype(jnp.float32)
        return jnp.sum(out * cotangent)

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))


def median_ms(repeats: int, run, *args) -> tuple[float, tuple]:
    """The median time of `repeats` calls after one untimed (which compiles), and the first call's gradients."""
    result = jax.block_until_ready(run(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), result[1]


def row(length: int, masked: bool, implementations: list[str], batch: int, repeats: int) -> str:
    """One length: every implementation's time and gradient error; a failure (cuDNN refusing a shape) is shown."""
    rng = np.random.default_rng(length)
    shape = (batch, length, FLAGS.heads, FLAGS.head_dim)
    q, k, v, cotangent = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4))
    mask = None
    if masked:
        valid = rng.integers(length // 2, length + 1, batch)
        mask = jnp.asarray(np.arange(length)[None, :] < valid[:, None])[:, None, None, :]
    with jax.default_matmul_precision("highest"):
        exact = fwd_bwd("xla", mask)(q, k, v, cotangent)[1]
    largest = max(float(jnp.abs(g).max()) for g in exact)
    cells = []
    for implementation in implementations:
        try:
            inputs = (x.astype(FLAGS.dtype) for x in (q, k, v))
            ms, grads = median_ms(repeats, fwd_bwd(implementation, mask), *inputs, cotangent)
        except Exception as error:  # noqa: BLE001 - a refused shape is a result worth printing, not a crash
            cells.append(f"{implementation}: failed ({type(error).__name__}: {str(error).splitlines()[0][:80]})")
            continue
        error = max(float(jnp.abs(g.astype(jnp.float32) - e).max()) for g, e in zip(grads, exact)) / largest
        cells.append(f"{implementation} {ms:9.3f} ms (grad error {100 * error:.2f} %)")
    return f"{length:6d} {'yes' if masked else 'no':>6s}   " + "   ".join(cells)


def main(argv: list[str]) -> None:
    """An unknown implementation or a bad length exits 2 in one line, before anything is timed."""
    cli.refuse_positional(argv)
    cli.exit_on_setup_error(benchmark)


def benchmark() -> None:
    implementations = FLAGS.implementations or ["xla", BACKEND_OWN.get(jax.default_backend(), "heads_first")]
    try:
        lengths = [int(x) for x in FLAGS.lengths]
        if min(lengths) < 1:
            raise ValueError(f"--lengths={','.join(FLAGS.lengths)}: every length must be at least 1")
        for name in implementations:
            attention.resolve(name, FLAGS.dtype, 1)
    except ValueError as error:
        raise errors.SetupError(f"{error} (--lengths takes whole numbers from 1, --implementations "
                                f"{', '.join(attention.IMPLEMENTATIONS)})") from None
    batch, repeats = for_backend(FLAGS.batch, 64, 8), for_backend(FLAGS.repeats, 20, 3)
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}: batch {batch}, "
          f"{FLAGS.heads} heads x {FLAGS.head_dim}, {FLAGS.dtype}, forward + backward, median of {repeats}")
    print(f"{'tokens':>6s} {'masked':>6s}")
    for length in lengths:
        for masked in {"yes": [True], "no": [False], "both": [True, False]}[FLAGS.masked]:
            print(row(length, masked, implementations, batch, repeats), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags_or_exit)
