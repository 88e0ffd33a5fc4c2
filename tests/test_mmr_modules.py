"""MMR building blocks, losses and label resize against PyTorch (fixtures from tests/fixtures/make_mmr_fixtures.py).

The fixtures hold the reference modules' state dicts (reference key names), inputs and outputs; the Flax modules
load the weights through `mmr.params_from_torch` and must agree within 1e-4.
"""

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synergy_jax import reconstruction_losses as rl
from synergy_jax.models import layers, mmr

FIXTURES = Path(__file__).parent / "fixtures" / "mmr"
TOL = 1e-4


def fixture_config() -> mmr.MMRConfig:
    c = dict(np.load(FIXTURES / "config.npz"))
    as_info = lambda a: tuple(tuple(int(v) for v in row) for row in a)  # noqa: E731
    return mmr.MMRConfig(
        encoder_dim=int(c["encoder_dim"]), encoder_bottleneck_dim=int(c["encoder_bottleneck_dim"]), encoder_dropout=0.0,
        decoder_dim=int(c["decoder_dim"]), decoder_depth=int(c["decoder_depth"]), decoder_heads=int(c["decoder_heads"]),
        decoder_dropout=0.0, decoder_ff_dim=int(c["decoder_ff_dim"]), txt_tokens=int(c["txt_tokens"]),
        text_length=int(c["text_length"]), vocab_size=int(c["vocab_size"]),
        img_size=mmr.final_size(as_info(c["img_decoder_layer_info"]))[0],
        aud_size=mmr.final_size(as_info(c["aud_decoder_layer_info"])),
        img_decoder_layer_info=as_info(c["img_decoder_layer_info"]),
        aud_decoder_layer_info=as_info(c["aud_decoder_layer_info"]), mlp_hidden_dim=int(c["mlp_hidden_dim"]),
    )  # fmt: skip


def load_task(missing: str):
    data = dict(np.load(FIXTURES / f"task_{missing}.npz"))
    state_dict = {k[3:]: v for k, v in data.items() if k.startswith("sd/")}
    config = fixture_config()
    params, stats = mmr.params_from_torch(state_dict, config, missing)
    first, second = mmr.TASKS[missing].inputs
    features = {first: jnp.asarray(data["input_a"]), second: jnp.asarray(data["input_b"])}
    return config, params, stats, features, data


def to_torch_layout(out: np.ndarray, missing: str) -> np.ndarray:
    if missing == "image":
        return out.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if missing == "audio":
        return out[..., 0]  # (B, frames, mel, 1) -> (B, frames, mel)
    return out


