"""Mesh parsing and sharding rules: parameters really are split the way the rules say."""

import sys

import jax
import pytest

from synergy_jax import parallel, train
from synergy_jax.models import synergy
from helpers import free_port, job_processes, process_output
from synthetic import TEXT_LENGTH, tiny_config


@pytest.mark.parametrize(
    "spec, expected", [("8x1", (8, 1)), ("4x2", (4, 2)), ("2x4", (2, 4)), ("-1x1", (8, 1)), ("2x-1", (2, 4)), ("1x8", (1, 8))]
)
def test_parse_mesh(spec, expected):
    assert parallel.parse_mesh(spec, 8) == expected
    mesh = parallel.make_mesh(spec)
    assert dict(mesh.shape) == {"data": expected[0], "model": expected[1]}


@pytest.mark.parametrize("spec, message", [("4x1", "this job has 8"), ("3x-1", "not divisible"), ("8", "DxM"), ("axb", "DxM"), ("0x8", "at least 1"), ("-1x-1", "one axis at most"),
                                           ("-2x4", "at least 1")])
def test_bad_mesh_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parallel.parse_mesh(spec, 8)


def test_unknown_rules():
    with pytest.raises(ValueError, match="unknown sharding rules"):
        parallel.param_shardings({}, parallel.make_mesh("8x1"), "zero3")


def born_sharded_state(mesh_spec: str, rules: str):
    config = tiny_config()
    model = synergy.SynergyCLIP(config)
    tx = train.make_optimizer(train.optimizer_config())
    example = synergy.example_batch(config, 1, TEXT_LENGTH)
    return train.create_train_state(model, tx, parallel.make_mesh(mesh_spec), rules, example, jax.random.PRNGKey(0))


def spec_and_shard(array):
    return array.sharding.spec, array.addressable_shards[0].data.shape


