"""The jobs' shared parts on their own: the run record, the command-line overrides, embed_split's row order and
padding, the step builder's mutable fields and frozen argument, the device prefetch's input position, and the
activations' batch sharding."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from synergy_jax import cli, loop, parallel, train
from synergy_jax.evaluators import embed
from synergy_jax.models import layers
from synergy_jax.models.synergy import SynergyCLIP
from synergy_jax.errors import CheckpointError, SetupError
from synergy_jax.evaluators.embed import embed_split, indexed_batches
from synergy_jax.record import DataSource, RunRecord
from synthetic import random_batch, tiny_config


def test_data_source_paths_inside_the_run_are_stored_relative(tmp_path):
    run = tmp_path / "run"
    (run / "data" / "raw" / "tokenizer").mkdir(parents=True)
    source = DataSource(str(run / "data" / "precomputed"), str(run / "data" / "raw" / "tokenizer"), "prompt", 32, 32,
                        demo_root=str(run / "data"))  # fmt: skip
    stored = source.relative_to(run)
    assert stored.dir == "data/precomputed" and stored.tokenizer == "data/raw/tokenizer" and stored.demo_root == "data"
    moved = tmp_path / "moved"
    run.rename(moved)
    resolved = stored.resolve(moved)
    assert resolved.dir == str(moved / "data" / "precomputed") and resolved.tokenizer == str(moved / "data/raw/tokenizer")
    hub = DataSource("/data/pre", "FacebookAI/roberta-base", "caption", 32, 224)
    assert hub.relative_to(run).resolve(moved) == hub  # outside paths and hub ids stay as they are


def test_run_record_round_trip_and_refusals():
    record = RunRecord(kind="mmr", model={"missing": "image"}, optimizer_structure={"clip_grad_norm": False},
                       config={}, run={}, data=DataSource("d", "t", "prompt", 32, 32))  # fmt: skip
    again = RunRecord.from_json(record.to_json(), "x")
    assert again == record and isinstance(again.data, DataSource)
    with pytest.raises(CheckpointError, match="not a pre-training run"):
        again.synergy_config()
    with pytest.raises(CheckpointError, match="format"):
        RunRecord.from_json({"config": {}, "model": {}}, "old/run")  # a record written before the typed format
    changed = RunRecord(**{**record.__dict__, "model": {"missing": "audio"}})
    with pytest.raises(CheckpointError, match="model.missing: 'image' -> 'audio'"):
        record.check_resumable_by(changed, "here")


def test_set_field_converts_to_the_field_type_and_names_bad_values():
    config = ml_collections.ConfigDict(dict(batch_size=8, rate=0.5, progress=True, name="a", nested={"k": 1}))
    for field, text, expected in [("batch_size", "16", 16), ("rate", "1e-3", 1e-3), ("progress", "false", False),
                                  ("name", "b", "b"), ("nested.k", "3", 3)]:  # fmt: skip
        cli.set_field(config, field, text)
        value = config.nested.k if field == "nested.k" else config[field]
        assert value == expected and type(value) is type(expected), field
    with pytest.raises(ValueError, match="--config.batch_size='many': expected a int"):
        cli.set_field(config, "batch_size", "many")


def test_compile_cache_folder_is_the_flag_then_jax_then_the_user_cache():
    assert cli.compile_cache_directory("/c", {"JAX_COMPILATION_CACHE_DIR": "/j"}) == "/c"
    assert cli.compile_cache_directory("off", {"JAX_COMPILATION_CACHE_DIR": "/j"}) is None
    assert cli.compile_cache_directory("~/c", {}) == os.path.join(os.path.expanduser("~"), "c")
    jax_off = {"JAX_ENABLE_COMPILATION_CACHE": "false", "JAX_COMPILATION_CACHE_DIR": "/j"}
    assert cli.compile_cache_directory("", jax_off) is None
    assert cli.compile_cache_directory("", {"JAX_COMPILATION_CACHE_DIR": "/j", "XDG_CACHE_HOME": "/x"}) == "/j"
    assert cli.compile_cache_directory("", {"XDG_CACHE_HOME": "/x"}) == "/x/synergy_jax/xla"
    assert cli.compile_cache_directory("", {}) == os.path.join(os.path.expanduser("~"), ".cache", "synergy_jax", "xla")


@pytest.fixture
def compile_cache_settings():
    """JAX's compilation-cache settings as they were before the test, put back after it (`use_compile_cache`
    changes them process-wide)."""
    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_compilation_cache_max_size")
    before = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in before.items():
        jax.config.update(name, value)


def test_an_unwritable_default_compile_cache_warns_and_runs_without(tmp_path, monkeypatch, capsys,
                                                                    compile_cache_settings):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "a_file" / "xla"))
    assert cli.use_compile_cache("") is None and not jax.config.jax_enable_compilation_cache
    assert "warning: no compilation cache" in capsys.readouterr().err
    with pytest.raises(SetupError, match="--compile_cache=.*--compile_cache=off"):
        cli.use_compile_cache(str(tmp_path / "a_file" / "xla"))


def test_a_bucket_compile_cache_is_neither_created_here_nor_size_bounded(tmp_path, monkeypatch,
                                                                         compile_cache_settings):
    """A gs:// folder is JAX's to reach; the size bound's lock would be a local file, so a bucket is left unbounded."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    jax.config.update("jax_compilation_cache_max_size", -1)
    assert cli.use_compile_cache("gs://bucket/xla") == "gs://bucket/xla"
    assert jax.config.jax_compilation_cache_dir == "gs://bucket/xla"
    assert jax.config.jax_compilation_cache_max_size == -1 and not any(tmp_path.iterdir())
    assert cli.use_compile_cache(str(tmp_path / "xla")) == str(tmp_path / "xla")
    assert jax.config.jax_compilation_cache_max_size == cli.COMPILE_CACHE_MAX_BYTES  # the control: local


