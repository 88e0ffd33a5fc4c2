"""Our towers reproduce transformers' PyTorch outputs on the committed tiny checkpoints (fp32, max abs 1e-4).

Fixtures come from tests/fixtures/make_hf_fixtures.py (run in a torch venv); these tests need no torch.
"""

from pathlib import Path

import numpy as np
import pytest

from synergy_jax.weights import load_hf_tower

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
TOLERANCE = 1e-4


def test_fixture_set_covers_the_issue():
    """Two CLIP image/patch sizes + a CLIPModel file, RoBERTa bare and MLM, AST with two strides."""
    assert {"clip_vision_a", "clip_vision_b", "clip_full", "roberta", "roberta_mlm", "ast_a", "ast_b"} <= set(CASES)


def inputs_of(io) -> tuple[np.ndarray, ...]:
    return tuple(io[name] for name in ("images", "input_ids", "attention_mask", "features") if name in io)


@pytest.mark.parametrize("case", CASES)
def test_matches_pytorch(case):
    io = np.load(FIXTURES / case / "io.npz")
    module, params = load_hf_tower(FIXTURES / case)
    hidden, pooled = module.apply({"params": params}, *inputs_of(io))
    assert hidden.shape == io["last_hidden_state"].shape
    np.testing.assert_allclose(hidden, io["last_hidden_state"], rtol=0, atol=TOLERANCE)
    if io["pooled_known"]:
        np.testing.assert_allclose(pooled, io["pooled"], rtol=0, atol=TOLERANCE)


def test_padded_roberta_batch_really_is_padded():
    io = np.load(FIXTURES / "roberta" / "io.npz")
    lengths = io["attention_mask"].sum(1)
    assert lengths.min() < lengths.max() == io["input_ids"].shape[1]


def test_ast_fixtures_use_two_strides_and_short_inputs():
    strides = set()
    for case in ("ast_a", "ast_b"):
        module, _ = load_hf_tower(FIXTURES / case)
        strides.add((module.config.frequency_stride, module.config.time_stride))
        assert module.config.max_length != 1024
    assert len(strides) == 2
