"""Tower configs, presets, logical axis names, compute dtype, remat, dropout and analytic costs."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from synergy_jax.models import TOWERS, build_tower, layers, preset
from synergy_jax.models.summary import param_count, preset_rows

HF_CONFIG_CLASSES = {
    "vision": transformers.CLIPVisionConfig,
    "text": transformers.RobertaConfig,
    "audio": transformers.ASTConfig,
}


def init_tower(config, seed=0):
    module = build_tower(config)
    inputs = TOWERS[TOWERS_BY_CONFIG[type(config)]].example_inputs(config, batch=2)
    variables = module.init(jax.random.PRNGKey(seed), *inputs)
    return module, variables, inputs


TOWERS_BY_CONFIG = {kind.config_cls: modality for modality, kind in TOWERS.items()}


@pytest.mark.parametrize("modality", sorted(TOWERS))
def test_config_defaults_are_transformers_defaults(modality):
    """A config.json that omits a field must mean what it means in transformers."""
    ours = TOWERS[modality].config_cls()
    theirs = HF_CONFIG_CLASSES[modality]().to_dict()
    assert len(ours.hf_field_names()) > 5, ours.hf_field_names()
    for name in ours.hf_field_names():
        assert getattr(ours, name) == theirs[name], name


@pytest.mark.parametrize("modality", sorted(TOWERS))
def test_hf_dict_round_trip(modality):
    for config in TOWERS[modality].presets.values():
        hf = config.to_hf_dict()
        assert "dtype" not in hf and "remat" not in hf
        assert TOWERS[modality].config_cls.from_hf_dict(hf) == config
        # transformers accepts what we write, field for field.
        theirs = HF_CONFIG_CLASSES[modality](**{k: v for k, v in hf.items() if k not in ("model_type", "architectures")})
        assert all(getattr(theirs, name) == value for name, value in hf.items() if name != "architectures")


def test_presets_have_reference_token_counts():
    """docs/reference.md R1.1: 197/257 image tokens, 852/1214 audio tokens, all towers 768 or 1024 wide."""
    assert preset("vision", "openai/clip-vit-base-patch16").num_tokens == 197
    assert preset("vision", "openai/clip-vit-large-patch14").num_tokens == 257
    assert preset("audio", "MIT/ast-finetuned-audioset-12-12-0.447").num_tokens == 852
    assert preset("audio", "MIT/ast-finetuned-audioset-10-10-0.4593").num_tokens == 1214
    assert preset("text", "FacebookAI/roberta-base").max_position_embeddings == 514
    assert preset("text", "FacebookAI/roberta-large").hidden_size == 1024
    assert preset("audio", "MIT/ast-finetuned-audioset-10-10-0.4593").layer_norm_eps == 1e-12
    with pytest.raises(KeyError, match="no vision preset"):
        preset("vision", "openai/clip-vit-huge")


def test_param_counts_and_flops():
    """Counts equal transformers' torch models built from the same configs (numbers from numel())."""
    expected_params = {
        "openai/clip-vit-base-patch16": 85_799_424,
        "openai/clip-vit-large-patch14": 303_179_776,
        "FacebookAI/roberta-base": 124_645_632,
        "FacebookAI/roberta-large": 355_359_744,
        "MIT/ast-finetuned-audioset-12-12-0.447": 85_909_248,
        "MIT/ast-finetuned-audioset-10-10-0.4593": 86_187_264,
    }
    rows = {name: (params, flops) for _, name, _, params, flops in preset_rows()}
    for name, count in expected_params.items():
        assert rows[name][0] == count, name
    assert rows["openai/clip-vit-base-patch16"][1] / 1e9 == pytest.approx(35.13, abs=0.01)  # the known ViT-B/16 figure


@pytest.mark.parametrize("modality", sorted(TOWERS))
def test_flop_count_matches_xla_cost_analysis(modality):
    """The analytic matmul count is XLA's own FLOP count of the compiled forward minus the few percent that
    norms, softmax and activations add at width 256."""
    config = preset(modality, "tiny").replace(hidden_size=256, intermediate_size=1024, num_hidden_layers=1)
    module = build_tower(config)
    inputs = TOWERS[modality].example_inputs(config, batch=1)
    variables = module.init(jax.random.PRNGKey(0), *inputs)
    cost = jax.jit(lambda v, *x: module.apply(v, *x)).lower(variables, *inputs).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert 0.93 < config.forward_flops() / cost["flops"] <= 1.0


