"""Missing Modality Reconstruction (MMR) models: two frozen modalities in, the third reconstructed.

docs/reference.md R4.1-4.3. The three tasks, named by the *missing* modality:

    audio   image + text  -> (B, 256, 64) AST features      fusion from pooled outputs (CLIP post-LN CLS, RoBERTa pooler)
    image   text + audio  -> (B, 128, 128, 3) image in [0,1] fusion from token means of the last hidden states
    text    image + audio -> (B, 32, vocab) token logits    fusion from token means of the last hidden states

Each modality's feature goes through a bias-free Linear to `encoder_dim`; the two are summed, then the residual
bottleneck `MultiModalEncoder` maps to `decoder_dim`, and a decoder reconstructs. Everything is NHWC; where torch's
NCHW order is visible in the function (PixelShuffle's channel order, `Unflatten` to (C, H, W), LayerNorm over
(C, H, W), the spatial MLP over row-major H*W) the port reproduces it, so the reference's weights load with
`params_from_torch` (attribute names as in the reference's model.py) and give the same outputs.

Deviations from the reference are options, default fixed (see docs/mmr.md): the text token mean excludes pads
(`text_mean_over_pads=True` is the reference); the final decoder layer reads its channels and upscale from the last
`layer_info` entry instead of a leaked loop variable (same numbers for every reference config). The CBAM's sum of
two sigmoids is kept as written (`channel_gate='sum_of_sigmoids'`; 'sigmoid_of_sum' is the standard CBAM).
This module runs the frozen towers (`encoder_features`) but never reads files.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synergy_jax.models import layers, param_groups
from synergy_jax.models.audio import ASTTower
from synergy_jax.models.synergy import SynergyConfig
from synergy_jax.models.text import RobertaTower
from synergy_jax.models.vision import CLIPVisionTower

LayerInfo = tuple[tuple[int, int, int, int], ...]  # (upscale, channels, height, width) per stage


@dataclasses.dataclass(frozen=True)
class Task:
    """One MMR direction: which two modalities feed it and how their tower outputs are pooled."""

    missing: str
    inputs: tuple[str, str]
    pooling: str  # 'pooled' (the towers' pooled outputs) or 'mean' (mean over the last hidden state's tokens)


TASKS = {
    "audio": Task("audio", ("image", "text"), "pooled"),  # IMG_TXT_2_AUD
    "image": Task("image", ("text", "audio"), "mean"),  # TXT_AUD_2_IMG
    "text": Task("text", ("image", "audio"), "mean"),  # IMG_AUD_2_TXT
}
MAPPER_OF = {"image": "img_dim_mapper", "text": "txt_dim_mapper", "audio": "aud_dim_mapper"}


@dataclasses.dataclass(frozen=True)
class MMRConfig:
    """ReconstructionConfig (config.py:120-196, 310-374) without the unused fields; see experiments/configs/mmr.py."""

    encoder_dim: int = 768
    encoder_bottleneck_dim: int = 128
    encoder_dropout: float = 0.1
    decoder_dim: int = 512
    decoder_depth: int = 4
    decoder_heads: int = 8
    decoder_dropout: float = 0.1
    decoder_ff_dim: int = 2048  # nn.TransformerEncoderLayer's default; the config's decoder_mlp_dim is unused
    txt_tokens: int = 96
    text_length: int = 32
    vocab_size: int = 50265
    img_size: int = 128
    img_channels: int = 3
    aud_size: tuple[int, int] = (256, 64)
    aud_channels: int = 1
    img_decoder_layer_info: LayerInfo = ((2, 1024, 4, 4), (2, 512, 8, 8), (2, 256, 16, 16), (2, 128, 32, 32), (2, 64, 64, 64))
    aud_decoder_layer_info: LayerInfo = ((2, 1024, 8, 2), (2, 512, 16, 4), (2, 256, 32, 8), (2, 128, 64, 16), (2, 64, 128, 32))
    mlp_hidden_dim: int = 3072  # Recon_Block's spatial MLP
    cbam_reduction: int = 16
    channel_gate: str = "sum_of_sigmoids"  # the reference's CBAM; 'sigmoid_of_sum' = standard CBAM
    text_mean_over_pads: bool = False  # True: the reference's mean over all 32 positions, pads included
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.channel_gate not in ("sum_of_sigmoids", "sigmoid_of_sum"):
            raise ValueError(f"channel_gate must be 'sum_of_sigmoids' or 'sigmoid_of_sum', got {self.channel_gate!r}")
        for name in ("img_decoder_layer_info", "aud_decoder_layer_info"):
            check_layer_info(getattr(self, name), name)

    def output_shape(self, missing: str) -> tuple[int, ...]:
        """Per-example shape of the reconstruction (NHWC for grids, (length, vocab) for text)."""
        if missing == "image":
            return (self.img_size, self.img_size, self.img_channels)
        if missing == "audio":
            return (*self.aud_size, self.aud_channels)
        return (self.text_length, self.vocab_size)


def check_layer_info(info: Sequence[Sequence[int]], name: str) -> None:
    """Each stage must be the previous one upscaled by its factor; fails early with the offending entries."""
    if not info:
        raise ValueError(f"{name} is empty")
    for i, ((up, _, h, w), (_, _, out_h, out_w)) in enumerate(zip(info, info[1:])):
        scale = max(up, 1)
        if (h * scale, w * scale) != (out_h, out_w):
            raise ValueError(f"{name}[{i}] {tuple(info[i])} upscaled by {scale} does not give {tuple(info[i + 1])}")


def final_size(info: LayerInfo) -> tuple[int, int]:
    up, _, h, w = info[-1]
    return h * up, w * up


# ------------------------------------------------------------------------------------------------ torch inits


def dense(features: int, fan_in: int, use_bias: bool = True, name: str | None = None, **kw: Any) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, kernel_init=layers.torch_kernel_init(), bias_init=layers.torch_bias_init(fan_in),
                    param_dtype=jnp.float32, name=name, **kw)  # fmt: skip


def conv(features: int, kernel: int, fan_in: int, use_bias: bool = True, name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), padding=kernel // 2, use_bias=use_bias, kernel_init=layers.torch_kernel_init(),
                   bias_init=layers.torch_bias_init(fan_in), param_dtype=jnp.float32, name=name)  # fmt: skip


# ------------------------------------------------------------------------------------------------ blocks


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """torch.nn.PixelShuffle on NHWC: out[h*r+i, w*r+j, c] = in[h, w, c*r*r + i*r + j]."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (r * r), r, r)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c // (r * r))


