"""Retrieval, zero-shot and host contrastive losses against independent computations; MFU and launcher helpers."""

import numpy as np
import pytest

from synergy_jax import distributed, flops, losses
from synergy_jax.evaluators import contrastive, retrieval, zero_shot
from tests.synthetic import random_embeddings


def brute_force_ranks(queries, candidates):
    """Rank via a full argsort (descending), ties broken in the query's favour."""
    scores = queries @ candidates.T
    ranks = []
    for i, row in enumerate(scores):
        ranks.append(int(np.sum(row > row[i])))
    return np.array(ranks)


def test_ranks_and_recalls_match_brute_force():
    emb = random_embeddings(37, dim=6, seed=3)
    ranks = retrieval.positive_ranks(emb["image"], emb["text"], chunk=5)  # several chunks, last one short
    np.testing.assert_array_equal(ranks, brute_force_ranks(emb["image"], emb["text"]))
    metrics = retrieval.retrieval_metrics(emb)
    assert len([k for k in metrics if k.endswith("/R@1")]) == 6
    for k in (1, 5, 10):
        assert metrics[f"retrieval/image->text/R@{k}"] == pytest.approx(np.mean(ranks < k))
    assert metrics["retrieval/image->text/median_rank"] == np.median(ranks) + 1
    reverse = brute_force_ranks(emb["text"], emb["image"])
    assert metrics["retrieval/text->image/R@5"] == pytest.approx(np.mean(reverse < 5))


def test_perfect_and_shuffled_retrieval():
    x = np.eye(12, dtype=np.float32)
    assert retrieval.retrieval_metrics({"image": x, "text": x, "audio": x})["retrieval/audio->image/R@1"] == 1.0
    shifted = np.roll(x, 1, axis=0)  # every positive scores 0 while one other candidate scores 1
    metrics = retrieval.retrieval_metrics({"image": x, "text": shifted, "audio": x})
    assert metrics["retrieval/image->text/R@1"] == 0.0 and metrics["retrieval/image->text/R@5"] == 1.0


def test_contrastive_losses_match_the_training_loss():
    emb = random_embeddings(10, seed=1)
    scales = {"it": 2.0, "ta": 2.6592, "ai": 1.5}
    config = losses.LossConfig(alpha=0.5, beta=1.0, gamma=2.0)
    ours = contrastive.contrastive_losses(emb, scales, batch_size=5, weights=config.pair_weights)
    halves = [
        losses.tri_modal_loss_local({k: v[s : s + 5] for k, v in emb.items()},
                                    {k: np.float32(v) for k, v in scales.items()}, config, None)  # fmt: skip
        for s in (0, 5)
    ]
    for key in ("loss", "loss/it", "loss/ta", "loss/ai"):
        assert ours[key] == pytest.approx(np.mean([float(h[key]) for h in halves]), rel=1e-5)
    uneven = contrastive.contrastive_losses(emb, scales, batch_size=7)  # batches of 7 and 3, weighted by size
    first = losses.tri_modal_loss_local({k: v[:7] for k, v in emb.items()}, scales, losses.LossConfig(), None)
    last = losses.tri_modal_loss_local({k: v[7:] for k, v in emb.items()}, scales, losses.LossConfig(), None)
    assert uneven["loss/ta"] == pytest.approx((7 * float(first["loss/ta"]) + 3 * float(last["loss/ta"])) / 10, rel=1e-5)