@pytest.mark.parametrize("missing", ["image", "audio", "text"])
def test_task_model_matches_reference_modules(missing):
    config, params, stats, features, data = load_task(missing)
    model = mmr.MMRModel(config, missing)
    # The converted tree must be exactly the model's parameter structure (no missing or extra leaves).
    init = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), features))
    assert jax.tree.map(jnp.shape, init["params"]) == jax.tree.map(np.shape, params)
    variables = {"params": params, **({"batch_stats": stats} if stats else {})}
    # train mode: what the reference runs (BatchNorm batch statistics; dropout is 0 in the fixture)
    out, _ = model.apply(variables, features, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(to_torch_layout(np.asarray(out), missing), data["output_train"], atol=TOL, rtol=TOL)
    out = model.apply(variables, features, train=False)
    np.testing.assert_allclose(to_torch_layout(np.asarray(out), missing), data["output_eval"], atol=TOL, rtol=TOL)


def test_pixel_shuffle_is_torch_channel_order():
    x = np.arange(2 * 3 * 5 * 12, dtype=np.float32).reshape(2, 3, 5, 12)  # NHWC, 12 = 3 channels x 2 x 2
    y = np.asarray(mmr.pixel_shuffle(jnp.asarray(x), 2))
    for c in range(3):
        for i in range(2):
            for j in range(2):
                np.testing.assert_array_equal(y[:, i::2, j::2, c], x[..., c * 4 + i * 2 + j])


def _cbam_in_numpy(x: np.ndarray, params: dict, channel_gate: str) -> np.ndarray:
    """CBAM written out from its definition (docs/reference.md bug 8), float64: the channel gate from the max- and
    average-pooled MLP outputs, then a 7x7 convolution (zero padding 3) over the channel max and mean."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    mlp = lambda pooled: np.maximum(pooled @ p["fc1"]["kernel"], 0) @ p["fc2"]["kernel"]  # noqa: E731
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    at_max, at_mean = mlp(x.max(axis=(1, 2), keepdims=True)), mlp(x.mean(axis=(1, 2), keepdims=True))
    gate = sigmoid(at_max) + sigmoid(at_mean) if channel_gate == "sum_of_sigmoids" else sigmoid(at_max + at_mean)
    x = x * gate
    maps = np.concatenate([x.max(-1, keepdims=True), x.mean(-1, keepdims=True)], -1)
    maps = np.pad(maps, [(0, 0), (3, 3), (3, 3), (0, 0)])
    kernel, (height, width) = p["spatial"]["kernel"][..., 0], x.shape[1:3]  # (7, 7, 2)
    logits = np.stack([np.stack([np.einsum("bijc,ijc->b", maps[:, i : i + 7, j : j + 7], kernel)
                                 for j in range(width)], -1) for i in range(height)], -2)  # fmt: skip
    return x * sigmoid(logits)[..., None]


@pytest.mark.parametrize("channel_gate", ["sum_of_sigmoids", "sigmoid_of_sum"])
def test_cbam_gates_match_their_definitions(channel_gate):
    """Both channel gates against the formula, with weights under which the two differ (checked as well)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6, 32))
    module = mmr.CBAM(16, channel_gate)
    params = module.init(jax.random.PRNGKey(1), x)
    expected = _cbam_in_numpy(np.asarray(x, np.float64), params, channel_gate)
    np.testing.assert_allclose(module.apply(params, x), expected, atol=1e-5, rtol=1e-5)
    other = "sigmoid_of_sum" if channel_gate == "sum_of_sigmoids" else "sum_of_sigmoids"
    assert np.abs(expected - _cbam_in_numpy(np.asarray(x, np.float64), params, other)).max() > 1e-2


@pytest.mark.parametrize("case", ["rgb", "spectrogram", "large"])
def test_ssim_matches_pytorch_msssim(case):
    data = np.load(FIXTURES / "losses.npz")
    x = jnp.asarray(data[f"ssim/{case}/x"].transpose(0, 2, 3, 1))
    y = jnp.asarray(data[f"ssim/{case}/y"].transpose(0, 2, 3, 1))
    np.testing.assert_allclose(rl.ssim(x, y), data[f"ssim/{case}/value"], atol=TOL)
    # size_average=False: one value per image, the mean over its channels
    np.testing.assert_allclose(rl.ssim_per_channel(x, y).mean(axis=1), data[f"ssim/{case}/per_channel"], atol=TOL)


def test_ssim_of_identical_images_is_one_and_psnr_matches_definition():
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3))
    np.testing.assert_allclose(rl.ssim(x, x), 1.0, atol=1e-5)
    y = x + 0.1
    np.testing.assert_allclose(rl.psnr_from_mse(rl.mse(x, y)), 20.0, atol=1e-4)  # 20 log10(1 / 0.1)


@pytest.mark.parametrize("case", ["down_image", "up_odd", "spectrogram", "same"])
def test_bicubic_resize_matches_torch(case):
    data = np.load(FIXTURES / "losses.npz")
    x = data[f"resize/{case}/x"].transpose(0, 2, 3, 1)
    expected = data[f"resize/{case}/y"].transpose(0, 2, 3, 1)
    out = rl.bicubic_resize(jnp.asarray(x), *expected.shape[1:3])
    np.testing.assert_allclose(out, expected, atol=TOL)
    # jax.image.resize (a = -0.5, antialiased) is a different function: the reason for the custom kernel
    if case == "down_image":
        assert not np.allclose(jax.image.resize(x, (x.shape[0], *expected.shape[1:]), "bicubic"), expected, atol=1e-3)


