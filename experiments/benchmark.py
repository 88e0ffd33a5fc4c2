"""Compiles the real tri-modal train step ahead of time and reports memory, FLOPs and (optionally) throughput.

    python experiments/benchmark.py --model=base --mesh=8x1 --batch_per_device=35            # compile only
    python experiments/benchmark.py --model=tiny --mesh=8x1 --steps=20                        # also run steps
    python experiments/benchmark.py --model=large --mesh=2x4 --rules=fsdp_tp --dtype=bfloat16 --remat
    python experiments/benchmark.py --model=large --mesh=8x1 --rules=fsdp --program=eval --batch_per_device=64
    PYTHONPATH=<libtpu dir> python experiments/benchmark.py --topology=v5e:2x4 --model=base --dtype=bfloat16 --remat
    python experiments/benchmark.py --model=base --layers=4 --width=256 --heads=4 --projection=256 \
        --mesh=1x1 --cpu_devices=1 --batch_per_device=8 --steps=5      # towers of one's choosing

Nothing is allocated for a compile-only run: the state and the batch are shape/sharding descriptions, so the full
Base and Large steps compile on 8 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 is set when
the job runs on CPU and asks for more devices than it has). Memory is per device, from the compiled executable.

`--topology` compiles for a TPU slice that is not there (v5e:2x4, v5p:2x2x1, v6e:2x4, ...): libtpu's compiler
runs on this host and the memory printed is the TPU's own buffer assignment. It needs libtpu importable, kept
out of the project's environment (README "TPU memory without a TPU"). XLA:CPU's memory figures overstate an
accelerator's many times over (they ignore remat and TPU fusion); read them as CPU figures only.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

flags.DEFINE_enum("model", "tiny", ["tiny", "base", "large"], "Synergy preset (towers as in docs/reference.md R1.1).")
flags.DEFINE_string("mesh", "-1x1", "DxM mesh over all devices ('data' x 'model'; -1 = the rest).")
flags.DEFINE_enum("rules", "replicate", ["replicate", "fsdp", "tp", "fsdp_tp"], "Parameter sharding rules.")
flags.DEFINE_integer("batch_per_device", 4, "Samples per data-parallel device per microbatch.")
flags.DEFINE_integer("accum", 1, "Gradient-accumulation microbatches per step.")
flags.DEFINE_integer("text_length", 32, "Tokens per text (the reference uses 32).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).")
flags.DEFINE_bool("remat", False, "Recompute block activations in the backward pass.")
flags.DEFINE_string("attention", "auto", "Attention implementation: auto, xla, heads_first, cudnn, splash "
                    "(synergy_jax/models/attention.py).")
flags.DEFINE_enum("negatives", "global", ["global", "local"], "Contrastive negatives.")
flags.DEFINE_enum("program", "train", ["train", "eval"], "What to compile: the train step, or the evaluators' "
                  "forward (all three embeddings, no gradient; synergy_jax/evaluators/embed.py) with the same "
                  "parameter sharding.")
flags.DEFINE_integer("steps", 0, "Timed steps to run after compiling (0: compile only).")
flags.DEFINE_integer("warmup", 3, "Untimed steps before the timed ones (at least 1).")
flags.DEFINE_integer("cpu_devices", 8, "Fake CPU devices when running on CPU.")
flags.DEFINE_string("topology", None, "Compile only, for this TPU topology (e.g. v5e:2x4, v5p:2x2x1, v6e:2x4), "
                    "with libtpu on PYTHONPATH; no TPU needed.")
flags.DEFINE_integer("layers", 0, "Encoder layers of every tower (0: the preset's).")
flags.DEFINE_integer("width", 0, "Hidden width of every tower, MLP at 4x (0: the preset's).")
flags.DEFINE_integer("heads", 0, "Attention heads of every tower (0: the preset's).")
flags.DEFINE_integer("projection", 0, "Projection width (0: the preset's).")
flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for MFU when the device kind is not known.")
FLAGS = flags.FLAGS


def fake_cpu_devices(argv: list[str]) -> None:
    """Before jax is imported: give a CPU run several devices, so that meshes like 8x1 compile here. An explicit
    `--cpu_devices` replaces a count already in XLA_FLAGS; without one, such a count is kept (default 8)."""
    flag = "--xla_force_host_platform_device_count"
    count = next((a.split("=", 1)[1] for a in argv if a.startswith("--cpu_devices=")), None)
    kept = [x for x in os.environ.get("XLA_FLAGS", "").split() if count is None or not x.startswith(flag)]
    if not any(x.startswith(flag) for x in kept):
        kept.append(f"{flag}={count or 8}")
    os.environ["XLA_FLAGS"] = " ".join(kept)


fake_cpu_devices(sys.argv)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from synergy_jax import cli, errors, flops, host_memory, losses, parallel, train  # noqa: E402
from synergy_jax.evaluators import embed  # noqa: E402
from synergy_jax.models import synergy  # noqa: E402


def random_batch(config: synergy.SynergyConfig, size: int, text_length: int, seed: int = 0) -> dict[str, np.ndarray]:
    example = synergy.example_batch(config, 1, text_length)
    rng = np.random.default_rng(seed)
    batch = {name: rng.normal(size=(size, *x.shape[1:])).astype(np.float32) for name, x in example.items()}
    batch["input_ids"] = rng.integers(3, config.text.vocab_size, (size, text_length)).astype(np.int32)
    batch["attention_mask"] = np.ones((size, text_length), np.int32)
    return batch


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:10.3f} GiB"


def flop_count(count: float) -> str:
    """A FLOP count in the largest unit that keeps it >= 1 (tiny models are MFLOPs, Large steps are PFLOPs)."""
    for scale, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if count >= scale:
            return f"{count / scale:10.3f} {unit}"
    return f"{count:10.0f} FLOP"


def topology_devices(name: str) -> list:
    """The devices of a TPU topology as libtpu describes it, with no TPU attached (for an ahead-of-time compile)."""
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
    except RuntimeError as error:  # jax's runtime errors included
        if "not installed" in str(error):
            raise errors.SetupError(f"--topology={name} needs libtpu: pip install --no-deps --target <dir> "
                                    "'libtpu==0.0.42.*' and run with PYTHONPATH=<dir> (README \"TPU memory without a "
                                    "TPU\")") from None  # fmt: skip
        hint = "; names look like v5e:2x4, v5p:2x2x1, v6e:2x4" if "INVALID_ARGUMENT" in str(error) else ""
        raise errors.SetupError(f"--topology={name}: {error}{hint}") from None


def main(argv: list[str]) -> None:
    """A bad flag value (a mesh that does not fit, a batch the mesh cannot split, a topology name) exits 2 in one
    line, as the jobs do."""
    cli.refuse_positional(argv)
    cli.exit_on_setup_error(benchmark)


def benchmark() -> None:
    if FLAGS.topology and FLAGS.steps:
        raise errors.SetupError("--topology compiles for a TPU that is not here: it cannot run --steps")
    if FLAGS.program == "eval" and (FLAGS.steps or FLAGS.accum != 1):
        raise errors.SetupError("--program=eval compiles the evaluation forward only: it takes no --steps or --accum")
    mesh = parallel.make_mesh(FLAGS.mesh, topology_devices(FLAGS.topology) if FLAGS.topology else None)
    config = synergy.preset_config(FLAGS.model).with_runtime(FLAGS.dtype, FLAGS.remat, FLAGS.attention)
    config = synergy.resized(config, FLAGS.layers, FLAGS.width, FLAGS.heads, FLAGS.projection)
    model = synergy.SynergyCLIP(config)
    tx = train.make_optimizer(train.optimizer_config())
    global_batch = FLAGS.batch_per_device * mesh.shape["data"] * FLAGS.accum
    train.check_batch(global_batch, mesh, FLAGS.accum)
    example = synergy.example_batch(config, 1, FLAGS.text_length)
    device = mesh.devices.flat[0]
    print(f"model={FLAGS.model} mesh={dict(mesh.shape)} rules={FLAGS.rules} dtype={FLAGS.dtype} remat={FLAGS.remat} "
          f"global_batch={global_batch} (={FLAGS.batch_per_device}/device x {mesh.shape['data']} x accum {FLAGS.accum}) "
          f"devices={mesh.size} x {device.device_kind}")  # fmt: skip
    print(f"host malloc: {host_memory.describe()}")

    shardings = train.state_shardings(model, tx, mesh, FLAGS.rules, example)
    state_shapes = train.abstract_train_state(model, tx, example, shardings)
    batch_shapes = {name: jax.ShapeDtypeStruct((global_batch, *x.shape[1:]), x.dtype,
                                               sharding=parallel.batch_sharding(mesh)) for name, x in example.items()}  # fmt: skip
    start = time.perf_counter()
    if FLAGS.program == "eval":
        program = embed.all_modalities_program(parallel.platform_of(mesh))
        lower_eval = parallel.on_mesh(lambda params, batch: program.lower(model, params, batch), mesh)
        compiled = lower_eval(state_shapes.params, batch_shapes).compile()
        flops_per_sample = config.forward_flops(FLAGS.text_length)
    else:
        step = train.make_train_step(model, tx, losses.LossConfig(negatives=FLAGS.negatives), mesh, shardings,
                                     FLAGS.accum)  # fmt: skip
        compiled = step.lower(state_shapes, batch_shapes).compile()
        flops_per_sample = flops.train_flops_per_sample(config.forward_flops(FLAGS.text_length), FLAGS.remat)
    count = sum(x.size for x in jax.tree.leaves(state_shapes.params))
    print(f"parameters                     {count / 1e6:10.2f} M  ({count})")
    print(f"compile time                   {time.perf_counter() - start:10.1f} s")
    samples_per_device = global_batch / mesh.size  # tensor parallelism shares a sample's work over 'model'
    print_compiled(compiled, config, flops_per_sample, samples_per_device)
    if FLAGS.steps > 0:
        time_steps(compiled, model, tx, mesh, example, config, global_batch, flops_per_sample)


def print_compiled(compiled, config: synergy.SynergyConfig, flops_per_sample: int, samples_per_device: float) -> None:
    """FLOPs (analytic and XLA's) and the compiled step's per-device memory."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    passes = "1 (eval)" if FLAGS.program == "eval" else 4 if FLAGS.remat else 3
    print(f"{f'analytic {FLAGS.program} FLOPs/sample':31s}{flop_count(flops_per_sample)}  "
          f"(forward {flop_count(config.forward_flops(FLAGS.text_length)).strip()} x {passes})")  # fmt: skip
    print(f"{f'analytic {FLAGS.program} FLOPs/device':31s}{flop_count(flops_per_sample * samples_per_device)} per step")
    if cost and "flops" in cost:
        print(f"XLA cost-analysis FLOPs/device {flop_count(cost['flops'])} per step  (XLA's count, without custom "
              "calls such as cuDNN's or splash's attention)")
    if memory is not None:
        print(f"per-device memory ({'TPU buffer assignment' if FLAGS.topology else 'compiled executable'}):")
        arguments = "params + batch" if FLAGS.program == "eval" else "state + batch"
        print(f"  {f'arguments ({arguments})':29s}{gib(memory.argument_size_in_bytes)}")
        print(f"  outputs                      {gib(memory.output_size_in_bytes)}")
        print(f"  aliased (donated state)      {gib(memory.alias_size_in_bytes)}")
        print(f"  temporaries (activations)    {gib(memory.temp_size_in_bytes)}")
        peak = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
        print(f"  total live                   {gib(peak + memory.temp_size_in_bytes)}")


def time_steps(compiled, model, tx, mesh, example, config, global_batch: int, flops_per_sample: int) -> None:
    """Runs `--warmup` untimed steps and `--steps` timed ones, and prints the median step time (and the mean),
    throughput and MFU. Steps are dispatched as the training loop does: the next is queued before the metrics of
    the one before are fetched, and a step's time is the time between those fetches. The median, because an
    early step can pay the allocator's growth to the peak of two steps in flight (docs/performance.md, stop 26)."""
    samples_per_device = global_batch / mesh.size
    device = mesh.devices.flat[0]
    start = time.perf_counter()
    state, _ = train.create_train_state(model, tx, mesh, FLAGS.rules, example, jax.random.PRNGKey(0))
    jax.block_until_ready(state)
    print(f"train state created            {time.perf_counter() - start:10.1f} s  (its initialiser compiled and run)")
    batch = jax.device_put(random_batch(config, global_batch, FLAGS.text_length), parallel.batch_sharding(mesh))
    warmup, pending, fetched = max(1, FLAGS.warmup), None, []
    for _ in range(warmup + FLAGS.steps):  # the first also checks that the step runs
        state, metrics = compiled(state, batch)
        if pending is not None:
            jax.block_until_ready(pending)
            fetched.append(time.perf_counter())
        pending = metrics
    jax.block_until_ready(pending)
    fetched.append(time.perf_counter())
    each = np.diff(fetched)[-FLAGS.steps:]
    seconds = float(np.median(each))
    per_device = samples_per_device / seconds
    peak = flops.peak_flops_per_device(device.device_kind, FLAGS.peak_tflops)
    utilisation = flops.mfu(global_batch / seconds, flops_per_sample, mesh.size, peak)
    print(f"step time                      {seconds * 1e3:10.1f} ms  (median of {FLAGS.steps} after {warmup} warm-up; "
          f"mean {np.mean(each) * 1e3:.1f} ms)")
    print(f"throughput                     {per_device:10.1f} samples/s/device")
    print(f"achieved                       {flop_count(per_device * flops_per_sample)}/s/device")
    print(f"MFU                            {'n/a (unknown peak; pass --peak_tflops)' if utilisation is None else f'{100 * utilisation:9.1f} %'}")
    print(f"loss after {warmup + FLAGS.steps} steps            {float(pending['loss']):10.4f}")
    stats = device.memory_stats()  # GPU and TPU allocators keep statistics; XLA:CPU's gives none
    if stats and "peak_bytes_in_use" in stats:
        print(f"measured peak device memory    {gib(stats['peak_bytes_in_use'])}  (allocator, whole run)")


if __name__ == "__main__":
    host_memory.use_fast_malloc()
    app.run(main, flags_parser=cli.parse_flags_or_exit)