def test_embed_split_drops_padding_and_restores_row_order():
    """17 rows fed shuffled in global batches of 8 (7 padding rows at the end), on 8 devices: the columns come back
    with the 17 real rows once each, in row order."""
    mesh = parallel.make_mesh("8x1")
    order = np.random.default_rng(0).permutation(17)
    row_ids = np.concatenate([order, np.full(7, -1)])
    batches = [{"x": np.where(ids >= 0, ids * 10.0, 0.0).astype(np.float32), "row_id": ids, "valid": ids >= 0}
               for ids in row_ids.reshape(3, 8)]  # fmt: skip
    columns = embed_split(lambda batch: {"y": batch["x"] + 1}, batches, mesh, keep=("x",))
    np.testing.assert_array_equal(columns["row_id"], np.arange(17))
    np.testing.assert_array_equal(columns["y"], np.arange(17) * 10.0 + 1)
    np.testing.assert_array_equal(columns["x"], np.arange(17) * 10.0)


def test_indexed_batches_cover_every_example_once_with_padding_marked():
    mesh = parallel.make_mesh("8x1")
    batches = list(indexed_batches(17, 8, mesh, lambda indices: {"x": indices * 2}))
    assert len(batches) == 3 and all(len(b["x"]) == 8 for b in batches)
    row_ids = np.concatenate([b["row_id"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    np.testing.assert_array_equal(row_ids[valid], np.arange(17))
    assert not valid[17:].any() and np.all(np.concatenate([b["x"] for b in batches])[valid] == np.arange(17) * 2)


def test_make_step_threads_mutable_fields_and_frozen_parameters():
    """A loss that counts its calls in a mutable field and reads a frozen scale: the count goes up once per
    microbatch, the frozen value scales the gradient, and a non-finite loss leaves the whole state as it was."""
    import flax.struct

    @flax.struct.dataclass
    class State(train.TrainState):
        calls: jax.Array

    def loss_fn(params, batch, rng, mutable, frozen):
        loss = frozen["scale"] * jnp.sum(params["w"] * batch["x"]) / batch["x"].shape[0]
        return loss, ({"loss": loss}, {"calls": mutable["calls"] + 1})

    mesh = parallel.make_mesh("8x1")
    tx = optax.sgd(1.0)
    params = {"w": jnp.ones(3)}
    state = State(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(0),
                  calls=jnp.zeros((), jnp.int32))  # fmt: skip
    replicated = parallel.replicated(mesh)
    step = train.make_step(loss_fn, tx, replicated, mesh, accum_steps=2, frozen_shardings=replicated, mutable=("calls",))
    batch = parallel.global_batch({"x": np.ones((16, 3), np.float32)}, mesh)
    state, metrics = step(state, batch, {"scale": jnp.float32(2.0)})
    assert int(state.calls) == 2 and int(state.step) == 1 and float(metrics["nonfinite"]) == 0.0
    np.testing.assert_allclose(np.asarray(state.params["w"]), 1.0 - 2.0)  # w -= lr * scale * mean(x)
    before = jax.device_get(state)
    state, metrics = step(state, batch, {"scale": jnp.float32(np.inf)})
    assert float(metrics["nonfinite"]) == 1.0
    for got, want in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(got, want)


class _Counting:
    """A resumable iterator over 0, 1, 2, ... up to `stop` whose state is the next number."""

    def __init__(self, stop: int):
        self.next, self.stop = 0, stop

    def __next__(self):
        if self.next == self.stop:
            raise StopIteration
        self.next += 1
        return {"x": np.array([self.next - 1])}

    def get_state(self) -> dict:
        return {"next": self.next}


def test_device_prefetch_places_ahead_and_reports_the_position_of_what_it_handed_out():
    data, placed = _Counting(5), []
    prefetch = loop.DevicePrefetch(data, lambda batch: placed.append(int(batch["x"][0])) or batch, depth=2)
    assert prefetch.get_state() == {"next": 0} and placed == []
    first = next(prefetch)
    assert int(first["x"][0]) == 0 and placed == [0, 1, 2]  # two batches waiting behind the one handed out
    assert prefetch.get_state() == {"next": 1}  # a checkpoint now resumes at batch 1, not at 3
    assert [int(b["x"][0]) for b in prefetch] == [1, 2, 3, 4]
    assert prefetch.get_state() == {"next": 5}


def test_an_input_error_while_reading_ahead_hands_out_nothing():
    """The read of batch 2 fails while batch 1 is being handed out: batch 1 stays queued and the position stays
    before it, so a caller that saved now would not skip it."""
    data = _Counting(5)
    place = lambda batch: batch if int(batch["x"][0]) != 2 or data.next > 3 else 1 / 0  # noqa: E731
    prefetch = loop.DevicePrefetch(data, place, depth=1)
    assert int(next(prefetch)["x"][0]) == 0
    with pytest.raises(ZeroDivisionError):
        next(prefetch)
    assert prefetch.get_state() == {"next": 1}
    assert int(next(prefetch)["x"][0]) == 1  # the same batch, once the input recovers


def test_activations_are_pinned_to_the_batch_split_under_a_mesh():
    mesh = parallel.make_mesh("4x2")
    x = jnp.ones((8, 3, 4))
    under_mesh = jax.jit(lambda x: _with_mesh(mesh, layers.batch_sharded, x)).lower(x).as_text()
    alone = jax.jit(layers.batch_sharded).lower(x).as_text()
    assert 'sharding_constraint %arg0 <@mesh, [{"data"}, {}, {}]>' in under_mesh and "sharding_constraint" not in alone
    # Inside a shard_map over 'data' each device holds its own rows already: the towers run there unchanged.
    per_shard = jax.shard_map(layers.batch_sharded, mesh=mesh, in_specs=jax.P("data"), out_specs=jax.P("data"))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: _with_mesh(mesh, per_shard, x))(x)), np.ones((8, 3, 4)))


