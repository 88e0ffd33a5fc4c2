"""The jobs' command line, one style for all: an ml_collections config file plus absl flags.

    python experiments/<job>.py [--config=experiments/configs/<job>.py[:<name>]] [--config.<field>=<value> ...]
                                [--<shortcut>=<value> ...]

Every setting is a config field (`--config.x.y=z` overrides any of them). The fields people set most also have a
short flag of their own (`Shortcut`): `--mesh=8x1` is `--config.mesh=8x1`. Every job also takes the multi-process
flags (`--coordinator_address`, `--num_processes`, `--process_id`; see synergy_jax.distributed) and
`--compile_cache` (where compiled programs are kept between runs: `use_compile_cache`).

Exit codes (docs/pretrain.md): 0 done or preempted (rerun to resume); 1 a non-finite loss stopped training; 2 a
bad flag, config value, data, file or checkpoint, with one line naming it instead of a traceback; 130 stopped by
Ctrl-C (the first one saves at the next step, like a preemption; a second one stops at once).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from synergy_jax import distributed, host_memory
from synergy_jax.errors import NonFiniteLossError, Preempted, SetupError

# A bad flag, config value, manifest, precompute output or checkpoint (the project's errors for these subclass
# ValueError), or a missing file or tokenizer (OSError).
SETUP_ERRORS = (ValueError, OSError)

# The persistent compilation cache keeps at most this much; JAX evicts the least recently used programs beyond it.
COMPILE_CACHE_MAX_BYTES = 8 << 30


@dataclasses.dataclass(frozen=True)
class Shortcut:
    """`--<name>=<value>` sets config field `field` (dotted), converted to the field's type."""

    name: str
    field: str
    help: str
    choices: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Range:
    """The legal values of a numeric config field: `low <= value` (`<` when `low_open`), `value <= high`, and a whole
    number when `integer`."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    low_open: bool = False
    high_open: bool = False

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` ('must be ...'), or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.integer and value != int(value)):
            return f"must be {'a whole number' if self.integer else 'a number'} {self.describe()}".rstrip()
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"must be {self.describe()}" if below or above or value != value else None  # value != value: NaN

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)


COUNT = Range(0, integer=True)  # 0 often means 'the default' or 'off'
AT_LEAST_ONE = Range(1, integer=True)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)  # a share or probability, both ends included
BELOW_ONE = Range(0, 1, high_open=True)  # Adam's betas


def check_ranges(config: ml_collections.ConfigDict, ranges: Mapping[str, Range]) -> None:
    """Every field of `ranges` (dotted) against its range, before a job does anything; one SetupError naming every
    field that is out of range. A field missing from `config` is a KeyError (a stale table)."""
    problems = []
    for dotted, allowed in ranges.items():
        value = config
        for part in dotted.split("."):
            value = value[part]
        problems += [f"--config.{dotted}={v!r} {problem}" for v in _numbers(value) if (problem := allowed.problem(v))]
    if problems:
        raise SetupError(f"bad config value(s): {'; '.join(problems)}")


def check_runtime(mesh: Any, dtype: str, sharding: str) -> None:
    """A job's compute dtype (one its mesh's platform runs) and parameter-sharding rules (known ones), checked before
    it writes anything; a ValueError (exit 2) names the problem."""
    from synergy_jax import parallel
    from synergy_jax.models import layers

    layers.compute_dtype(dtype, mesh.devices.flat[0].platform)
    parallel.check_rules(sharding)


def _numbers(value: Any) -> list[Any]:
    """The values of a field, nested sequences flattened."""
    if isinstance(value, (tuple, list)):
        return [number for item in value for number in _numbers(item)]
    return [value]


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """`config.<dotted> = value`, converted to the type of the field's current value; a ValueError names it."""
    *parents, leaf = dotted.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    current = node[leaf]
    try:
        if isinstance(current, bool) and isinstance(value, str):
            value = {"true": True, "1": True, "false": False, "0": False}[value.lower()]
        elif current is not None and not isinstance(value, type(current)):
            value = type(current)(value)
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"--config.{dotted}={value!r}: expected a {type(current).__name__}") from None
    node[leaf] = value


