"""The sharded train step: mesh invariance, accumulation semantics, optimizer, non-finite handling."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synergy_jax import losses, mmr_train, parallel, train
from synergy_jax.models import mmr, synergy
from synthetic import TEXT_LENGTH, random_batch, tiny_config

# Meshes differ only in reduction order (float32 sums of different shapes). AdamW's step m/(sqrt(v)+eps) is
# scale-free, so with the reference eps 1e-8 entries whose true gradient is ~0 (attention key biases: exactly 0 in
# exact arithmetic; embedding rows of tokens that barely matter) take full-size steps in a direction set by rounding
# noise. The mesh tests therefore use eps 1e-4 (still far below the typical |g| ~ 1e-2 of this model), which makes
# noise-level gradients give noise-level updates and lets the comparison be tight.
MESH_TOLERANCE = dict(rtol=1e-4, atol=1e-6)
TEST_EPS = 1e-4


def setup_run(mesh, config, rules="tp", accum_steps=1, learning_rate=1e-3, negatives="global", seed=0):
    model = synergy.SynergyCLIP(config)
    optimizer = train.optimizer_config()
    optimizer.update(learning_rate=learning_rate, eps=TEST_EPS)
    tx = train.make_optimizer(optimizer)
    example = synergy.example_batch(config, 1, TEXT_LENGTH)
    state, shardings = train.create_train_state(model, tx, mesh, rules, example, jax.random.PRNGKey(seed))
    step = train.make_train_step(model, tx, losses.LossConfig(negatives=negatives), mesh, shardings, accum_steps)
    return model, tx, state, step


def run_steps(mesh_spec, steps=5, rules="tp"):
    devices = jax.devices()[:1] if mesh_spec == "1x1" else None
    mesh = parallel.make_mesh(mesh_spec, devices)
    config = tiny_config()
    _, _, state, step = setup_run(mesh, config, rules)
    history = []
    for i in range(steps):
        state, metrics = step(state, random_batch(config, 16, seed=i))
        history.append(float(metrics["loss"]))
    return jax.device_get(state.params), history


@functools.cache
def reference_run():
    return run_steps("1x1")


@pytest.mark.parametrize("mesh_spec, rules", [("8x1", "tp"), ("4x2", "tp"), ("2x4", "fsdp_tp")])
def test_five_steps_give_the_same_parameters_on_every_mesh(mesh_spec, rules):
    """With dropout active: partitionable threefry gives the same masks whatever the sharding."""
    params, history = run_steps(mesh_spec, rules=rules)
    expected_params, expected_history = reference_run()
    np.testing.assert_allclose(history, expected_history, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **MESH_TOLERANCE), params, expected_params)


@pytest.mark.parametrize("negatives", ["global", "local"])
def test_accumulated_microbatches_equal_the_mean_of_their_gradients(negatives):
    """k accumulated microbatches = one update with the mean of the k microbatch gradients, where microbatch i is
    rows i, i+k, ... and each microbatch is its own contrastive batch (negatives never cross microbatches)."""
    mesh = parallel.make_mesh("4x2")
    config = tiny_config(dropout=False)
    k, batch = 2, random_batch(config, 16, seed=3)
    model, tx, state, step = setup_run(mesh, config, accum_steps=k, negatives=negatives)
    params0 = jax.device_get(state.params)
    new_state, metrics = step(state, batch)

    loss_config = losses.LossConfig(negatives=negatives)

    def microbatch_loss(params, microbatch):
        embeddings, scales = model.apply({"params": params}, microbatch)
        if negatives == "global":
            return losses.tri_modal_loss_local(embeddings, scales, loss_config, axis_name=None)["loss"]
        shards = [jax.tree.map(lambda x: x[i * 2 : (i + 1) * 2], embeddings) for i in range(4)]  # 4 data shards
        return sum(losses.tri_modal_loss_local(s, scales, loss_config, None)["loss"] for s in shards) / 4

    # Device d holds rows 4d..4d+3; microbatch i takes rows i::k, i.e. rows {4d+i, 4d+i+2} from device d.
    microbatches = [jax.tree.map(lambda x: x[i::k], batch) for i in range(k)]
    values_and_grads = [jax.jit(jax.value_and_grad(microbatch_loss))(params0, mb) for mb in microbatches]
    mean_grads = jax.tree.map(lambda *g: sum(g) / k, *(grads for _, grads in values_and_grads))
    # The reported loss is the mean of the microbatch losses, each over its own negatives only; with global
    # negatives that is below the loss of one 16-sample contrastive batch (more negatives are harder).
    microbatch_losses = [float(value) for value, _ in values_and_grads]
    assert float(metrics["loss"]) == pytest.approx(np.mean(microbatch_losses), rel=1e-5)
    if negatives == "global":
        assert float(metrics["loss"]) < float(microbatch_loss(params0, batch))
    # One AdamW step from zero moments is nearly scale-free (g / (|g| + eps)), so check the first moment too:
    # mu = (1 - b1) * the mean gradient (a sum instead of a mean would double it).
    # Tolerance: rtol 1e-4 plus 1e-5 of the largest gradient (leaves that are 0 in exact arithmetic, e.g. key biases,
    # hold ~1e-12 of rounding noise that differs between the sharded and the unsharded program).
    mu, expected_mu = jax.device_get(new_state.opt_state[0].mu), jax.tree.map(lambda g: 0.1 * g, mean_grads)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected_mu))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), mu, expected_mu)
    updates, _ = tx.update(mean_grads, tx.init(params0), params0)
    expected = optax.apply_updates(params0, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), jax.device_get(new_state.params), expected)
    assert int(new_state.step) == 1


def test_non_finite_loss_is_reported_and_not_applied():
    mesh = parallel.make_mesh("8x1")
    config = tiny_config()
    _, _, state, step = setup_run(mesh, config)
    before = jax.device_get(state.params)
    batch = random_batch(config, 16)
    batch["audio"][3, 5, 7] = np.nan
    state, metrics = step(state, batch)
    assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
    state, metrics = step(state, random_batch(config, 16))  # and the run can go on
    assert float(metrics["nonfinite"]) == 0.0 and int(state.step) == 1


@pytest.mark.parametrize("mesh_spec, accum_steps", [("1x1", 1), ("8x1", 2)])
def test_the_compiled_step_updates_the_donated_state_in_place_without_copying_it(mesh_spec, accum_steps):
    """On CPU the non-finite guard branches (`lax.cond`) instead of selecting between the new and the old state,
    which made XLA copy every parameter or optimizer-state buffer of the donated state each step."""
    mesh = parallel.make_mesh(mesh_spec, jax.devices()[:1] if mesh_spec == "1x1" else None)
    config = tiny_config()
    _, _, state, step = setup_run(mesh, config, accum_steps=accum_steps)
    program = step.lower(state, random_batch(config, 16)).compile().as_text()
    donated = r'%([\w.\-]+) = \S+ parameter\(\d+\)[^\n]*op_name="args\[0\]\.(?:params|opt_state)'
    state = set(re.findall(donated, program))
    copied = [name for name in re.findall(r"copy\(%([\w.\-]+)\)", program) if name in state]
    assert len(state) > 100 and "input_output_alias" in program and not copied, copied[:5]


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_update_if_finite_updates_or_keeps_the_whole_state_on_every_platform(platform):
    """The CPU branch and the select used elsewhere (traced here on CPU) agree: all leaves updated, or none."""
    state = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2)), "step": jnp.asarray(4)}
    update = functools.partial(jax.tree.map, lambda leaf: leaf + 1)
    guarded = jax.jit(lambda finite, state: train.update_if_finite(finite, update, state, platform))
    for finite, expected in ((True, update(state)), (False, state)):
        jax.tree.map(np.testing.assert_array_equal, guarded(jnp.asarray(finite), state), expected)


def test_metrics_report_losses_accuracies_temperatures_and_grad_norm():
    mesh = parallel.make_mesh("8x1")
    config = tiny_config()
    _, _, state, step = setup_run(mesh, config)
    _, metrics = step(state, random_batch(config, 16))
    for pair in ("it", "ta", "ai"):
        assert 0 <= float(metrics[f"acc/{pair}"]) <= 1 and float(metrics[f"loss/{pair}"]) > 0
        assert float(metrics[f"logit_scale/{pair}"]) == pytest.approx(np.exp(2.6592), rel=1e-5)
    assert float(metrics["grad_norm"]) > 0


def test_adamw_is_torch_adamw():
    """optax adamw with the reference settings = torch.optim.AdamW's update rule, written out."""
    config = train.optimizer_config()
    config.learning_rate = 1e-2
    tx = train.make_optimizer(config)
    params = {"w": jnp.array([[0.5, -1.0], [2.0, 0.1]]), "b": jnp.array([0.3, -0.2])}
    grads = [{"w": jnp.array([[0.1, 0.2], [-0.3, 0.4]]) * (t + 1), "b": jnp.array([0.05, -0.5]) / (t + 1)} for t in range(3)]
    state = tx.init(params)
    p = jax.tree.map(np.asarray, params)
    m = jax.tree.map(np.zeros_like, p)
    v = jax.tree.map(np.zeros_like, p)
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.01
    for t, g in enumerate(grads, start=1):
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        for k in p:  # torch: p *= 1 - lr*wd; m, v moments; p -= lr * m_hat / (sqrt(v_hat) + eps)
            p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * np.asarray(g[k])
            v[k] = b2 * v[k] + (1 - b2) * np.asarray(g[k]) ** 2
            p[k] = p[k] - lr * (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), jax.device_get(params), p)