@pytest.mark.parametrize("modality", sorted(TOWERS))
def test_every_parameter_has_logical_axis_names(modality):
    _, variables, _ = init_tower(preset(modality, "tiny"))
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned)
        assert len(leaf.names) == leaf.value.ndim
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["encoder"]["layer_0"]["attn"]["query"]["kernel"] == jax.P("embed", "heads", "kv")
    assert specs["encoder"]["layer_0"]["mlp"]["fc2"]["kernel"] == jax.P("mlp", "embed")


@pytest.mark.parametrize("modality", sorted(TOWERS))
def test_bf16_compute_keeps_fp32_params(modality):
    config = preset(modality, "tiny")
    module, variables, inputs = init_tower(config)
    params = nn.unbox(variables)["params"]
    hidden32, pooled32 = module.apply({"params": params}, *inputs)
    hidden16, pooled16 = build_tower(config.replace(dtype="bfloat16")).apply({"params": params}, *inputs)
    assert hidden16.dtype == jnp.bfloat16 and hidden32.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    error = np.abs(np.asarray(hidden16, np.float32) - np.asarray(hidden32))
    assert error.max() < 0.05 and error.mean() < 0.01  # measured: max <= 0.03, mean <= 0.004 on O(3) activations
    # Really computed in bf16: every matmul and convolution takes bf16 operands (and none does in float32 mode).
    assert set(matmul_operand_dtypes(build_tower(config.replace(dtype="bfloat16")), params, inputs)) == {"bfloat16"}
    assert set(matmul_operand_dtypes(module, params, inputs)) == {"float32"}


def matmul_operand_dtypes(module, params, inputs) -> list[str]:
    """Operand dtypes of every dot_general / conv in the traced forward pass (nested jaxprs included)."""

    def collect(jaxpr) -> list[str]:
        found = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                found += [str(v.aval.dtype) for v in eqn.invars]
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        found += collect(inner)
        return found

    return collect(jax.make_jaxpr(lambda p: module.apply({"params": p}, *inputs))(params).jaxpr)


@pytest.mark.parametrize("modality", sorted(TOWERS))
def test_remat_changes_nothing_but_memory(modality):
    config = preset(modality, "tiny")
    module, variables, inputs = init_tower(config)
    params = nn.unbox(variables)["params"]
    remat_module = build_tower(config.replace(remat=True))

    def loss(m, p):
        # A random linear read-out: sum(h**2) would be ~constant after a final LayerNorm (gradients ~ noise).
        hidden, pooled = m.apply({"params": p}, *inputs)
        weights = jax.random.normal(jax.random.PRNGKey(7), hidden.shape)
        return jnp.sum(hidden * weights) + jnp.sum(pooled * weights[:, 0])

    grads = jax.jit(jax.grad(lambda p: loss(module, p)))(params)
    remat_grads = jax.jit(jax.grad(lambda p: loss(remat_module, p)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads, remat_grads)
    remat_primitive = re.compile(r"\b(remat2|checkpoint)\[")  # the primitive's name differs across jax versions
    # every layer's block is one more remat than the activations (layers.ACTIVATIONS) that both recompute
    remat_count = len(remat_primitive.findall(str(jax.make_jaxpr(lambda p: loss(remat_module, p))(params))))
    plain_count = len(remat_primitive.findall(str(jax.make_jaxpr(lambda p: loss(module, p))(params))))
    assert remat_count == plain_count + config.num_hidden_layers


def test_roberta_dropout_only_in_training():
    config = preset("text", "tiny")
    module, variables, inputs = init_tower(config)
    params = {"params": nn.unbox(variables)["params"]}
    eval_a, _ = module.apply(params, *inputs)
    eval_b, _ = module.apply(params, *inputs, deterministic=True)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, _ = module.apply(params, *inputs, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    train_b, _ = module.apply(params, *inputs, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)
    with pytest.raises(Exception, match="dropout"):
        module.apply(params, *inputs, deterministic=False)  # training without a dropout rng is an error


def test_attention_dropout_path_equals_fused_attention():
    """The explicit (dropout-capable) attention computes the same function as jax.nn.dot_product_attention."""
    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 5, 4, 8))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)[:, None, None, :]
    fused = layers.attention(q, k, v, mask, dropout_rate=0.0, dropout_rng=None)
    explicit = layers.attention(q, k, v, mask, dropout_rate=1e-12, dropout_rng=jax.random.PRNGKey(3))
    np.testing.assert_allclose(explicit, fused, atol=1e-5)
    dropped = layers.attention(q, k, v, mask, dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(3))
    assert not np.allclose(dropped, fused)