def _with_mesh(mesh, function, x):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return function(x)


def test_evaluation_forwards_are_traced_on_the_parameters_mesh(monkeypatch):
    """The embedders trace under the mesh their parameters live on, as the train step does, so evaluation keeps
    activations batch-split under FSDP and picks the same attention kernels."""
    seen = []
    monkeypatch.setattr(layers, "batch_sharded", lambda x: seen.append(dict(jax.sharding.get_abstract_mesh().shape)) or x)
    mesh = parallel.make_mesh("4x2")
    config = dataclasses.replace(tiny_config(), projection_dim=24)  # a config no other test traces
    model = SynergyCLIP(config)
    batch = {k: jnp.asarray(v) for k, v in random_batch(config, 8).items()}
    params = jax.device_put(model.init(jax.random.PRNGKey(0), batch)["params"], parallel.replicated(mesh))
    placed = parallel.global_batch({k: np.asarray(v) for k, v in batch.items()}, mesh)
    seen.clear()  # initialisation ran outside any mesh
    embed.embed_all_modalities(model, params, placed)
    embed.modality_embedder(model, params, "audio")(placed)
    assert seen and all(shape == {"data": 4, "model": 2} for shape in seen)


def test_evaluation_forwards_are_compiled_with_the_cpu_options():
    """The embedders' CPU programs, like the steps', are compiled without XLA:CPU's YNNPACK fusions
    (parallel.CPU_COMPILER_OPTIONS: the forward of the side-by-side towers runs 1.3x faster without), by one jit
    per platform that every call shares."""
    config = tiny_config()
    model = SynergyCLIP(config)
    batch = {k: jnp.asarray(v) for k, v in random_batch(config, 4).items()}
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    program = embed.all_modalities_program("cpu")
    assert program is embed.all_modalities_program("cpu")
    assert "__ynn_fusion" not in program.lower(model, params, batch).compile().as_text()
    one = embed.one_modality_program("cpu")
    assert "__ynn_fusion" not in one.lower(model, params, batch, "audio").compile().as_text()
    plain = jax.jit(embed._embed_one, static_argnames=("model", "modality"))
    assert "__ynn_fusion" in plain.lower(model, params, batch, "audio").compile().as_text(), "jax's default has them"