def test_weight_decay_mask_and_schedule_options():
    config = train.optimizer_config()
    config.update(learning_rate=1.0, weight_decay=0.1, weight_decay_on="matrices")
    tx = train.make_optimizer(config)
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,)), "logit_scale": jnp.float32(2.6592)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["kernel"], 0.9)
    np.testing.assert_allclose(new["bias"], 1.0)
    np.testing.assert_allclose(new["logit_scale"], 2.6592)

    config = train.optimizer_config()
    config.update(schedule="warmup_cosine", warmup_steps=10, total_steps=110, learning_rate=1e-3)
    schedule = train.learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1e-3) and float(schedule(110)) < 1e-9
    config.total_steps = 5
    with pytest.raises(ValueError, match="total_steps"):
        train.learning_rate_schedule(config)

    # With b1 = b2 = 0 and eps = 1 the AdamW step is -lr * g / (|g| + 1) per element, which depends on g's scale:
    # the clipped gradient (300, 400) -> (0.6, 0.8) gives a different step from the unclipped one.
    config = train.optimizer_config()
    config.update(b1=0.0, b2=0.0, eps=1.0, weight_decay=0.0)
    params, grads = {"w": jnp.zeros(2)}, {"w": jnp.array([300.0, 400.0])}
    for clip, g in ((1.0, np.array([0.6, 0.8])), (0.0, np.array([300.0, 400.0]))):
        config.clip_grad_norm = clip
        tx = train.make_optimizer(config)
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(updates["w"], -5e-6 * g / (g + 1.0), rtol=1e-5)


