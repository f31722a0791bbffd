"""Gemma-2 and Qwen3 load from Hugging Face directories and compute what transformers computes.

Tiny random checkpoints are made here with the transformers config classes. Their norm weights are
perturbed before saving (transformers initialises Gemma's to 0 and Qwen's to 1), so a wrong norm
convention or a norm mapped to the wrong place shows in the logits. Gemma-2's soft-capping values are
small enough that the tanh bends, and its sliding window (4) is shorter than the sequences.
"""

import copy

import jax
import numpy as np
import pytest
import torch
import transformers

import d2l_jax
from d2l_jax.hypernet.encoder import context_features
from d2l_jax.models import generate as gen
from d2l_jax.models.lora import LoRA, lora_alpha
from tests.conftest import TINY, torch_logits

TOL = 1e-4
WINDOW = 4
RANK = 4
FAMILIES = {
    "gemma2": (
        transformers.Gemma2Config,
        dict(
            head_dim=16,
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),
    # head_dim 24 is not hidden_size / num_heads (16): the config's value must be used.
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})),
    # Qwen3 with its sliding window on the layers from max_window_layers on.
    "qwen3-sliding": (
        transformers.Qwen3Config,
        dict(head_dim=24, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
}
LORA_MODULES = ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj")
TORCH_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip


def save_family_model(directory, family: str, seed: int = 0):
    """Saves a tiny random model of ``family`` (norm weights perturbed) and returns it, float32, eval mode."""
    config_cls, overrides = FAMILIES[family]
    config = config_cls(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory):
    """(family, BaseModel, torch model) loaded through ``d2l_jax.load_base_model``."""
    directory = tmp_path_factory.mktemp(request.param)
    torch_model = save_family_model(directory, request.param)
    return request.param, d2l_jax.load_base_model(directory), torch_model


def _ids(batch, length, seed):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, length))


def _max_diff(ours, theirs) -> float:
    diff = float(np.abs(np.asarray(ours) - np.asarray(theirs)).max())
    print(f"max |logit difference| = {diff:.3g}")
    return diff


def test_config_json_maps_to_the_family_fields(family_model):
    family, model, _ = family_model
    c = model.config
    assert c.family == family.split("-")[0] and c.head_dim == FAMILIES[family][1]["head_dim"]
    if family == "gemma2":
        assert (c.mlp_activation, c.norm_weight_offset, c.use_post_norms, c.use_qk_norm) == ("gelu_tanh", 1.0, True, False)
        assert (c.attn_logit_softcap, c.final_logit_softcap, c.query_pre_attn_scalar) == (2.0, 3.0, 24.0)
        assert c.embedding_multiplier == TINY["hidden_size"] ** 0.5 and c.tie_word_embeddings
        # transformers' Gemma-2: layer 0 slides, layer 1 is global, layer 2 slides.
        assert (c.sliding_window, c.sliding_window_layers) == (WINDOW, (0, 2))
        assert set(model.params["layers"]) == {"input_norm", "attn", "post_attn_norm", "pre_mlp_norm", "mlp", "post_mlp_norm"}
        assert "lm_head" not in model.params
    else:
        assert (c.mlp_activation, c.norm_weight_offset, c.use_post_norms, c.use_qk_norm) == ("silu", 0.0, False, True)
        assert (c.attn_logit_softcap, c.final_logit_softcap, c.query_pre_attn_scalar, c.embedding_multiplier) == (None, None, None, 1.0)
        assert set(model.params["layers"]["attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
        expected = (WINDOW, (1, 2)) if family == "qwen3-sliding" else (None, None)
        assert (c.sliding_window, c.sliding_window_layers) == expected
        assert c.rope_theta == (1000.0 if family == "qwen3" else 10000.0)


def test_logits_match_torch(family_model):
    _, model, torch_model = family_model
    ids = _ids(2, 19, seed=0)  # longer than the window of the sliding families
    assert _max_diff(model.logits(ids), torch_logits(torch_model, ids)) <= TOL


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_torch(family_model, side):
    _, model, torch_model = family_model
    ids = _ids(3, 14, seed=1)
    mask = np.zeros_like(ids)
    for row, n in enumerate([14, 9, 3]):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, -n:] = 1
    ours, theirs = np.asarray(model.logits(ids, mask)), torch_logits(torch_model, ids, mask)
    valid = mask.astype(bool)
    assert _max_diff(ours[valid], theirs[valid]) <= TOL
    alone = ids[1][valid[1]][None]
    np.testing.assert_allclose(ours[1][valid[1]], np.asarray(model.logits(alone))[0], atol=1e-5, rtol=0)


def random_lora(config, seed: int) -> LoRA:
    """A one-row LoRA with non-zero A and B on LORA_MODULES of every layer."""
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(LORA_MODULES)))
    a, b = {}, {}
    for name in LORA_MODULES:
        d_in, d_out = config.projection_shapes()[name]
        a[name] = 0.1 * jax.random.normal(next(keys), (1, config.num_layers, RANK, d_in))
        b[name] = 0.1 * jax.random.normal(next(keys), (1, config.num_layers, RANK, d_out))
    return LoRA(A=a, B=b, alpha=lora_alpha(RANK))