def test_tensor_parallel_splits_attention_and_mlp_over_model():
    state, shardings = born_sharded_state("2x4", "tp")
    layer = state.params["vision_model"]["encoder"]["layer_0"]
    # (embed 32, heads 4, kv 8): heads split 4 ways (column split); out kernel (heads, kv, embed): row split.
    assert spec_and_shard(layer["attn"]["query"]["kernel"]) == (jax.P(None, "model", None), (32, 1, 8))
    assert spec_and_shard(layer["attn"]["out"]["kernel"]) == (jax.P("model", None, None), (1, 8, 32))
    assert spec_and_shard(layer["mlp"]["fc1"]["kernel"]) == (jax.P(None, "model"), (32, 16))
    assert spec_and_shard(layer["mlp"]["fc2"]["kernel"]) == (jax.P("model", None), (16, 32))
    assert spec_and_shard(state.params["text_model"]["word_embeddings"]["embedding"]) == (jax.P("model", None), (32, 32))
    # the optimizer moments follow their parameters
    mu = state.opt_state[0].mu["vision_model"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
    assert spec_and_shard(mu) == (jax.P(None, "model"), (32, 16))
    assert state.params["logit_scale_it"].sharding.is_fully_replicated


def test_fsdp_splits_large_kernels_over_data():
    state, _ = born_sharded_state("8x1", "fsdp")
    layer = state.params["audio_model"]["encoder"]["layer_0"]
    assert spec_and_shard(layer["mlp"]["fc1"]["kernel"]) == (jax.P("data", None), (4, 64))
    assert spec_and_shard(layer["attn"]["key"]["kernel"]) == (jax.P("data", None, None), (4, 4, 8))
    assert spec_and_shard(state.params["audio_model"]["position_embedding"]) == (jax.P(None, "data"), (18, 4))
    # no large parameter sits whole on one device (the tiny q/k/v biases (heads, kv) have no embed axis)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        if leaf.size >= 512:
            assert not leaf.sharding.is_fully_replicated, jax.tree_util.keystr(path)


def test_undivisible_dimensions_stay_whole():
    mesh = parallel.make_mesh("8x1")
    assert parallel.logical_to_mesh_spec(("vocab", "embed"), (3, 20), {"embed": "data"}, mesh) == jax.P(None, None)
    assert parallel.logical_to_mesh_spec(("embed", "embed"), (16, 16), {"embed": "data"}, mesh) == jax.P("data", None)


def test_tensor_parallel_falls_back_to_embed_for_undivisible_matrices():
    """RoBERTa's 50265-row vocabulary and 12 heads on a model axis of 8 would otherwise sit whole on every device."""
    mesh = parallel.make_mesh("1x8")
    tp, fallback = parallel.RULES["tp"], parallel.FALLBACK_RULES["tp"]
    assert parallel.logical_to_mesh_spec(("vocab", "embed"), (50265, 768), tp, mesh, fallback) == jax.P(None, "model")
    assert parallel.logical_to_mesh_spec(("embed", "heads", "kv"), (768, 12, 64), tp, mesh, fallback) == jax.P("model", None, None)
    assert parallel.logical_to_mesh_spec(("embed", "heads", "kv"), (768, 16, 64), tp, mesh, fallback) == jax.P(None, "model", None)
    assert parallel.logical_to_mesh_spec(("embed",), (768,), tp, mesh, fallback) == jax.P(None)  # vectors stay whole
    assert parallel.logical_to_mesh_spec(("vocab", "embed"), (50265, 768), tp, mesh) == jax.P(None, None)


TWO_PEERS = """
import sys, time
import jax, jax.numpy as jnp
from synergy_jax import cli, distributed, parallel
from synergy_jax.errors import SetupError
process, port, peer_1 = int(sys.argv[1]), sys.argv[2], sys.argv[3]

def job():
    distributed.initialize(distributed.distributed_arguments(f"127.0.0.1:{port}", 2, process))
    mesh = parallel.make_mesh("2x2")
    if process == 1 and peer_1 == "late":
        time.sleep(35)  # a slower compile of the first step: more than gloo's 30 s to join a new communicator
    if process == 1 and peer_1 == "failing":
        raise SetupError("process 1: its data folder is missing")
    x = jax.device_put(jnp.arange(16.0).reshape(4, 4), jax.NamedSharding(mesh, jax.P("data", "model")))
    total = jax.jit(jnp.sum, out_shardings=jax.NamedSharding(mesh, jax.P()))(x)
    print("total", float(total.addressable_data(0)))

cli.run_or_exit(job)
"""


def run_two_peers(tmp_path, peer_1: str, hang_guard: int) -> tuple[list, list[str]]:
    """Two processes x 2 CPU devices summing one array across both; process 1 is `late` or `failing`."""
    port = free_port()
    commands = [[sys.executable, "-c", TWO_PEERS, str(i), str(port), peer_1] for i in range(2)]
    with job_processes(commands, devices=2, cwd=tmp_path) as processes:
        for process in processes:
            process.wait(timeout=hang_guard)
    return processes, [process_output(tmp_path, i) for i in range(2)]


def test_a_peer_late_to_the_first_collective_is_waited_for(tmp_path):
    """Process 1 reaches the first cross-process collective 35 s after process 0. The mesh opened the
    communicators while the processes were in step, so the early one waits instead of failing."""
    processes, outputs = run_two_peers(tmp_path, "late", hang_guard=300)  # a hang guard, not a speed limit
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
        assert "total 120.0" in output


def test_one_failing_process_stops_the_others_within_seconds(tmp_path):
    """Process 1 fails its setup while process 0 waits for it in a collective. Each exits with its code and a
    message, instead of both waiting out JAX's 5-minute shutdown barrier and aborting."""
    processes, (waiting, failing) = run_two_peers(tmp_path, "failing", hang_guard=200)  # under the barrier's 300 s
    assert processes[1].returncode == 2 and "error: process 1: its data folder is missing" in failing
    assert processes[0].returncode == 1, waiting[-3000:]
    assert "another process of the job failed first" in waiting
