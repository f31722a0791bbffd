"""The Flax decoder is the same function as the transformers PyTorch model (tiny random checkpoints)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import d2l_jax
from tests.conftest import save_tiny_model, torch_logits

TOL = 1e-4


def _ids(batch, length, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def test_logits_match_torch(tiny_llama):
    model, torch_model = tiny_llama
    ids = _ids(2, 17, model.config.vocab_size)
    np.testing.assert_allclose(np.asarray(model.logits(ids)), torch_logits(torch_model, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_torch_with_padding(tiny_llama, side):
    model, torch_model = tiny_llama
    ids = _ids(3, 12, model.config.vocab_size, seed=1)
    lengths = np.array([12, 7, 3])
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, -n:] = 1
    ours = np.asarray(model.logits(ids, mask))
    theirs = torch_logits(torch_model, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=TOL, rtol=0)
    # A padded row equals the same tokens run alone.
    row = 2
    alone = ids[row][valid[row]][None]
    np.testing.assert_allclose(ours[row][valid[row]], np.asarray(model.logits(alone))[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_word_embeddings=True),
        dict(num_key_value_heads=4),
        dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 10000.0,
            }
        ),
    ],
    ids=["tied", "mha", "rope-linear", "rope-llama3"],
)
def test_llama_variants_match_torch(tmp_path, overrides):
    torch_model = save_tiny_model(tmp_path, seed=3, **overrides)
    model = d2l_jax.load_base_model(tmp_path)
    ids = _ids(2, 40, model.config.vocab_size, seed=2)
    np.testing.assert_allclose(np.asarray(model.logits(ids)), torch_logits(torch_model, ids), atol=TOL, rtol=0)


def test_mistral_sliding_window_matches_torch(tmp_path):
    torch_model = save_tiny_model(tmp_path, transformers.MistralConfig, seed=4, sliding_window=5)
    model = d2l_jax.load_base_model(tmp_path)
    assert model.config.family == "mistral" and model.config.sliding_window == 5
    ids = _ids(2, 24, model.config.vocab_size, seed=5)
    np.testing.assert_allclose(np.asarray(model.logits(ids)), torch_logits(torch_model, ids), atol=TOL, rtol=0)


def test_hidden_states_match_torch(tiny_llama):
    import torch

    model, torch_model = tiny_llama
    ids = _ids(1, 9, model.config.vocab_size, seed=6)
    out = model.decoder.apply(
        {"params": model.params}, ids, np.arange(9)[None], np.ones_like(ids), compute_logits=False, return_hidden_states=True
    )
    with torch.no_grad():
        theirs = torch_model(torch.as_tensor(ids), output_hidden_states=True).hidden_states
    assert out.logits is None
    chex.assert_shape(out.hidden_states, (model.config.num_layers + 1, 1, 9, model.config.hidden_size))
    chex.assert_trees_all_close(tuple(np.asarray(out.hidden_states)), tuple(h.numpy() for h in theirs), atol=TOL, rtol=0)


def test_logits_at_positions_equal_full_logits(tiny_llama):
    model, _ = tiny_llama
    ids = _ids(2, 11, model.config.vocab_size, seed=7)
    positions = np.array([[0, 4, 10], [3, 3, 9]])
    full = np.asarray(model.logits(ids))
    out = model.decoder.apply(
        {"params": model.params}, ids, np.broadcast_to(np.arange(11), ids.shape), np.ones_like(ids), logit_positions=positions
    )
    np.testing.assert_allclose(np.asarray(out.logits), np.take_along_axis(full, positions[..., None], axis=1), atol=1e-5)


def test_packed_segments_equal_separate_sequences(tiny_llama):
    model, _ = tiny_llama
    first, second = _ids(1, 6, model.config.vocab_size, seed=8), _ids(1, 5, model.config.vocab_size, seed=9)
    packed = np.concatenate([first, second], axis=1)
    segments = np.array([[1] * 6 + [2] * 5])
    positions = np.array([list(range(6)) + list(range(5))])
    out = model.decoder.apply({"params": model.params}, packed, positions, segments)
    logits = np.asarray(out.logits)[0]
    np.testing.assert_allclose(logits[:6], np.asarray(model.logits(first))[0], atol=1e-5)
    np.testing.assert_allclose(logits[6:], np.asarray(model.logits(second))[0], atol=1e-5)


def test_blocked_causal_attention_matches_torch(tiny_llama):
    from d2l_jax.models.decoder import causal_blocks

    model, torch_model = tiny_llama
    assert causal_blocks(128) == 4
    ids = _ids(2, 100, model.config.vocab_size, seed=10)  # bucketed to 128 tokens: 4 query blocks
    mask = np.ones_like(ids)
    mask[1, :30] = 0
    ours, theirs = np.asarray(model.logits(ids, mask)), torch_logits(torch_model, ids, mask)
    np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], atol=TOL, rtol=0)


def test_sharded_safetensors_directory_loads(tmp_path, tiny_llama):
    _, torch_model = tiny_llama
    torch_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    model = d2l_jax.load_base_model(tmp_path)
    ids = _ids(1, 9, model.config.vocab_size, seed=11)
    np.testing.assert_allclose(np.asarray(model.logits(ids)), torch_logits(torch_model, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("unroll", [1, 2])
def test_first_layers_hidden_states_equal_a_cut_model(tiny_llama, unroll):
    from d2l_jax.models.decoder import Decoder, first_layers_hidden_states

    model, _ = tiny_llama
    ids = _ids(2, 10, model.config.vocab_size, seed=12)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    cut = model.config.replace(num_layers=2)
    params = dict(model.params, layers=jax.tree.map(lambda p: p[:2], model.params["layers"]))
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    expected = Decoder(cut).apply({"params": params}, ids, positions, mask, compute_logits=False, return_hidden_states=True)
    got = first_layers_hidden_states(model.config.replace(scan_unroll=unroll), model.params, ids, mask, 2)
    np.testing.assert_allclose(np.asarray(got)[:, mask == 1], np.asarray(expected.hidden_states)[:, mask == 1], atol=1e-6)


@pytest.mark.parametrize("unroll", [1, 2])
def test_late_lora_logits_equal_the_full_model_in_value_and_gradient(tiny_llama, unroll):
    from d2l_jax.models.decoder import Decoder, late_lora_logits
    from d2l_jax.models.lora import LoRA

    model, _ = tiny_llama
    c = model.config
    ids = _ids(2, 10, c.vocab_size, seed=13)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    label_positions = np.array([[3, 8], [1, 5]])
    d_in, d_out = c.projection_shapes()["down_proj"]
    keys = jax.random.split(jax.random.key(0), 2)
    first = c.num_layers - 1
    below = (np.arange(c.num_layers) >= first)[None, :, None, None]
    a = jax.random.normal(keys[0], (2, c.num_layers, 3, d_in)) * below
    b = jax.random.normal(keys[1], (2, c.num_layers, 3, d_out)) * 0.1 * below

    def full(a, b):
        lora = LoRA({"down_proj": a}, {"down_proj": b}, 2.0)
        return Decoder(c).apply({"params": model.params}, ids, positions, mask, lora=lora, logit_positions=label_positions).logits

    def late(a, b):
        lora = LoRA({"down_proj": a}, {"down_proj": b}, 2.0)
        return late_lora_logits(c.replace(scan_unroll=unroll), model.params, ids, mask, label_positions, lora, first)

    np.testing.assert_allclose(np.asarray(late(a, b)), np.asarray(full(a, b)), atol=1e-5, rtol=1e-5)
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))
    got, want = jax.grad(loss(late), (0, 1))(a, b), jax.grad(loss(full), (0, 1))(a, b)
    assert all(float(jnp.abs(g).max()) > 0 for g in want)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-4)