class MultiModalEncoder(nn.Module):
    """x + Linear(GELU(Linear(LN(x)))) through a bottleneck, then Linear(encoder_dim -> decoder_dim)."""

    config: MMRConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        h = nn.LayerNorm(epsilon=c.layer_norm_eps, use_fast_variance=False, name="norm")(x)
        h = dense(c.encoder_bottleneck_dim, c.encoder_dim, name="down")(h)
        h = nn.Dropout(c.encoder_dropout, deterministic=deterministic)(layers.exact_gelu(h))
        x = x + dense(c.encoder_dim, c.encoder_bottleneck_dim, name="up")(h)
        return dense(c.decoder_dim, c.encoder_dim, name="enc_to_dec")(x)


class PixelShuffleBlock(nn.Module):
    """Conv3x3(in -> out*r^2) -> PixelShuffle(r) -> ReLU (model.py:386-397)."""

    features: int
    upscale: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        r = self.upscale
        x = conv(self.features * r * r, 3, 9 * x.shape[-1], name="conv")(x)
        return jax.nn.relu(pixel_shuffle(x, r))


class CBAM(nn.Module):
    """The reference's CBAM: channel gate sigmoid(MLP(max)) + sigmoid(MLP(avg)) in (0, 2), then a 7x7 spatial gate."""

    reduction: int = 16
    channel_gate: str = "sum_of_sigmoids"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        hidden = channels // self.reduction
        fc1 = nn.Dense(hidden, use_bias=False, kernel_init=layers.torch_kernel_init(), name="fc1")
        fc2 = nn.Dense(channels, use_bias=False, kernel_init=layers.torch_kernel_init(), name="fc2")

        def mlp(pooled: jax.Array) -> jax.Array:
            return fc2(jax.nn.relu(fc1(pooled)))

        max_pool = jnp.max(x, axis=(1, 2), keepdims=True)
        avg_pool = jnp.mean(x, axis=(1, 2), keepdims=True)
        if self.channel_gate == "sum_of_sigmoids":
            gate = jax.nn.sigmoid(mlp(max_pool)) + jax.nn.sigmoid(mlp(avg_pool))
        else:
            gate = jax.nn.sigmoid(mlp(max_pool) + mlp(avg_pool))
        x = x * gate
        spatial = jnp.concatenate([jnp.max(x, axis=-1, keepdims=True), jnp.mean(x, axis=-1, keepdims=True)], axis=-1)
        return x * jax.nn.sigmoid(conv(1, 7, 2 * 49, use_bias=False, name="spatial")(spatial))