def test_padding_does_not_leak_into_real_tokens():
    """Changing what sits in padded positions must not change the outputs at real positions."""
    config = preset("text", "tiny")
    module, variables, _ = init_tower(config)
    params = {"params": nn.unbox(variables)["params"]}
    ids = jnp.array([[0, 5, 6, 7, 2, 1, 1, 1]])
    mask = (ids != 1).astype(jnp.int32)
    other = ids.at[0, 5:].set(9)  # garbage tokens where the mask is 0
    a, pa = module.apply(params, ids, mask)
    b, pb = module.apply(params, other, mask)
    # position ids differ for non-pad garbage only at masked positions; real positions are unaffected
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
    np.testing.assert_allclose(pa, pb, atol=1e-6)


@pytest.mark.parametrize(
    "modality, bad_input, message",
    [
        ("vision", (jnp.zeros((1, 3, 32, 32)),), "NHWC"),
        ("audio", (jnp.zeros((1, 32, 128)),), "frames"),
        ("text", (jnp.zeros((1, 64), jnp.int32), jnp.ones((1, 64), jnp.int32)), "positions"),
    ],
)
def test_wrong_input_shape_is_a_clear_error(modality, bad_input, message):
    config = preset(modality, "tiny")
    module, variables, _ = init_tower(config)
    with pytest.raises(ValueError, match=message):
        module.apply({"params": nn.unbox(variables)["params"]}, *bad_input)


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        TOWERS["text"].config_cls.from_hf_dict({"hidden_size": 30, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="hidden_act='swish'"):
        TOWERS["audio"].config_cls.from_hf_dict({"hidden_act": "swish"})
    with pytest.raises(ValueError, match="compute dtype"):
        init_tower(dataclasses.replace(preset("vision", "tiny"), dtype="float8"))


def test_param_count_of_tiny_matches_init():
    config = preset("vision", "tiny")
    _, variables, _ = init_tower(config)
    assert param_count(config) == sum(x.size for x in jax.tree.leaves(nn.unbox(variables)["params"]))


@pytest.mark.parametrize("name", sorted(layers.ACTIVATIONS))
def test_activations_save_only_their_input_for_the_backward_pass(name, capsys):
    """Recomputed in the backward pass (layers.ACTIVATIONS): the gradient keeps the input, none of the
    intermediates (erf, exp, sigmoid, masks), and equals the plain function's."""
    from jax.ad_checkpoint import print_saved_residuals

    activation = layers.ACTIVATIONS[name]
    x = jnp.linspace(-4.0, 4.0, 24).reshape(4, 6)
    print_saved_residuals(activation, x)
    saved = capsys.readouterr().out.strip().splitlines()
    assert saved and all("from the argument" in line for line in saved), saved
    plain = {"gelu": layers.exact_gelu, "quick_gelu": lambda v: v * jax.nn.sigmoid(1.702 * v),
             "relu": jax.nn.relu}.get(name, lambda v: jax.nn.gelu(v, approximate=True))  # fmt: skip
    gradient = jax.grad(lambda v: jnp.sum(jnp.sin(activation(v))))(x)
    np.testing.assert_allclose(gradient, jax.grad(lambda v: jnp.sum(jnp.sin(plain(v))))(x), rtol=1e-6, atol=1e-7)


def test_the_exact_gelu_and_its_gradient_are_the_float64_gelus_within_float32_rounding():
    """layers.exact_gelu (torch's erf formula, not jax.nn.gelu's erfc) against the float64 GELU and its derivative
    over [-12, 12], and in bfloat16 and float16 the float32 result rounded once."""
    from scipy.special import erf

    x = np.linspace(-12.0, 12.0, 48001, dtype=np.float32)
    wide = x.astype(np.float64)
    expected = 0.5 * wide * (1.0 + erf(wide / np.sqrt(2.0)))
    slope = 0.5 * (1.0 + erf(wide / np.sqrt(2.0))) + wide * np.exp(-0.5 * wide**2) / np.sqrt(2.0 * np.pi)
    np.testing.assert_allclose(np.asarray(jax.jit(layers.exact_gelu)(x), np.float64), expected, rtol=0, atol=1.2e-6)
    gradient = jax.jit(jax.vmap(jax.grad(layers.exact_gelu)))(x)
    np.testing.assert_allclose(np.asarray(gradient, np.float64), slope, rtol=0, atol=3e-7)
    for narrow in (jnp.bfloat16, jnp.float16):  # computed in float32, rounded once (the tail does not cancel)
        values = jnp.asarray(x[::10], narrow)
        rounded = layers.exact_gelu(values.astype(jnp.float32)).astype(narrow)
        assert layers.exact_gelu(values).dtype == narrow
        computed = np.asarray(layers.exact_gelu(values), np.float32)
        np.testing.assert_array_equal(computed, np.asarray(rounded, np.float32))