def run_or_exit(job: Callable[..., Any], *args: Any) -> Any:
    """Runs a job; SIGTERM outside the training loop exits 0 (preempted), a non-finite training state exits 1, a
    setup error exits 2, Ctrl-C outside the loop (or a second one inside) exits 130, each with a one-line message
    instead of a traceback. In a multi-process job any other error prints its traceback and exits 1, and every
    failure leaves at once (`distributed.exit_now`) so the other processes stop within seconds instead of waiting
    in a collective for this one."""
    distributed.forget_interruption()
    try:
        with distributed.sigterm_raises():
            return job(*args)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); what was finished and saved is kept: rerun the same command to continue",
              file=sys.stderr)  # fmt: skip
        distributed.exit_now(130, at_once=True)
    except Preempted:
        print("stopped by SIGTERM outside the training steps (preparing data, or finishing); what was finished is "
              "kept: rerun the same command to continue", file=sys.stderr)  # fmt: skip
        # The job's own cleanup has run (files closed, checkpoints waited for, the lock released). Finalising the
        # interpreter now, with the runtime's threads interrupted mid-work, crashed some runs with SIGSEGV (exit 139).
        distributed.exit_now(0, at_once=True)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        distributed.exit_now(1)
    except SETUP_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        distributed.exit_now(2)
    except Exception:
        if not distributed.is_one_of_several():
            raise
        traceback.print_exc()
        print("error: this process failed (traceback above). If it is a lost connection or a failed collective, "
              "another process of the job failed first: its output says why.", file=sys.stderr)  # fmt: skip
        distributed.exit_now(1)


def start(
    config_file: Path,
    run: Callable[[ml_collections.ConfigDict], Any],
    report: Callable[[Any], None],
    shortcuts: Sequence[Shortcut] = (),
    default_config: str = "",
) -> None:
    """The `__main__` of a job: defines the flags, parses them (a bad one exits 2), starts the processes, runs
    `run(config)` under the exit codes and `report(result)` on process 0. First of all it restarts the process
    with a malloc that keeps XLA:CPU's step buffers (`host_memory`)."""
    from absl import app

    host_memory.use_fast_malloc()
    default = f"{config_file}:{default_config}" if default_config else str(config_file)
    try:
        config_flag = _define_flags(default, shortcuts)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        # ml_collections applies --config.x=y while defining the flag: a bad override surfaces here.
        what = _override_problem(error)
        print(f"error: bad --config or --config.<field> override: {what} (the fields are in {config_file})",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)

    def main(argv: list[str]) -> None:
        refuse_positional(argv)
        distributed.default_log_verbosity()
        result = run_or_exit(_configure_and_run, config_flag.value, shortcuts, run)
        if distributed.is_main_process():
            report(result)
        if distributed.interrupted_by_user():  # agreed by every process: all leave through the shutdown barrier
            sys.stdout.flush()
            sys.exit(130)  # saved and stopped like a preemption, but the user stopped it

    app.run(main, flags_parser=parse_flags_or_exit)


def _override_problem(error: Exception) -> str:
    """The text of a config-override error, unwrapped: ml_collections raises e.g. an AttributeError holding a
    KeyError whose message is the quoted key plus a 'Did you mean' line."""
    while error.args and isinstance(error.args[0], Exception):
        error = error.args[0]
    what = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    return ": ".join(line.strip().strip("'\"") for line in what.splitlines() if line.strip())


def _define_flags(default_config: str, shortcuts: Sequence[Shortcut]):
    from absl import flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", default_config, "Config file[:name].", lock_config=True)
    for shortcut in shortcuts:
        help_text = f"{shortcut.help} (= --config.{shortcut.field})"
        if shortcut.choices:
            flags.DEFINE_enum(shortcut.name, None, list(shortcut.choices), help_text)
        else:
            flags.DEFINE_string(shortcut.name, None, help_text)
    flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
    flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
    flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
    flags.DEFINE_string("compile_cache", "", "Folder (or gs:// path) where compiled programs are kept between runs, "
                        "so a resumed or repeated job skips compiling; 'off' for none. Default: "
                        "$JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/synergy_jax/xla (~/.cache/...).")  # fmt: skip
    return config_flag