def torch_with_dense_delta(torch_model, lora: LoRA):
    """A copy of ``torch_model`` whose projection weights ([out, in]) carry ``alpha * B^T A`` of row 0."""
    merged = copy.deepcopy(torch_model)
    with torch.no_grad():
        for name in lora.modules:
            a, b = np.asarray(lora.A[name][0]), np.asarray(lora.B[name][0])
            for layer, decoder_layer in enumerate(merged.model.layers):
                weight = getattr(getattr(decoder_layer, TORCH_MODULES[name]), name).weight
                weight += torch.from_numpy(lora.alpha * b[layer].T @ a[layer])
    return merged


def test_lora_matches_torch_with_the_dense_delta(family_model):
    _, model, torch_model = family_model
    lora = random_lora(model.config, seed=2)
    ids = _ids(1, 17, seed=3)
    ours = np.asarray(model.logits(ids, lora=lora))
    assert np.abs(ours - np.asarray(model.logits(ids))).max() > 1e-2  # the adapter matters
    assert _max_diff(ours, torch_logits(torch_with_dense_delta(torch_model, lora), ids)) <= TOL


def test_sliding_window_layers_matter_beyond_the_window(family_model):
    """Past the window the per-layer pattern changes the logits, and ours equals transformers' there."""
    family, model, torch_model = family_model
    if model.config.sliding_window is None:
        pytest.skip(f"{family} has no sliding window")
    ids = _ids(2, 70, seed=4)  # run as 96 tokens: blocked causal attention (2 query blocks) under both masks
    ours = np.asarray(model.logits(ids))
    assert _max_diff(ours, torch_logits(torch_model, ids)) <= TOL
    c = model.config
    variants = {
        "no window": c.replace(sliding_window=None, sliding_window_layers=None),
        "window everywhere": c.replace(sliding_window_layers=None),
        "other layers": c.replace(sliding_window_layers=tuple(sorted(set(range(c.num_layers)) - set(c.sliding_window_layers)))),
    }
    for label, variant in variants.items():
        other = np.asarray(d2l_jax.BaseModel("variant", variant, model.params, None, ()).logits(ids))
        np.testing.assert_allclose(other[:, :WINDOW], ours[:, :WINDOW], atol=1e-5, err_msg=label)
        assert np.abs(other[:, WINDOW:] - ours[:, WINDOW:]).max() > 1e-3, label


def test_late_lora_logits_equal_the_full_model(family_model):
    """The layer-by-layer path (used for adapters on the last layers only) selects each layer's mask too."""
    from d2l_jax.models.decoder import Decoder, late_lora_logits

    _, model, _ = family_model
    c = model.config
    lora = random_lora(c, seed=8)
    below = (np.arange(c.num_layers) >= 1)[None, :, None, None]
    lora = LoRA(A={k: v * below for k, v in lora.A.items()}, B=lora.B, alpha=lora.alpha)
    ids = _ids(1, 12, seed=9)
    mask = np.ones_like(ids)
    label_positions = np.array([[2, 7, 11]])
    full = Decoder(c).apply({"params": model.params}, ids, np.arange(12)[None], mask, lora=lora, logit_positions=label_positions)
    late = late_lora_logits(c, model.params, ids, mask, label_positions, lora, 1)
    np.testing.assert_allclose(np.asarray(late), np.asarray(full.logits), atol=1e-5, rtol=0)


def test_greedy_generation_equals_transformers_generate(family_model):
    _, model, torch_model = family_model
    prompts = [list(_ids(1, 9, seed=5)[0]), list(_ids(1, 5, seed=6)[0])]
    new_tokens = 6
    tokens, mask = gen.left_pad(prompts, 16, len(prompts), pad_id=0)
    out = gen.generate_tokens(
        model.config, model.params, tokens, mask, None, jax.random.key(0), np.array([-1], np.int32),
        np.float32(0.0), np.float32(1.0), np.int32(new_tokens), buffer=gen.bucket_length(new_tokens),
    )  # fmt: skip
    with torch.no_grad():
        theirs = torch_model.generate(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, tokens.shape[1] :]
    assert np.asarray(out)[:, :new_tokens].tolist() == theirs.numpy().tolist()


