"""The tri-modal InfoNCE: reference formula, global negatives = full batch, local negatives = mean of shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synergy_jax import losses, parallel
from synergy_jax.models.synergy import PAIRS
from synthetic import random_embeddings

LOG_SCALES = {"it": jnp.float32(2.6592), "ta": jnp.float32(1.3), "ai": jnp.float32(3.1)}


def numpy_clip_loss(a: np.ndarray, b: np.ndarray, log_scale: float) -> float:
    """docs/reference.md R1.4: L = exp(s) a b^T; (CE(L, arange) + CE(L^T, arange)) / 2, in float64."""
    logits = np.exp(log_scale) * a.astype(np.float64) @ b.astype(np.float64).T

    def ce(x):
        x = x - x.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(x).sum(axis=1)) - np.diag(x)))

    return 0.5 * (ce(logits) + ce(logits.T))


def test_pair_losses_equal_reference_formula():
    embeddings = random_embeddings(12)
    config = losses.LossConfig(alpha=0.5, beta=1.0, gamma=2.0)
    metrics = losses.tri_modal_loss_local(embeddings, LOG_SCALES, config, axis_name=None)
    expected = {pair: numpy_clip_loss(embeddings[a], embeddings[b], float(LOG_SCALES[pair])) for pair, (a, b) in PAIRS.items()}
    for pair in PAIRS:
        assert float(metrics[f"loss/{pair}"]) == pytest.approx(expected[pair], rel=1e-5)
    total = 0.5 * expected["it"] + 1.0 * expected["ta"] + 2.0 * expected["ai"]
    assert float(metrics["loss"]) == pytest.approx(total, rel=1e-5)


def test_accuracy_counts_correct_retrievals():
    identity = np.eye(4, dtype=np.float32)
    perfect = {"image": identity, "text": identity, "audio": identity}
    metrics = losses.tri_modal_loss_local(perfect, LOG_SCALES, losses.LossConfig(), axis_name=None)
    assert all(float(metrics[f"acc/{pair}"]) == 1.0 for pair in PAIRS)
    shuffled = {**perfect, "text": identity[[1, 0, 2, 3]]}  # two texts swapped: image->text and text->image miss 2/4
    metrics = losses.tri_modal_loss_local(shuffled, LOG_SCALES, losses.LossConfig(), axis_name=None)
    assert float(metrics["acc/it"]) == pytest.approx(0.5)
    assert float(metrics["acc/ai"]) == 1.0


def sharded_value_and_grad(mesh, config, embeddings):
    loss_fn = losses.tri_modal_loss(mesh, config)
    sharded = jax.device_put(embeddings, parallel.batch_sharding(mesh))

    @jax.jit
    def value_and_grad(embeddings, scales):
        return jax.value_and_grad(lambda e, s: loss_fn(e, s)["loss"], argnums=(0, 1))(embeddings, scales)

    return value_and_grad(sharded, LOG_SCALES)


def assert_gradients_close(actual, expected, rtol=1e-5):
    """rtol 1e-5 of the gradient's own scale: an element near zero is a sum of O(max) float32 terms whose order
    differs between the sharded and the full-batch program, so its error is a few ulps of the largest terms."""
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * float(np.max(np.abs(expected))))


def test_global_negatives_equal_full_batch_loss_and_gradients():
    mesh = parallel.make_mesh("8x1")
    embeddings = random_embeddings(32)
    config = losses.LossConfig(alpha=1.0, beta=0.7, gamma=1.3, negatives="global")
    loss, (grad_embeddings, grad_scales) = sharded_value_and_grad(mesh, config, embeddings)

    def full_batch(e, s):
        return losses.tri_modal_loss_local(e, s, config, axis_name=None)["loss"]

    expected_loss, (expected_ge, expected_gs) = jax.value_and_grad(full_batch, argnums=(0, 1))(embeddings, LOG_SCALES)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    for name in embeddings:
        assert_gradients_close(grad_embeddings[name], expected_ge[name])
    for pair in PAIRS:
        np.testing.assert_allclose(grad_scales[pair], expected_gs[pair], rtol=1e-5)


def test_local_negatives_equal_mean_of_per_shard_losses():
    mesh = parallel.make_mesh("8x1")
    embeddings = random_embeddings(32, seed=1)
    config = losses.LossConfig(negatives="local")
    loss, (grad_embeddings, _) = sharded_value_and_grad(mesh, config, embeddings)

    def mean_of_shards(e, s):
        shards = [{k: v[i * 4 : (i + 1) * 4] for k, v in e.items()} for i in range(8)]
        return sum(losses.tri_modal_loss_local(shard, s, config, axis_name=None)["loss"] for shard in shards) / 8

    expected_loss, expected_grads = jax.value_and_grad(mean_of_shards)(embeddings, LOG_SCALES)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    for name in embeddings:
        assert_gradients_close(grad_embeddings[name], expected_grads[name])
    global_loss, _ = sharded_value_and_grad(mesh, losses.LossConfig(negatives="global"), embeddings)
    assert float(global_loss) > float(loss)  # 32-way negatives are harder than 4-way ones


def test_local_batch_groups_give_the_reference_statistics_on_any_mesh():
    """local_batch=4: groups of 4 on 1 device (8 groups), 2 data shards (4 each) or 8 (1 each) = 8 shards of 4."""
    embeddings = random_embeddings(32, seed=3)
    config = losses.LossConfig(negatives="local", local_batch=4)

    def mean_of_groups(e, s):
        groups = [{k: v[i * 4 : (i + 1) * 4] for k, v in e.items()} for i in range(8)]
        plain = losses.LossConfig(negatives="local")
        return sum(losses.tri_modal_loss_local(g, s, plain, axis_name=None)["loss"] for g in groups) / 8

    expected_loss, expected_grads = jax.value_and_grad(mean_of_groups)(embeddings, LOG_SCALES)
    for mesh in (parallel.make_mesh("1x1", jax.devices()[:1]), parallel.make_mesh("2x4"), parallel.make_mesh("8x1")):
        loss, (grads, _) = sharded_value_and_grad(mesh, config, embeddings)
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
        for name in embeddings:
            assert_gradients_close(grads[name], expected_grads[name])
    assert config.contrastive_batch(microbatch=32, data_axis=2) == 4
    with pytest.raises(ValueError, match="local_batch=5 must divide the per-device microbatch 16"):
        losses.LossConfig(negatives="local", local_batch=5).contrastive_batch(microbatch=32, data_axis=2)
    with pytest.raises(ValueError, match="needs negatives='local'"):
        losses.LossConfig(negatives="global", local_batch=4)


def test_global_loss_is_the_same_on_a_mesh_with_a_model_axis():
    embeddings = random_embeddings(16, seed=2)
    config = losses.LossConfig()
    loss_8x1, _ = sharded_value_and_grad(parallel.make_mesh("8x1"), config, embeddings)
    loss_2x4, _ = sharded_value_and_grad(parallel.make_mesh("2x4"), config, embeddings)
    np.testing.assert_allclose(loss_2x4, loss_8x1, rtol=1e-6)


def test_unknown_negatives_kind():
    with pytest.raises(ValueError, match="negatives"):
        losses.LossConfig(negatives="semi-global")