class SpatialMLP(nn.Module):
    """Linear(H*W -> hidden) -> ReLU -> Linear(hidden -> H*W) over each channel's row-major flattened positions."""

    hidden_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        positions = jnp.swapaxes(x.reshape(b, h * w, c), 1, 2)  # (B, C, H*W)
        y = jax.nn.relu(dense(self.hidden_dim, h * w, name="fc1")(positions))
        y = dense(h * w, self.hidden_dim, name="fc2")(y)
        return jnp.swapaxes(y, 1, 2).reshape(b, h, w, c)


def chw_layer_norm(eps: float, name: str) -> nn.LayerNorm:
    """nn.LayerNorm([C, H, W]) on NHWC: statistics over (H, W, C) jointly, affine of shape (H, W, C)."""
    return nn.LayerNorm(epsilon=eps, reduction_axes=(1, 2, 3), feature_axes=(1, 2, 3), use_fast_variance=False, name=name)


class ReconBlock(nn.Module):
    """[PixelShuffle] -> x + CBAM(LN(x)) -> x + SpatialMLP(LN(x)) (model.py:448-474)."""

    features: int
    upscale: int
    config: MMRConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        if self.upscale > 1:
            x = PixelShuffleBlock(self.features, self.upscale, name="pixel_shuffle")(x)
        x = x + CBAM(c.cbam_reduction, c.channel_gate, name="cbam")(chw_layer_norm(c.layer_norm_eps, "norm1")(x))
        return x + SpatialMLP(c.mlp_hidden_dim, name="mlp")(chw_layer_norm(c.layer_norm_eps, "norm2")(x))


class GridDecoder(nn.Module):
    """IMG_Decoder / AUD_Decoder: Linear -> (C0, H0, W0) -> Recon blocks -> PixelShuffle -> Conv1x1. NHWC out."""

    config: MMRConfig
    layer_info: LayerInfo
    channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        _, c0, h0, w0 = self.layer_info[0]
        x = dense(c0 * h0 * w0, c.decoder_dim, name="initial")(x)
        x = x.reshape(x.shape[0], c0, h0, w0).transpose(0, 2, 3, 1)  # torch Unflatten is C-major
        for i, ((up, _, _, _), (_, out_ch, _, _)) in enumerate(zip(self.layer_info, self.layer_info[1:]), start=1):
            x = ReconBlock(out_ch, up, c, name=f"recon_layer_{i}")(x)
        x = PixelShuffleBlock(self.channels, self.layer_info[-1][0], name="final_shuffle")(x)
        return conv(self.channels, 1, self.channels, name="final_conv")(x)