def test_zero_shot_prompts_ensembles_and_accuracy():
    names = zero_shot.class_names_from_labels(["dog, puppy", "car_horn", "rain"])
    assert names == [["dog", "puppy"], ["car horn"], ["rain"]]
    prompts, owners = zero_shot.prompts_for_classes(names, ("a {}", "the {}."))
    assert prompts[:4] == ["a dog", "the dog.", "a puppy", "the puppy."] and owners.tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    rng = np.random.default_rng(0)
    prompt_emb = zero_shot.normalize(rng.normal(size=(len(prompts), 4)))
    classes = zero_shot.class_embeddings(prompt_emb, owners, 3)
    expected = prompt_emb[owners == 0].mean(0)
    np.testing.assert_allclose(classes[0], expected / np.linalg.norm(expected), atol=1e-6)
    queries = np.concatenate([classes, -classes[:1]])  # three correct, one pointing away from its class
    labels = np.array([0, 1, 2, 0, -1])  # -1: unknown label, excluded
    metrics = zero_shot.zero_shot_metrics(np.concatenate([queries, classes[:1]]), classes, labels, ks=(1, 2))
    assert metrics["top1"] == pytest.approx(3 / 4)
    assert metrics["per_class_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert metrics["chance"] == pytest.approx(1 / 3)


def test_peak_flops_and_mfu():
    assert flops.peak_flops_per_device("TPU v5 lite") == 197e12
    assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_per_device("cpu") is None
    assert flops.peak_flops_per_device("cpu", override_tflops=2.0) == 2e12
    assert flops.train_flops_per_sample(10, remat=False) == 30 and flops.train_flops_per_sample(10, remat=True) == 40
    assert flops.mfu(100.0, 30, 2, 1500.0) == pytest.approx(1.0)
    assert flops.mfu(100.0, 30, 2, None) is None


def test_distributed_arguments_from_flags_env_and_clusters():
    assert distributed.distributed_arguments(env={}) is None
    assert distributed.distributed_arguments("h:1", 2, 1, env={}) == dict(
        coordinator_address="h:1", num_processes=2, process_id=1
    )
    with pytest.raises(ValueError, match="needs --num_processes"):
        distributed.distributed_arguments("h:1", env={})
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.distributed_arguments(env=env)["process_id"] == 3
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        distributed.distributed_arguments(env={"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "2"})
    assert distributed.distributed_arguments(env={"TPU_WORKER_HOSTNAMES": "t0,t1"}) == {}
    assert distributed.distributed_arguments(env={"TPU_WORKER_HOSTNAMES": "t0"}) is None  # a single-host TPU VM
    assert distributed.distributed_arguments(env={"SLURM_NTASKS": "8"}) == {}
    assert distributed.distributed_arguments(env={"SLURM_NTASKS": "1"}) is None


def test_reconstruction_samples_carry_their_own_scores():
    """The shown reconstructions come in their arrival order while the metric columns are sorted by row: each shown
    row's PSNR/SSIM and text must be its own (batches arrive with row ids descending here)."""
    import jax
    import jax.numpy as jnp

    from synergy_jax import parallel
    from synergy_jax.evaluators import reconstruction

    rng = np.random.default_rng(0)
    rows = 8
    target = rng.random((rows, 4, 4, 3)).astype(np.float32)
    recon = (target + rng.normal(0, 0.02, target.shape) * np.arange(1, rows + 1)[:, None, None, None]).astype(np.float32)
    batches = [{"row_id": np.array([7 - 2 * i, 6 - 2 * i]), "valid": np.ones(2, bool),
                "target": target[2 * i : 2 * i + 2], "recon": recon[2 * i : 2 * i + 2],
                "input_ids": np.full((2, 3), 2 * i)[:, :] + np.arange(2)[:, None], "attention_mask": np.ones((2, 3), np.int32)}
               for i in range(rows // 2)]  # fmt: skip

    def eval_fn(batch):
        mse = jnp.mean(jnp.square(batch["recon"] - batch["target"]), axis=(1, 2, 3))
        return {"recon": batch["recon"], "target": batch["target"], "mse": mse, "ssim": -mse}

    stats = {"mean_target": target.mean(0)}
    mesh = parallel.make_mesh("1x1", jax.devices()[:1])
    _, samples = reconstruction.evaluate(eval_fn, batches, mesh, "image", stats, num_samples=4)
    own = np.mean(np.square(samples["recon"] - samples["target"]), axis=(1, 2, 3))
    np.testing.assert_allclose(samples["mse"], own, rtol=1e-6)
    np.testing.assert_allclose(samples["ssim"], -own, rtol=1e-6)
    np.testing.assert_array_equal(samples["input_ids"][:, 0], [0, 1, 2, 3])  # the shown rows' own text
