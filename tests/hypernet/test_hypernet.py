"""The hypernetwork: reference shapes and counts, identity at init, combining, batching, invariances."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

import d2l_jax
from d2l_jax.hypernet import hypernet as hn
from d2l_jax.hypernet.adapter import batched_adapters
from d2l_jax.hypernet.encoder import context_features
from d2l_jax.hypernet.head import LoRAHead, pad_to_base_layers, without_generated_b
from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.generate import bucket_length
from d2l_jax.models.lora import LoRA
from tests.conftest import random_base, randomized

TINY_BASE = DecoderConfig(
    vocab_size=49152, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512
)
TINY_HYPER = d2l_jax.HypernetConfig(
    latent_size=32,
    n_latent_queries=4,
    num_blocks=2,
    num_heads=4,
    head_dim=8,
    num_kv_heads=2,
    lora_rank=2,
    target_modules=("q_proj", "down_proj"),
    max_chunk_len=40,
    max_chunks=6,
)
TINY_EXECUTION = d2l_jax.HypernetExecution(chunk_group_size=2)
DOCS = [
    "The vault code is 4817 and the vault is in Lisbon, near the river.",
    "Marie planted tulips in March. They bloomed red and yellow in late April, " * 3,
]


def gemma2_2b_shapes():
    return DecoderConfig(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256)


def abstract_count(config, base):
    return hn.param_count(jax.eval_shape(lambda: hn.init_hypernet(config, base, jax.random.key(0))))


@pytest.mark.parametrize(
    "base, config, expected",
    [
        (gemma2_2b_shapes(), d2l_jax.HypernetConfig(), 315_237_792),
        ("smollm2", d2l_jax.HypernetConfig(), 157_481_440),
        ("smollm2", d2l_jax.HypernetConfig.niah(early_exit_layer=7), 151_932_896),
    ],
    ids=["gemma2-2b-main", "smollm2-main", "smollm2-niah"],
)
def test_parameter_counts_match_reference(base, config, expected, request):
    if base == "smollm2":
        base = request.getfixturevalue("smollm2").config
    assert abstract_count(config, base) == expected


def test_gemma2_main_shapes_match_reference():
    shapes = nn.unbox(jax.eval_shape(lambda: hn.init_hypernet(d2l_jax.HypernetConfig(), gemma2_2b_shapes(), jax.random.key(0))))
    head, perceiver = shapes["head"], shapes["perceiver"]
    assert head["head"].shape == (26, 512, 11520)
    assert head["pre_head_0"]["mix1_kernel"].shape == (26, 512, 2048)
    assert head["bias_A_down_proj"].shape == (26, 8, 9216) and head["bias_B_down_proj"].shape == (26, 8, 2304)
    assert perceiver["modality_projection"]["gate_proj"]["kernel"].shape == (2304, 9216)
    assert perceiver["encoder"]["layers"]["q_proj"].shape == (9, 512, 2048)
    assert perceiver["encoder"]["latents_q"].shape == (8, 512) and perceiver["decoder"]["latents_q"].shape == (8, 512)


@pytest.fixture(scope="module")
def tiny_base(smollm2):
    return random_base(TINY_BASE, smollm2, seed=1)


@pytest.fixture(scope="module")
def tiny_d2l(tiny_base):
    return randomized(d2l_jax.D2L.create(tiny_base, TINY_HYPER, seed=0, execution=TINY_EXECUTION))


def dense_delta(a, b, alpha):
    return alpha * jnp.einsum("lrd,lro->ldo", a, b)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"b_init": "zero_head", "per_rank_head": True, "adapted_layers": 2},
        {"b_init": "zero_head", "shared_a": True, "center_head_input": True},
    ],
    ids=["reference", "zero_head-per_rank-adapted", "zero_head-shared_a-centered"],
)
def test_fresh_hypernet_leaves_base_unchanged(tiny_base, changes):
    d2l = d2l_jax.D2L.create(tiny_base, TINY_HYPER.replace(**changes), seed=3)
    adapter = d2l.internalize(DOCS[1])
    assert adapter.num_chunks > 1
    ids = tiny_base.chat_ids([{"role": "user", "content": "Where is the vault?"}])
    np.testing.assert_array_equal(np.asarray(d2l.logits([ids])), np.asarray(tiny_base.logits([ids])))


@pytest.mark.parametrize("changes", [{}, {"b_init": "zero_head", "shared_a": True, "per_rank_head": True}], ids=["reference", "shared_a"])
def test_without_generated_b_keeps_a_and_generates_zero_b(tiny_base, changes):
    trained = randomized(d2l_jax.D2L.create(tiny_base, TINY_HYPER.replace(**changes), seed=3, execution=TINY_EXECUTION))
    params = dict(trained.params, head=without_generated_b(trained.params["head"], trained.config, tiny_base.config))
    reset = d2l_jax.D2L(tiny_base, trained.config, params, TINY_EXECUTION)
    before, after = trained.internalize(DOCS[1]), reset.internalize(DOCS[1])
    for module in TINY_HYPER.target_modules:
        assert np.abs(np.asarray(before.lora.B[module])).max() > 0
        np.testing.assert_array_equal(np.asarray(after.lora.B[module]), 0)
        np.testing.assert_array_equal(np.asarray(after.lora.A[module]), np.asarray(before.lora.A[module]))
    ids = tiny_base.chat_ids([{"role": "user", "content": "Where is the vault?"}])
    np.testing.assert_array_equal(np.asarray(reset.logits([ids], adapter=after)), np.asarray(tiny_base.logits([ids])))


@pytest.mark.parametrize("adapted_layers", [0, 2], ids=["every-layer", "last-2-layers"])
def test_combined_update_is_sum_of_chunk_updates_plus_bias(tiny_d2l, tiny_base, adapted_layers):
    d2l = tiny_d2l if not adapted_layers else randomized(d2l_jax.D2L.create(tiny_base, TINY_HYPER.replace(adapted_layers=2), seed=1))
    config = d2l.config
    chunks, _ = d2l.document_chunks(DOCS[1])
    assert len(chunks) == 3
    adapter = d2l.internalize(DOCS[1], scaler=0.7, bias_scaler=1.3)
    assert adapter.rank == 4 * config.lora_rank
    for module in config.target_modules:
        expected = 0.0
        for chunk in chunks:
            ids, mask = np.array([[chunk]]), np.ones((1, 1, len(chunk)), np.int32)
            a, b = hn.encode_chunks(config, d2l.base.config, d2l.base.params, d2l.params, ids, mask)
            expected = expected + dense_delta(0.7 * a[module][0], b[module][0], config.alpha)
        bias_a, bias_b = (pad_to_base_layers(d2l.params["head"][f"bias_{x}_{module}"], TINY_BASE.num_layers, 0) for x in "AB")
        expected = expected + dense_delta(1.3 * bias_a, 1.3 * bias_b, config.alpha)
        got = dense_delta(adapter.A[module][0], adapter.B[module][0], config.alpha)
        assert float(jnp.abs(expected).max()) > 1e-3
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_batch_of_documents_equals_one_at_a_time(tiny_d2l):
    batched = tiny_d2l.internalize(DOCS)
    assert tiny_d2l.adapter is batched[-1]
    for doc, together in zip(DOCS, batched):
        alone = tiny_d2l.internalize(doc)
        assert (alone.rank, alone.num_chunks, alone.num_tokens) == (together.rank, together.num_chunks, together.num_tokens)
        for module in tiny_d2l.config.target_modules:
            for x, y in ((alone.A, together.A), (alone.B, together.B)):
                np.testing.assert_allclose(x[module][:, :, : alone.rank], y[module][:, :, : alone.rank], atol=1e-5)
                assert not np.asarray(y[module][:, :, alone.rank :]).any()


def test_padding_does_not_change_a_chunk(tiny_d2l):
    d2l = tiny_d2l
    chunk = d2l.document_chunks(DOCS[0])[0][0]
    n = len(chunk)
    padded = np.zeros((1, n + 9), np.int32)
    padded[0, :n] = chunk
    mask = (np.arange(n + 9) < n)[None].astype(np.int32)
    exact = hn.encode_chunks(d2l.config, d2l.base.config, d2l.base.params, d2l.params, np.array([[chunk]]), np.ones((1, 1, n), np.int32))
    pad = hn.encode_chunks(d2l.config, d2l.base.config, d2l.base.params, d2l.params, padded[None], mask[None])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), exact, pad)


@pytest.mark.parametrize("encoder_type", ["per_layer_activations", "early_exit"])
def test_iterative_mode_equals_batched_mode(tiny_d2l, encoder_type):
    config = tiny_d2l.config.replace(encoder_type=encoder_type)
    params = nn.unbox(hn.init_hypernet(config, tiny_d2l.base.config, jax.random.key(5)))
    batched = d2l_jax.D2L(tiny_d2l.base, config, params, TINY_EXECUTION).internalize(DOCS[1])
    iterative = d2l_jax.D2L(tiny_d2l.base, config, params, TINY_EXECUTION.replace(iterative=True)).internalize(DOCS[1])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), batched.lora, iterative.lora)


def test_layer_permutation_permutes_latents(tiny_d2l):
    d2l = tiny_d2l
    features = jax.random.normal(jax.random.key(2), (TINY_BASE.num_layers, 2, 10, TINY_BASE.hidden_size))
    mask = np.ones((2, 10), np.int32)
    perm = np.array([2, 0, 3, 1])
    latents = hn.layer_latents(d2l.config, d2l.base.config, d2l.params, features, mask)
    permuted = hn.layer_latents(d2l.config, d2l.base.config, d2l.params, features[perm], mask)
    np.testing.assert_allclose(permuted, latents[perm], atol=1e-5)


def test_chunk_groups_equal_one_pass(tiny_d2l):
    config = tiny_d2l.config
    chunks, _ = tiny_d2l.document_chunks(DOCS[1] * 2)
    length = max(map(len, chunks))
    tokens = np.zeros((4, length), np.int32)
    mask = np.zeros((4, length), np.int32)
    for i, c in enumerate(chunks[:4]):
        tokens[i, : len(c)], mask[i, : len(c)] = c, 1
    args = (tiny_d2l.base.config, tiny_d2l.base.params, tiny_d2l.params)
    grouped = hn.encode_chunks(config, *args, tokens.reshape(2, 2, -1), mask.reshape(2, 2, -1))
    at_once = hn.encode_chunks(config, *args, tokens[None], mask[None])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), grouped, at_once)


def test_rows_with_different_adapters_equal_each_alone(tiny_d2l):
    adapters = tiny_d2l.internalize(DOCS)
    rank = max(a.lora.A["down_proj"].shape[2] for a in adapters)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, rank - x.shape[2]), (0, 0)))
    stacked = LoRA(
        A={m: jnp.concatenate([pad(a.A[m]) for a in adapters]) for m in adapters[0].A},
        B={m: jnp.concatenate([pad(a.B[m]) for a in adapters]) for m in adapters[0].B},
        alpha=adapters[0].lora.alpha,
    )
    ids = np.array([tiny_d2l.base.chat_ids([{"role": "user", "content": "Where is it?"}])] * 2)
    batched = np.asarray(tiny_d2l.base.logits(ids, lora=stacked))
    for row, adapter in enumerate(adapters):
        np.testing.assert_allclose(batched[row], np.asarray(tiny_d2l.logits(ids[:1], adapter=adapter))[0], atol=1e-5)


def test_per_layer_features_follow_reference_definition(tiny_llama):
    """Entry l is the input of layer l; the last entry is the final-normed output of layer L-2."""
    model, torch_model = tiny_llama
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 7))
    features = context_features(d2l_jax.HypernetConfig(), model.config, model.params, ids, np.ones_like(ids))
    with torch.no_grad():
        hidden = torch_model(torch.as_tensor(ids), output_hidden_states=True).hidden_states
        last = torch_model.model.norm(hidden[model.config.num_layers - 1])
    num_layers = model.config.num_layers
    assert features.shape == (num_layers, 1, 7, model.config.hidden_size)
    for layer in range(num_layers - 1):
        np.testing.assert_allclose(features[layer], hidden[layer].numpy(), atol=1e-5)
    np.testing.assert_allclose(features[-1], last.numpy(), atol=1e-5)
    exit_features = context_features(d2l_jax.HypernetConfig(encoder_type="early_exit", early_exit_layer=2), model.config, model.params, ids, np.ones_like(ids))
    with torch.no_grad():
        np.testing.assert_allclose(exit_features, torch_model.model.norm(hidden[2]).numpy(), atol=1e-5)


def test_bad_documents_and_configs(tiny_d2l, tiny_base):
    with pytest.raises(ValueError, match="empty"):
        tiny_d2l.internalize("   ")
    with pytest.raises(TypeError, match="must be a str or a list of str, got int"):
        tiny_d2l.internalize(5)
    with pytest.raises(TypeError, match="must be a str, got bytes"):
        tiny_d2l.internalize([b"bytes"])
    with pytest.raises(ValueError, match="unknown target modules"):
        d2l_jax.HypernetConfig(target_modules=("lm_head",))
    with pytest.raises(ValueError, match=r"early_exit_layer=9 outside 1..4"):
        d2l_jax.D2L.create(tiny_base, TINY_HYPER.replace(encoder_type="early_exit", early_exit_layer=9))
    with pytest.raises(ValueError, match=r"adapted_layers=5 exceeds the base model's 4 layers"):
        d2l_jax.D2L.create(tiny_base, TINY_HYPER.replace(adapted_layers=5))
    with pytest.raises(ValueError, match="adapted_layers must be >= 0"):
        TINY_HYPER.replace(adapted_layers=-1)


def test_chunks_respect_max_chunk_len_and_cover_the_document(tiny_d2l):
    chunks, total = tiny_d2l.document_chunks(DOCS[1])
    prefix, suffix = tiny_d2l.affixes
    assert len(chunks) > 2 and all(len(c) <= tiny_d2l.config.max_chunk_len for c in chunks)
    assert all(c[: len(prefix)] == prefix and c[-len(suffix) :] == suffix for c in chunks)
    pieces = [c[len(prefix) if i else 0 : len(c) - (len(suffix) if i < len(chunks) - 1 else 0)] for i, c in enumerate(chunks)]
    document = tiny_d2l.base.tokenizer(DOCS[1].strip(), add_special_tokens=False)["input_ids"]
    assert sum(pieces, []) == prefix + document + suffix and total == len(prefix + document + suffix)


def test_documents_in_one_bucket_compile_once(tiny_d2l, monkeypatch):
    from d2l_jax.hypernet import adapter

    traces = []

    @functools.wraps(hn.document_adapters)
    def counted(*args, **kwargs):
        traces.append(1)
        return hn.document_adapters(*args, **kwargs)

    monkeypatch.setattr(adapter, "_document_adapters", jax.jit(counted, static_argnames=("config", "base", "execution")))
    first = tiny_d2l.internalize("The vault code is 4817, and the vault is old.")
    second = tiny_d2l.internalize("The vault code is 4817, and the vault is old and red.")
    assert first.num_tokens != second.num_tokens and first.num_chunks == second.num_chunks == 1
    assert bucket_length(first.num_tokens) == bucket_length(second.num_tokens)
    assert len(traces) == 1
    tiny_d2l.internalize(DOCS[1])  # another chunk shape compiles anew
    assert len(traces) == 2


def test_adapter_is_a_pytree_of_its_arrays(tiny_d2l):
    adapter = tiny_d2l.internalize(DOCS[0])
    leaves = jax.tree.leaves(adapter)
    assert len(leaves) == 2 * len(tiny_d2l.config.target_modules) and all(isinstance(x, jax.Array) for x in leaves)
    assert isinstance(jax.block_until_ready(adapter), type(adapter))
    moved = jax.tree.map(lambda x: x * 0, adapter)
    assert (moved.rank, moved.num_tokens, moved.num_chunks) == (adapter.rank, adapter.num_tokens, adapter.num_chunks)


def test_current_adapter_and_reset(tiny_d2l):
    ids = [tiny_d2l.base.chat_ids([{"role": "user", "content": "Where is the vault?"}])]
    base = np.asarray(tiny_d2l.base.logits(ids))
    tiny_d2l.internalize(DOCS[0])
    assert np.abs(np.asarray(tiny_d2l.logits(ids)) - base).max() > 1e-3
    tiny_d2l.reset()
    np.testing.assert_array_equal(np.asarray(tiny_d2l.logits(ids)), base)


@pytest.mark.parametrize("queries", [3, 40])
def test_absorbed_cross_attention_equals_explicit_keys_and_values(queries):
    from d2l_jax.hypernet.perceiver import CrossAttentionLayer

    latents = jax.random.normal(jax.random.key(0), (2, queries, TINY_HYPER.latent_size))
    context = jax.random.normal(jax.random.key(1), (2, 11, TINY_HYPER.latent_size))
    context = context / jnp.sqrt(jnp.mean(context**2, axis=-1, keepdims=True) + TINY_HYPER.rms_norm_eps)
    mask = np.arange(11)[None] < np.array([[11], [6]])
    params = CrossAttentionLayer(TINY_HYPER).init(jax.random.key(2), latents, context, mask)
    absorbed, _ = CrossAttentionLayer(TINY_HYPER, absorb=True).apply(params, latents, context, mask)
    explicit, _ = CrossAttentionLayer(TINY_HYPER, absorb=False).apply(params, latents, context, mask)
    np.testing.assert_allclose(absorbed, explicit, atol=1e-5)
    assert np.abs(np.asarray(absorbed) - np.asarray(latents)).max() > 1e-2


def _layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * weight + bias


def test_head_matches_reference_formulas(tiny_d2l):
    """The head on ``[C, L, M, r, H]`` latents, written with the reference's einsums in NumPy."""
    from d2l_jax.hypernet.head import LoRAHead

    config, base = tiny_d2l.config, tiny_d2l.base.config
    p = jax.tree.map(np.asarray, tiny_d2l.params["head"])
    latents = np.asarray(jax.random.normal(jax.random.key(4), (2, base.num_layers, 2, config.lora_rank, config.latent_size)))
    x = latents
    block = p["pre_head_0"]
    h = _layer_norm(x, block["norm_in"]["scale"], block["norm_in"]["bias"])
    h = np.einsum("clmrh,lhk->clmrk", h, block["mix1_kernel"]) + block["mix1_bias"][None, :, None, None, :]
    h = h / (1 + np.exp(-h))
    h = np.einsum("clmrk,lkh->clmrh", h, block["mix2_kernel"]) + block["mix2_bias"][None, :, None, None, :]
    x = x + _layer_norm(h, block["norm_out"]["scale"], block["norm_out"]["bias"])
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    flat = np.einsum("clmrh,lmhd->clmrd", x, p["head"])
    a, b = LoRAHead(config, base).apply({"params": tiny_d2l.params["head"]}, jnp.asarray(latents.transpose(1, 0, 2, 3, 4)))
    shapes = base.projection_shapes()
    for i, module in enumerate(config.target_modules):  # sorted: down_proj, q_proj
        d_in, d_out = shapes[module]
        np.testing.assert_allclose(a[module], flat[:, :, i, :, :d_in] * p[f"scaler_A_{module}"][None, :, :, None], atol=1e-5)
        np.testing.assert_allclose(b[module], flat[:, :, i, :, d_in : d_in + d_out] * p[f"scaler_B_{module}"][None, :, :, None], atol=1e-5)