class TextDecoder(nn.Module):
    """TXT_Decoder: (B, D) -> 1x1 convs to `text_length` tokens (BatchNorm1d) + pos-emb -> post-LN encoder -> logits."""

    config: MMRConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.config
        # Conv1d(1 -> T, k=1) on a 1-channel sequence of length D: out[b, t, d] = w[t] x[b, d] + bias[t].
        w1 = self.param("tokens_conv1_kernel", layers.torch_kernel_init(), (1, c.txt_tokens))
        b1 = self.param("tokens_conv1_bias", layers.torch_bias_init(1), (c.txt_tokens,))
        h = x[:, None, :] * w1[0][None, :, None] + b1[None, :, None]
        h = nn.BatchNorm(use_running_average=not train, axis=1, momentum=0.9, epsilon=1e-5, name="tokens_norm")(h)
        h = jax.nn.relu(h)
        w2 = self.param("tokens_conv2_kernel", layers.torch_kernel_init(), (c.txt_tokens, c.text_length))
        b2 = self.param("tokens_conv2_bias", layers.torch_bias_init(c.txt_tokens), (c.text_length,))
        h = jnp.einsum("btd,tl->bld", h, w2) + b2[None, :, None]
        h = h + self.param("decoder_pos_emb", nn.initializers.normal(1.0), (1, c.text_length, c.decoder_dim))
        spec = layers.BlockSpec(
            num_heads=c.decoder_heads,
            mlp_dim=c.decoder_ff_dim,
            activation="gelu",
            layer_norm_eps=c.layer_norm_eps,
            init_std=0.02,
            attention_dropout=c.decoder_dropout,
            hidden_dropout=c.decoder_dropout,
            pre_norm=False,
            mlp_dropout=c.decoder_dropout,  # nn.TransformerEncoderLayer drops inside its feed-forward too
            torch_init=True,
        )
        for i in range(c.decoder_depth):
            h = layers.TransformerBlock(spec, name=f"layer_{i}")(h, None, not train)
        return nn.Dense(c.vocab_size, kernel_init=layers.torch_kernel_init(), name="to_words")(h)


class MMRModel(nn.Module):
    """(feature_a, feature_b) of the task's two input modalities -> reconstruction of the missing one.

    Features are (B, hidden) per modality (see `encoder_features`); outputs: image (B, S, S, 3), audio
    (B, frames, mel, 1), text logits (B, L, vocab). `train` enables dropout and BatchNorm batch statistics.
    """

    config: MMRConfig
    missing: str

    @nn.compact
    def __call__(self, features: Mapping[str, jax.Array], train: bool = False) -> jax.Array:
        c = self.config
        task = TASKS[self.missing]
        fused = sum(
            dense(c.encoder_dim, features[m].shape[-1], use_bias=False, name=MAPPER_OF[m])(features[m].astype(jnp.float32))
            for m in task.inputs
        )  # fmt: skip
        z = MultiModalEncoder(c, name="mm_encoder")(fused, deterministic=not train)
        if self.missing == "image":
            return GridDecoder(c, c.img_decoder_layer_info, c.img_channels, name="decoder")(z)
        if self.missing == "audio":
            return GridDecoder(c, c.aud_decoder_layer_info, c.aud_channels, name="decoder")(z)
        return TextDecoder(c, name="decoder")(z, train)


# ------------------------------------------------------------------------------------------------ frozen encoders