@pytest.mark.parametrize("encoder_type", ["per_layer_activations", "early_exit", "embed_only"])
def test_context_encoder_modes(family_model, encoder_type):
    """Shapes of each mode, and values as reference-facts section 1 defines them (transformers' hidden states:
    the scaled embeddings, then each layer's output; the last layer dropped; the last entry final-normed)."""
    _, model, torch_model = family_model
    c = model.config
    ids = _ids(2, 7, seed=7)
    mask = np.ones_like(ids)
    config = d2l_jax.HypernetConfig(encoder_type=encoder_type, early_exit_layer=2 if encoder_type == "early_exit" else None)
    features = np.asarray(context_features(config, c, model.params, ids, mask))
    with torch.no_grad():
        hidden = [h.numpy() for h in torch_model(torch.as_tensor(ids), output_hidden_states=True).hidden_states]
        final_norm = lambda h: torch_model.model.norm(torch.from_numpy(h)).detach().numpy()
    if encoder_type == "per_layer_activations":
        assert features.shape == (c.num_layers, 2, 7, c.hidden_size)
        expected = np.stack(hidden[: c.num_layers - 1] + [final_norm(hidden[c.num_layers - 1])])
    elif encoder_type == "early_exit":
        assert features.shape == (2, 7, c.hidden_size)
        expected = final_norm(hidden[2])
    else:
        assert features.shape == (2, 7, c.hidden_size)
        expected = hidden[0]
        with torch.no_grad():
            np.testing.assert_allclose(expected, torch_model.model.embed_tokens(torch.as_tensor(ids)).numpy(), atol=0)
    np.testing.assert_allclose(features, expected, atol=1e-5, rtol=1e-5)


def test_published_gemma_2_2b_it_config():
    from d2l_jax.models.families import published_config

    c = published_config("gemma-2-2b-it")
    assert c.sliding_layer_flags()[:4] == (True, False, True, False) and len(c.sliding_layer_flags()) == 26
    assert c.projection_shapes()["down_proj"] == (9216, 2304)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="gemma2", hidden_activation="gelu"), r"hidden activation 'gelu' is not supported for gemma2"),
        (dict(model_type="qwen3", layer_types=["full_attention", "chunked_attention", "full_attention"], use_sliding_window=True),
         r"layer_types \['chunked_attention'\] are not supported"),
        (dict(model_type="gemma2", layer_types=["sliding_attention"]), r"layer_types has 1 entries for num_hidden_layers=3"),
        (dict(model_type="gemma2", sliding_window=0), r"sliding_window=0; expected a positive integer"),
    ],
    ids=["activation", "layer-type", "layer-count", "window"],
)  # fmt: skip
def test_config_json_errors_name_the_field(changes, message):
    from d2l_jax.models.families import UnsupportedArchitectureError, config_from_hf

    hf = {**TINY, **changes}
    with pytest.raises((ValueError, UnsupportedArchitectureError), match=message):
        config_from_hf(hf, source="tiny/config.json")


def test_sliding_window_layers_are_checked():
    from d2l_jax.models.families import published_config

    c = published_config("gemma-2-2b-it")
    with pytest.raises(ValueError, match=r"sliding_window_layers=\(0, 26\) must be distinct layer indices in 0\.\.25"):
        c.replace(sliding_window_layers=(0, 26))
    with pytest.raises(ValueError, match=r"needs a sliding_window"):
        c.replace(sliding_window=None)
    assert c.replace(sliding_window_layers=[0, 2]).sliding_window_layers == (0, 2)  # JSON lists come back as tuples


def test_a_cache_continued_several_tokens_at_a_time_equals_the_full_forward(family_model):
    """A prefill, then chunks of 3, 1 and 2 tokens into the written cache: each call's logits are the full
    forward's at those positions (cached slots and new tokens under one softmax, the sliding window applied
    to both), and each call writes only its own slots."""
    from d2l_jax.models.decoder import Decoder, KVCache

    _, model, _ = family_model
    ids = _ids(1, 12, seed=10)
    full = np.asarray(model.logits(ids))
    cache = KVCache.empty(model.config, 1, 16)
    for start, end in ((0, 6), (6, 9), (9, 10), (10, 12)):
        out = Decoder(model.config).apply(
            {"params": model.params}, ids[:, start:end], np.arange(start, end)[None], np.ones((1, end - start), np.int32), cache=cache
        )
        np.testing.assert_allclose(np.asarray(out.logits)[0], full[0, start:end], atol=1e-5, rtol=0)
        for old, new in ((cache.k, out.cache.k), (cache.v, out.cache.v)):
            np.testing.assert_array_equal(np.asarray(new)[:, :, :, :start], np.asarray(old)[:, :, :, :start])
            assert np.abs(np.asarray(new)[:, :, :, start:end]).min() > 0
            assert not np.asarray(new)[:, :, :, end:].any()
        np.testing.assert_array_equal(np.asarray(out.cache.valid)[0], np.arange(16) < end)
        cache = out.cache