def _np_rms(x, weight, eps=1e-6):
    return weight * (x / np.sqrt((x**2).mean(-1, keepdims=True) + eps))


def _np_swiglu(x, p):
    gate = x @ p["gate_proj"]["kernel"]
    return (gate / (1 + np.exp(-gate)) * (x @ p["up_proj"]["kernel"])) @ p["down_proj"]["kernel"]


def _np_cross_attention_layer(latents, context, mask, p, c):
    """The reference's Idefics2PerceiverLayer (flash path): keys/values from the normed context only."""
    n, q_len, _ = latents.shape
    latents_n = _np_rms(latents, p["input_latents_norm"]["scale"])
    context_n = _np_rms(context, p["input_context_norm"]["scale"])
    q = (latents_n @ p["q_proj"]).reshape(n, q_len, c.num_heads, c.head_dim)
    k = (context_n @ p["k_proj"]).reshape(n, -1, c.num_kv_heads, c.head_dim)
    v = (context_n @ p["v_proj"]).reshape(n, -1, c.num_kv_heads, c.head_dim)
    k, v = (np.repeat(t, c.num_heads // c.num_kv_heads, axis=2) for t in (k, v))  # HF repeat_kv
    scores = np.einsum("nqhd,nshd->nhqs", q, k) / np.sqrt(c.head_dim)
    scores = np.where(mask[:, None, None, :], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attended = np.einsum("nhqs,nshd->nqhd", probs, v).reshape(n, q_len, -1) @ p["o_proj"]
    latents = latents + _np_rms(attended, p["post_attention_norm"]["scale"])
    return latents + _np_rms(_np_swiglu(_np_rms(latents, p["pre_ff_norm"]["scale"]), p["mlp"]), p["post_ff_norm"]["scale"])


def _np_resampler(context, mask, p, c, num_layers):
    latents = np.broadcast_to(p["latents_q"], (context.shape[0], *p["latents_q"].shape))
    for i in range(num_layers):
        layer = jax.tree.map(lambda x: x[i], p["layers"])
        latents = _np_cross_attention_layer(latents, context, mask, layer, c)
    return _np_rms(latents, p["norm"]["scale"])


@pytest.mark.parametrize("unroll", [1, 2], ids=["block-loop", "blocks-unrolled"])
@pytest.mark.parametrize("n_latents", [3, 40], ids=["absorbed", "explicit"])
def test_perceiver_matches_reference_formulas(n_latents, unroll):
    from d2l_jax.hypernet.perceiver import Perceiver

    config = TINY_HYPER.replace(n_latent_queries=n_latents)
    features = np.asarray(jax.random.normal(jax.random.key(3), (2, 9, 48)))
    mask = np.arange(9)[None] < np.array([[9], [5]])
    perceiver = Perceiver(config, num_outputs=6, execution=d2l_jax.HypernetExecution(scan_unroll=unroll))
    params = perceiver.init(jax.random.key(4), features, mask)["params"]
    params = jax.tree.map(lambda x: np.asarray(x) + 0.1 * np.random.default_rng(0).standard_normal(x.shape), nn.unbox(params))
    p = jax.tree.map(np.asarray, params)
    context = _np_swiglu(features, p["modality_projection"])
    latents = _np_resampler(context, mask, p["encoder"], config, config.num_blocks)
    expected = _np_resampler(latents, np.ones(latents.shape[:2], bool), p["decoder"], config, 1)
    np.testing.assert_allclose(perceiver.apply({"params": params}, features, mask), expected, atol=2e-5)


def test_shared_pre_head_block_matches_reference_formula(tiny_d2l):
    """per_layer_processing=False: one ResMLP (Linear with bias) shared by every layer."""
    config = tiny_d2l.config.replace(per_layer_processing=False)
    params = nn.unbox(hn.init_hypernet(config, tiny_d2l.base.config, jax.random.key(6)))
    block = jax.tree.map(np.asarray, params["head"]["pre_head_0"])
    width = config.latent_size
    assert block["linear1"]["kernel"].shape == (width, 4 * width) and block["linear2"]["kernel"].shape == (4 * width, width)
    x = np.asarray(jax.random.normal(jax.random.key(7), (3, 5, width)))
    h = _layer_norm(x, block["norm_in"]["scale"], block["norm_in"]["bias"]) @ block["linear1"]["kernel"] + block["linear1"]["bias"]
    h = (h / (1 + np.exp(-h))) @ block["linear2"]["kernel"] + block["linear2"]["bias"]
    expected = x + _layer_norm(h, block["norm_out"]["scale"], block["norm_out"]["bias"])
    from d2l_jax.hypernet.head import ResMLPShared

    np.testing.assert_allclose(ResMLPShared().apply({"params": params["head"]["pre_head_0"]}, x), expected, atol=1e-5)


@pytest.mark.parametrize("encoder_type", ["per_layer_activations", "early_exit"])
def test_adapted_layers_get_the_adapter_and_the_rest_zero(tiny_base, encoder_type):
    config = TINY_HYPER.replace(encoder_type=encoder_type, adapted_layers=2)
    d2l = randomized(d2l_jax.D2L.create(tiny_base, config, seed=1))
    assert d2l.params["head"]["head"].shape[0] == 2 and d2l.params["head"]["bias_B_q_proj"].shape[0] == 2
    adapter = d2l.internalize(DOCS[1])
    for module in config.target_modules:
        a, b = np.asarray(adapter.A[module][0]), np.asarray(adapter.B[module][0])
        assert a.shape[0] == b.shape[0] == TINY_BASE.num_layers
        assert not a[:2].any() and not b[:2].any()
        assert np.abs(a[2:]).max() > 0 and np.abs(b[2:]).max() > 1e-3


def test_per_rank_head_with_equal_rank_weights_equals_shared_head(tiny_base):
    shared = randomized(d2l_jax.D2L.create(tiny_base, TINY_HYPER.replace(target_modules=("down_proj",)), seed=2))
    config = shared.config.replace(per_rank_head=True)
    params = jax.tree.map(lambda x: x, shared.params)
    kernel = shared.params["head"]["head"]  # [L, H, d]
    params["head"]["head"] = jnp.broadcast_to(kernel[:, None, None], (kernel.shape[0], 1, config.lora_rank, *kernel.shape[1:]))
    per_rank = d2l_jax.D2L(tiny_base, config, params)
    fresh_shape = nn.unbox(jax.eval_shape(lambda: hn.init_hypernet(config, TINY_BASE, jax.random.key(0))))["head"]["head"].shape
    assert fresh_shape == params["head"]["head"].shape
    ours, theirs = per_rank.internalize(DOCS[0]), shared.internalize(DOCS[0])
    np.testing.assert_allclose(ours.B["down_proj"], theirs.B["down_proj"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.A["down_proj"], theirs.A["down_proj"], rtol=1e-5, atol=1e-6)


def test_zero_head_init_zeroes_only_the_b_columns(tiny_base):
    config = TINY_HYPER.replace(b_init="zero_head")
    head = d2l_jax.D2L.create(tiny_base, config, seed=0).params["head"]
    shapes = TINY_BASE.projection_shapes()
    for i, module in enumerate(config.target_modules):
        d_in, d_out = shapes[module]
        kernel = np.asarray(head["head"][:, i])  # [L, H, d_lora]
        assert np.abs(kernel[..., :d_in]).min() > 0 and not kernel[..., d_in:].any()
        np.testing.assert_array_equal(head[f"scaler_B_{module}"], 1.0)


def test_shared_a_gives_every_chunk_one_a_and_leaves_the_document_to_b(tiny_base):
    config = TINY_HYPER.replace(shared_a=True, per_rank_head=True)
    d2l = randomized(d2l_jax.D2L.create(tiny_base, config, seed=4))
    adapters = [d2l.internalize(doc) for doc in DOCS]
    assert adapters[1].num_chunks > 1
    r = config.lora_rank
    for module in config.target_modules:
        shared = np.asarray(d2l.params["head"][f"shared_A_{module}"])  # [L, r, d_in]
        assert f"scaler_A_{module}" not in d2l.params["head"]
        for adapter in adapters:
            a = np.asarray(adapter.lora.A[module][0])
            for chunk in range(adapter.num_chunks):
                np.testing.assert_array_equal(a[:, chunk * r : (chunk + 1) * r], shared)
        b_first, b_second = (np.asarray(adapter.lora.B[module][0, :, :r]) for adapter in adapters)
        assert np.abs(b_first - b_second).max() > 1e-3 * np.abs(b_first).max()


def test_centering_subtracts_the_stored_or_the_batch_mean_from_the_head_inputs():
    """Without pre-head blocks the head's inputs are the latents: centred on m equals uncentred on latents - m."""
    config = TINY_HYPER.replace(center_head_input=True, num_pre_head_layers=0)
    shape = (config.num_adapted(TINY_BASE), 3, len(config.target_modules), config.lora_rank, config.latent_size)
    latents = jax.random.normal(jax.random.key(0), shape)
    variables = nn.unbox(LoRAHead(config, TINY_BASE).init(jax.random.key(1), latents))
    params = {k: jnp.ones_like(v) if k.startswith("scaler_B") else v for k, v in variables["params"].items()}
    stats = variables["stats"]  # the mean is a statistic beside the parameters, not one of them
    assert "input_mean" not in params and not np.any(stats["input_mean"])
    mean = jax.random.normal(jax.random.key(2), stats["input_mean"].shape)
    centred = LoRAHead(config, TINY_BASE).apply({"params": params, "stats": {"input_mean": mean}}, latents)
    plain = LoRAHead(config.replace(center_head_input=False), TINY_BASE).apply({"params": params}, latents - mean[:, None])
    uncentred = LoRAHead(config, TINY_BASE).apply({"params": params, "stats": stats}, latents)
    for got, want, other in zip(centred, plain, uncentred):
        for module in config.target_modules:
            np.testing.assert_allclose(got[module], want[module], rtol=1e-5, atol=1e-6)
            assert np.abs(np.asarray(got[module] - other[module])).max() > 1e-3
    # Training centres on the mean over the chunks it is told are real (here the first two of three).
    on_batch = LoRAHead(config, TINY_BASE).apply({"params": params, "stats": stats}, latents, center_on=jnp.array([True, True, False]))
    batch_mean = latents[:, :2].mean(axis=1)
    on_stored = LoRAHead(config, TINY_BASE).apply({"params": params, "stats": {"input_mean": batch_mean}}, latents)
    for got, want in zip(on_batch, on_stored):
        for module in config.target_modules:
            np.testing.assert_allclose(got[module], want[module], rtol=1e-5, atol=1e-6)


def test_matmul_weights_in_the_compute_dtype_give_adapters_within_bfloat16_precision(tiny_base):
    """D2L casts its matmul weights to a bfloat16 execution's compute dtype once instead of per call. The
    norms, biases, scalers, latent queries and the bias LoRA stay float32, and the adapters agree with the
    float32 execution's to bfloat16's precision (an 8-bit significand: 2**-8 relative per rounding, a few
    roundings deep), where XLA on the CPU otherwise keeps float32 weights in float32 (excess precision)."""
    hyper = TINY_HYPER.replace(center_head_input=True)
    d2l = randomized(d2l_jax.D2L.create(tiny_base, hyper, seed=0, execution=TINY_EXECUTION.replace(dtype="bfloat16")))
    cast = hn.matmul_weights_in(d2l.params, "bfloat16")
    dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(cast)}
    for name in ("['perceiver']['encoder']['layers']['q_proj']", "['head']['head']", "['perceiver']['modality_projection']['up_proj']['kernel']"):
        assert dtypes[name] == jnp.bfloat16, name
    for name in ("['head']['bias_A_down_proj']", "['head']['bias_B_down_proj']", "['perceiver']['encoder']['latents_q']", "['head']['scaler_A_down_proj']"):
        assert dtypes[name] == jnp.float32, name
    assert hn.matmul_weights_in(d2l.params, "float32") is d2l.params
    documents = [d2l.document_chunks(doc) for doc in DOCS]
    run = lambda execution, params: jax.tree.leaves(batched_adapters(d2l.config, execution, tiny_base.config, tiny_base.params, params, documents))
    for x, y in zip(run(d2l.execution, cast), run(TINY_EXECUTION, d2l.params)):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        assert np.abs(x - y).max() <= 2**-6 * np.abs(y).max()
    first = d2l._inference_params()
    assert d2l._inference_params() is first  # cast once
    d2l.params = jax.tree.map(lambda x: x * 2, d2l.params)
    assert d2l._inference_params() is not first  # new parameters, cast again