def test_pretrained_towers_are_placed_in_their_shardings():
    mesh = parallel.make_mesh("2x4")
    config = tiny_config()
    model = synergy.SynergyCLIP(config)
    tx = train.make_optimizer(train.optimizer_config())
    example = synergy.example_batch(config, 1, TEXT_LENGTH)
    fresh, _ = train.create_train_state(model, tx, mesh, "tp", example, jax.random.PRNGKey(0))
    audio = jax.tree.map(lambda x: np.full(x.shape, 0.5, np.float32), jax.device_get(fresh.params["audio_model"]))
    state, shardings = train.create_train_state(
        model, tx, mesh, "tp", example, jax.random.PRNGKey(0), pretrained={"audio_model": audio}
    )
    kernel = state.params["audio_model"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding == shardings.params["audio_model"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
    np.testing.assert_array_equal(kernel, 0.5)
    bad = jax.tree.map(lambda x: x[..., :1], audio)
    with pytest.raises(ValueError, match="does not match"):
        train.create_train_state(model, tx, mesh, "tp", example, jax.random.PRNGKey(0), pretrained={"audio_model": bad})


def test_pretrained_groups_are_not_drawn_at_random():
    """The given groups enter the initialiser as arguments, so XLA drops the random draws they replace: threefry's
    xor rounds remain only for the projections and temperatures (Base's towers: 4.3-4.8 s instead of 24-28 s on CPU)."""
    config = tiny_config()
    model = synergy.SynergyCLIP(config)
    tx = train.make_optimizer(train.optimizer_config())
    example = synergy.example_batch(config, 1, TEXT_LENGTH)
    abstract = train.abstract_train_state(model, tx, example).params
    init = train.initialiser(model, tx, example, jax.random.PRNGKey(1))

    def xor_rounds(placed) -> int:
        return len(re.findall(r" xor\(", jax.jit(init).lower(jax.random.PRNGKey(0), placed).compile().as_text()))

    towers = {name: jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract[name])
              for name in ("vision_model", "text_model", "audio_model")}  # fmt: skip
    assert 0 < xor_rounds(towers) < xor_rounds({}) / 5


def test_batch_must_split_over_data_axis_and_microbatches():
    mesh = parallel.make_mesh("4x2")
    train.check_batch(16, mesh, 2)
    with pytest.raises(ValueError, match="divisible by data-axis size 4 x accumulation steps 3"):
        train.check_batch(16, mesh, 3)


def test_cpu_steps_are_compiled_without_ynnpack_fusions():
    """XLA:CPU's YNNPACK fusions slow the step down (parallel.CPU_COMPILER_OPTIONS): the jobs' CPU steps have none,
    while a plain jit of a matmul still has them (jax's default; once it is not, the option can go)."""
    mesh = parallel.make_mesh("1x1", jax.devices()[:1])
    config = tiny_config()
    _, _, state, step = setup_run(mesh, config)
    batch = random_batch(config, 16)
    assert "__ynn_fusion" not in step.lower(state, batch).compile().as_text()
    plain = jax.jit(lambda a, b: jnp.exp(a @ b))
    ones = jnp.ones((64, 64))
    assert "__ynn_fusion" in plain.lower(ones, ones).compile().as_text()


def test_compiler_options_are_the_cpu_ones_only_on_cpu():
    class Device:
        def __init__(self, platform):
            self.platform = platform

    class Mesh:
        def __init__(self, platform):
            self.devices = np.array([Device(platform)])

    assert parallel.compiler_options(Mesh("cpu")) == parallel.CPU_COMPILER_OPTIONS
    assert parallel.compiler_options(Mesh("tpu")) is None
    assert parallel.compiler_options(Mesh("gpu")) is None


def test_initialisers_draw_with_gpu_kernels_and_leave_the_setting_as_it_was(monkeypatch):
    """Each initialiser (pre-training's and MMR's) is traced with threefry lowered to GPU kernels, which cut Base's
    state creation on an H200 from 88-91 s to 11.7-12.7 s with the same bits (docs/performance.md); afterwards the
    setting is back as it was, so a train step's dropout keeps XLA's fused draws."""
    seen = []

    def recording(name, function):
        def traced(*args):
            seen.append((name, jax.config.jax_threefry_gpu_kernel_lowering))
            return function(*args)

        return traced

    initialiser, init_variables = train.initialiser, mmr_train.init_variables
    monkeypatch.setattr(train, "initialiser", lambda *args: recording("pretrain", initialiser(*args)))
    monkeypatch.setattr(mmr_train, "init_variables", recording("mmr", init_variables))
    config = tiny_config()
    model, tx = synergy.SynergyCLIP(config), train.make_optimizer(train.optimizer_config())
    example = synergy.example_batch(config, 1, TEXT_LENGTH)
    mesh = parallel.make_mesh("2x4")
    train.create_train_state(model, tx, mesh, "replicate", example, jax.random.PRNGKey(0))
    decoder = dict(decoder_dim=16, decoder_depth=1, decoder_heads=2, decoder_ff_dim=32, txt_tokens=8)
    mmr_config = mmr.MMRConfig(encoder_bottleneck_dim=8, text_length=TEXT_LENGTH, vocab_size=config.text.vocab_size,
                               **decoder)
    mmr_train.create_state(mmr.MMRModel(mmr_config, "text"), tx, config, mesh, jax.random.PRNGKey(0))
    assert seen == [("pretrain", True), ("mmr", True)]
    assert jax.config.jax_threefry_gpu_kernel_lowering is False

    def failing_initialiser():
        raise RuntimeError("an initialiser that fails")

    with pytest.raises(RuntimeError, match="an initialiser that fails"):
        parallel.initialise(failing_initialiser, None)
    assert jax.config.jax_threefry_gpu_kernel_lowering is False