def _configure_and_run(config: ml_collections.ConfigDict, shortcuts: Sequence[Shortcut], run) -> Any:
    from absl import flags

    for shortcut in shortcuts:
        if flags.FLAGS[shortcut.name].present:
            set_field(config, shortcut.field, flags.FLAGS[shortcut.name].value)
    f = flags.FLAGS
    use_compile_cache(f.compile_cache)
    distributed.initialize(distributed.distributed_arguments(f.coordinator_address, f.num_processes, f.process_id))
    return run(config)


def compile_cache_directory(flag_value: str, environment: Mapping[str, str]) -> str | None:
    """Where compiled programs are kept: the flag's folder; none for 'off'; else none if JAX's own
    `JAX_ENABLE_COMPILATION_CACHE` says false; else JAX's `JAX_COMPILATION_CACHE_DIR`; else the user's cache
    folder (`$XDG_CACHE_HOME`, or ~/.cache)."""
    if flag_value == "off":
        return None
    if flag_value:
        return os.path.expanduser(flag_value)  # absl leaves the ~ of --compile_cache=~/x to us
    if environment.get("JAX_ENABLE_COMPILATION_CACHE", "").lower() in ("0", "false"):
        return None
    if environment.get("JAX_COMPILATION_CACHE_DIR"):
        return environment["JAX_COMPILATION_CACHE_DIR"]
    base = environment.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "synergy_jax", "xla")


def use_compile_cache(flag_value: str) -> str | None:
    """Turns on JAX's persistent compilation cache (programs that took at least a second to compile, keyed by the
    program, the compile options, the jax version and the devices), so a resumed job starts without recompiling:
    the Base step alone compiled for 50 s on an H200 (docs/performance.md). Only process 0 writes entries, so
    the other hosts of a multi-host job gain only from a shared folder (gs://...). A local folder that cannot be
    written is a setup error when `--compile_cache` named it; the default one only costs the cache, with a warning.
    Returns the folder in use, or None. The size bound needs `filelock`, and applies to local folders only (on a
    bucket its lock would be a local file, so a gs:// cache is left unbounded)."""
    import importlib.util

    import jax

    directory = compile_cache_directory(flag_value, os.environ)
    local = directory is not None and "://" not in directory
    if local:
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            if not os.access(directory, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), directory)
        except OSError as error:
            if flag_value:
                raise SetupError(f"--compile_cache={flag_value}: {error}; name a folder this user can write, or "
                                 "pass --compile_cache=off") from None  # fmt: skip
            print(f"warning: no compilation cache ({error}); every run compiles afresh. --compile_cache=<folder> "
                  "chooses another folder", file=sys.stderr)  # fmt: skip
            directory = None
    jax.config.update("jax_enable_compilation_cache", directory is not None)
    if directory is not None:
        jax.config.update("jax_compilation_cache_dir", directory)
        bounded = local and importlib.util.find_spec("filelock") is not None
        if bounded and "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
            jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
    return directory


def exit_on_setup_error(tool: Callable[..., Any], *args: Any) -> Any:
    """For the tools that are not resumable jobs (the benchmarks): a bad flag value, file or environment exits 2 in
    one line; signals keep their usual meaning (nothing is saved, so there is nothing to resume)."""
    try:
        return tool(*args)
    except SETUP_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def refuse_positional(argv: Sequence[str]) -> None:
    """absl leaves words that are not flags in argv; a command line with any exits 2 naming them."""
    if len(argv) > 1:
        print(f"error: unexpected arguments {list(argv[1:])}: every option is a flag (--name=value)", file=sys.stderr)
        sys.exit(2)


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl's flag parsing, but a bad flag (unknown flag, bad value, unknown config name) exits 2 with the one line
    that names it, instead of absl's exit 1 with the config file's traceback."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        print(f"error: {lines[-1] if lines else error}\nPass --helpshort or --helpfull to see the flags.", file=sys.stderr)
        sys.exit(2)