def test_token_metrics_exclude_pads_and_report_reference_figures():
    ids = jnp.array([[0, 5, 2, 1, 1]])
    mask = jnp.array([[1, 1, 1, 0, 0]])
    logits = jax.nn.one_hot(jnp.array([[0, 5, 3, 1, 1]]), 8) * 10.0  # 2 of 3 real tokens right, both pads right
    m = rl.token_metrics(logits, ids, mask)
    np.testing.assert_allclose(m["accuracy"], 2 / 3, atol=1e-6)
    np.testing.assert_allclose(m["accuracy_with_pads"], 4 / 5, atol=1e-6)
    nll = np.asarray(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])[0]
    np.testing.assert_allclose(m["ce"], nll[:3].mean(), rtol=1e-6)
    np.testing.assert_allclose(m["ce_with_pads"], nll.mean(), rtol=1e-6)


def test_masked_token_mean_ignores_pads_unless_reference():
    hidden = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_allclose(mmr.masked_token_mean(hidden, mask)[0], hidden[0, :2].mean(0))
    np.testing.assert_allclose(mmr.masked_token_mean(hidden, None)[0], hidden[0].mean(0))


def test_layer_info_must_chain():
    with pytest.raises(ValueError, match="upscaled by 2"):
        mmr.MMRConfig(img_decoder_layer_info=((2, 8, 4, 4), (2, 4, 16, 16)))


def test_text_decoder_block_is_torch_transformer_encoder_layer_in_init_and_dropout():
    """nn.TransformerEncoderLayer: xavier-uniform packed q/k/v (bound sqrt(6 / 4E)), U(+-1/sqrt(fan_in)) linears and
    feed-forward biases, zero attention biases; dropout also inside the feed-forward."""
    hidden, ff = 64, 256
    spec = layers.BlockSpec(num_heads=4, mlp_dim=ff, activation="gelu", layer_norm_eps=1e-5, init_std=0.02,
                            pre_norm=False, mlp_dropout=0.5, torch_init=True)  # fmt: skip
    block = layers.TransformerBlock(spec)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, hidden))
    params = nn.unbox(block.init(jax.random.PRNGKey(1), x, None, True))["params"]
    bounds = {("attn", "query", "kernel"): (6 / (4 * hidden)) ** 0.5, ("attn", "out", "kernel"): hidden**-0.5,
              ("mlp", "fc1", "kernel"): hidden**-0.5, ("mlp", "fc1", "bias"): hidden**-0.5,
              ("mlp", "fc2", "kernel"): ff**-0.5, ("mlp", "fc2", "bias"): ff**-0.5}  # fmt: skip
    for (a, b, c), bound in bounds.items():
        value = np.asarray(params[a][b][c])
        assert np.abs(value).max() <= bound and np.abs(value).max() > 0.9 * bound, (a, b, c)
        np.testing.assert_allclose(value.std(), bound / np.sqrt(3), rtol=0.15, err_msg=f"{a}/{b}/{c}")
    assert not np.asarray(params["attn"]["query"]["bias"]).any() and not np.asarray(params["attn"]["out"]["bias"]).any()

    def run(rate, seed):
        block = layers.TransformerBlock(dataclasses.replace(spec, mlp_dropout=rate))
        return block.apply({"params": params}, x, None, False, rngs={"dropout": jax.random.PRNGKey(seed)})

    assert not np.allclose(run(0.5, 0), run(0.5, 1))  # the feed-forward dropout is active in training
    np.testing.assert_array_equal(run(0.0, 0), run(0.0, 1))  # and the only randomness here