def masked_token_mean(hidden: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean over tokens (B, L, H) -> (B, H); with a mask, over the tokens where it is 1."""
    hidden = hidden.astype(jnp.float32)
    if mask is None:
        return jnp.mean(hidden, axis=1)
    mask = mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def encoder_features(
    synergy: SynergyConfig,
    encoder_params: Mapping[str, Any],
    batch: Mapping[str, jax.Array],
    missing: str,
    text_mean_over_pads: bool = False,
) -> dict[str, jax.Array]:
    """The two frozen towers of the task, deterministic, under stop_gradient: {modality: (B, hidden)}.

    `batch["image"]` is whatever the vision tower should see (the job decides the normalisation).
    """
    task = TASKS[missing]
    out = {}
    for modality in task.inputs:
        params = {"params": encoder_params[param_groups(modality)[0]]}
        mask = None
        if modality == "image":
            hidden, pooled = CLIPVisionTower(synergy.vision).apply(params, batch["image"], True)
        elif modality == "audio":
            hidden, pooled = ASTTower(synergy.audio).apply(params, batch["audio"], True)
        else:
            hidden, pooled = RobertaTower(synergy.text).apply(params, batch["input_ids"], batch["attention_mask"], True)
            mask = None if text_mean_over_pads else batch["attention_mask"]
        feature = pooled.astype(jnp.float32) if task.pooling == "pooled" else masked_token_mean(hidden, mask)
        out[modality] = jax.lax.stop_gradient(feature)
    return out


# ------------------------------------------------------------------------------------------------ torch weights


def _linear(sd: Mapping[str, np.ndarray], prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
    out = {"kernel": np.asarray(sd[f"{prefix}.weight"]).T}
    if bias:
        out["bias"] = np.asarray(sd[f"{prefix}.bias"])
    return out


def _conv2d(sd: Mapping[str, np.ndarray], prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
    out = {"kernel": np.asarray(sd[f"{prefix}.weight"]).transpose(2, 3, 1, 0)}
    if bias:
        out["bias"] = np.asarray(sd[f"{prefix}.bias"])
    return out


def _chw_norm(sd: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k: np.asarray(sd[f"{prefix}.{t}"]).transpose(1, 2, 0) for k, t in (("scale", "weight"), ("bias", "bias"))}


def _recon_block(sd: Mapping[str, np.ndarray], prefix: str, upscale: int) -> dict[str, Any]:
    cbam = f"{prefix}.attention.1"
    out = {
        "norm1": _chw_norm(sd, f"{prefix}.attention.0"),
        "cbam": {
            "fc1": {"kernel": np.asarray(sd[f"{cbam}.channel_attention.1.weight"])[:, :, 0, 0].T},
            "fc2": {"kernel": np.asarray(sd[f"{cbam}.channel_attention.3.weight"])[:, :, 0, 0].T},
            "spatial": _conv2d(sd, f"{cbam}.spatial_attention.0", bias=False),
        },
        "norm2": _chw_norm(sd, f"{prefix}.feedforward.0"),
        "mlp": {"fc1": _linear(sd, f"{prefix}.feedforward.1.layer.0"), "fc2": _linear(sd, f"{prefix}.feedforward.1.layer.2")},
    }
    if upscale > 1:
        out["pixel_shuffle"] = {"conv": _conv2d(sd, f"{prefix}.pixel_shuffle.conv")}
    return out


def _grid_decoder(sd: Mapping[str, np.ndarray], info: LayerInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"initial": _linear(sd, "decoder.initial_layer.0")}
    for i, (up, *_) in enumerate(info[:-1], start=1):
        out[f"recon_layer_{i}"] = _recon_block(sd, f"decoder.recon_layer.recon_layer_{i}", up)
    out["final_shuffle"] = {"conv": _conv2d(sd, "decoder.final_layer.0.conv")}
    out["final_conv"] = _conv2d(sd, "decoder.final_layer.1")
    return out


def _torch_encoder_layer(sd: Mapping[str, np.ndarray], prefix: str, heads: int) -> dict[str, Any]:
    """nn.TransformerEncoderLayer -> layers.TransformerBlock (post-LN): split in_proj into q/k/v per head."""
    in_w, in_b = np.asarray(sd[f"{prefix}.self_attn.in_proj_weight"]), np.asarray(sd[f"{prefix}.self_attn.in_proj_bias"])
    d = in_w.shape[1]
    head_dim = d // heads
    attn = {}
    for k, name in enumerate(("query", "key", "value")):
        w, b = in_w[k * d : (k + 1) * d], in_b[k * d : (k + 1) * d]
        attn[name] = {"kernel": w.T.reshape(d, heads, head_dim), "bias": b.reshape(heads, head_dim)}
    out_w = np.asarray(sd[f"{prefix}.self_attn.out_proj.weight"])
    attn["out"] = {"kernel": out_w.T.reshape(heads, head_dim, d), "bias": np.asarray(sd[f"{prefix}.self_attn.out_proj.bias"])}
    norm = lambda n: {"scale": np.asarray(sd[f"{prefix}.{n}.weight"]), "bias": np.asarray(sd[f"{prefix}.{n}.bias"])}  # noqa: E731
    return {"attn": attn, "mlp": {"fc1": _linear(sd, f"{prefix}.linear1"), "fc2": _linear(sd, f"{prefix}.linear2")},
            "ln1": norm("norm1"), "ln2": norm("norm2")}  # fmt: skip


def _text_decoder(sd: Mapping[str, np.ndarray], config: MMRConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    p = "decoder.dim_to_tokens"
    params: dict[str, Any] = {
        "tokens_conv1_kernel": np.asarray(sd[f"{p}.0.weight"])[:, :, 0].T,
        "tokens_conv1_bias": np.asarray(sd[f"{p}.0.bias"]),
        "tokens_norm": {"scale": np.asarray(sd[f"{p}.1.weight"]), "bias": np.asarray(sd[f"{p}.1.bias"])},
        "tokens_conv2_kernel": np.asarray(sd[f"{p}.3.weight"])[:, :, 0].T,
        "tokens_conv2_bias": np.asarray(sd[f"{p}.3.bias"]),
        "decoder_pos_emb": np.asarray(sd["decoder.decoder_pos_emb"]),
        "to_words": {"kernel": np.asarray(sd["decoder.to_words.weight"]).T, "bias": np.asarray(sd["decoder.bias"])},
    }
    for i in range(config.decoder_depth):
        params[f"layer_{i}"] = _torch_encoder_layer(sd, f"decoder.decoder.layers.{i}", config.decoder_heads)
    stats = {"tokens_norm": {"mean": np.asarray(sd[f"{p}.1.running_mean"]), "var": np.asarray(sd[f"{p}.1.running_var"])}}
    return params, stats


def params_from_torch(
    state_dict: Mapping[str, np.ndarray], config: MMRConfig, missing: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, batch_stats) of `MMRModel(config, missing)` from a reference model's state dict (numpy values).

    Keys as the reference's IMG_TXT_2_AUD / TXT_AUD_2_IMG / IMG_AUD_2_TXT (`*_dim_mapper`, `mm_encoder.*`,
    `decoder.*`); the frozen encoders' keys (`img_encoder.*`, ...) are ignored.
    """
    task = TASKS[missing]
    params: dict[str, Any] = {MAPPER_OF[m]: _linear(state_dict, MAPPER_OF[m], bias=False) for m in task.inputs}
    params["mm_encoder"] = {
        "norm": {"scale": np.asarray(state_dict["mm_encoder.encoder.0.weight"]),
                 "bias": np.asarray(state_dict["mm_encoder.encoder.0.bias"])},
        "down": _linear(state_dict, "mm_encoder.encoder.1"),
        "up": _linear(state_dict, "mm_encoder.encoder.4"),
        "enc_to_dec": _linear(state_dict, "mm_encoder.enc_to_dec"),
    }  # fmt: skip
    stats: dict[str, Any] = {}
    if missing == "image":
        params["decoder"] = _grid_decoder(state_dict, config.img_decoder_layer_info)
    elif missing == "audio":
        params["decoder"] = _grid_decoder(state_dict, config.aud_decoder_layer_info)
    else:
        params["decoder"], decoder_stats = _text_decoder(state_dict, config)
        stats = {"decoder": decoder_stats}
    return params, stats
