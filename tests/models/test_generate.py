"""KV-cache generation agrees with full forwards; padding, batching, stopping and sampling behave."""

import chex
import jax
import numpy as np
import pytest

from d2l_jax.models import generate as gen
from d2l_jax.models.decoder import KVCache, causal_blocks
from tests.models.test_lora import random_lora

NEVER = np.array([-5], np.int32)


def run(model, prompts, new_tokens, lora=None, stop_ids=NEVER, temperature=0.0, top_p=1.0, seed=0, length=16):
    tokens, mask = gen.left_pad(prompts, length, len(prompts), pad_id=0)
    out = gen.generate_tokens(
        model.config, model.params, tokens, mask, lora, jax.random.key(seed), stop_ids,
        np.float32(temperature), np.float32(top_p), np.int32(new_tokens), buffer=gen.bucket_length(new_tokens),
    )
    return np.asarray(out)[:, :new_tokens]


def greedy_by_full_forward(model, prompt, new_tokens, lora=None):
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(np.argmax(np.asarray(model.logits([ids], lora=lora))[0, -1])))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def prompts(tiny_llama):
    rng = np.random.default_rng(0)
    return [list(rng.integers(0, tiny_llama[0].config.vocab_size, n)) for n in (3, 7, 12)]


def test_cached_greedy_equals_full_forward(tiny_llama, prompts):
    model, _ = tiny_llama
    assert run(model, [prompts[1]], 10)[0].tolist() == greedy_by_full_forward(model, prompts[1], 10)


def test_cached_greedy_with_lora_equals_full_forward(tiny_llama, prompts):
    model, _ = tiny_llama
    lora = random_lora(model.config, 1, ["down_proj", "k_proj"], seed=1)
    assert run(model, [prompts[2]], 8, lora=lora)[0].tolist() == greedy_by_full_forward(model, prompts[2], 8, lora)


def test_cached_step_logits_equal_full_forward(tiny_llama, prompts):
    model, _ = tiny_llama
    prompt = np.array([prompts[2]])
    n = prompt.shape[1]
    variables = {"params": model.params}
    positions = np.arange(n)[None]
    prefill = model.decoder.apply(variables, prompt, positions, np.ones_like(prompt), cache=KVCache.empty(model.config, 1, 32))
    step = model.decoder.apply(variables, np.array([[5]]), np.array([[n]]), np.ones((1, 1), np.int32), cache=prefill.cache)
    full = np.asarray(model.logits(np.concatenate([prompt, [[5]]], axis=1)))
    np.testing.assert_allclose(np.asarray(prefill.logits)[0], full[0, :n], atol=1e-5)
    np.testing.assert_allclose(np.asarray(step.logits)[0, 0], full[0, n], atol=1e-5)
    assert int(step.cache.index) == n + 1


def test_left_padded_batch_equals_single_prompts(tiny_llama, prompts):
    model, _ = tiny_llama
    chex.assert_trees_all_equal(list(run(model, prompts, 9)), [run(model, [prompt], 9, length=12)[0] for prompt in prompts])


def test_stops_at_stop_token(tiny_llama, prompts):
    model, _ = tiny_llama
    full = run(model, [prompts[0]], 12)[0]
    stop = full[3]
    first = int(np.argmax(full == stop))
    out = run(model, [prompts[0]], 12, stop_ids=np.array([stop], np.int32))[0]
    assert out[: first + 1].tolist() == full[: first + 1].tolist()
    assert (out[first + 1 :] == gen.NO_TOKEN).all()
    assert gen.strip_after_stop(out, {int(stop)}) == full[:first].tolist()


def test_sampling_is_seeded_and_top_p_limits_it(tiny_llama, prompts):
    model, _ = tiny_llama
    greedy = run(model, [prompts[1]], 10)
    hot = [run(model, [prompts[1]], 10, temperature=5.0, seed=s) for s in (0, 0, 1)]
    np.testing.assert_array_equal(hot[0], hot[1])
    assert not np.array_equal(hot[0], hot[2])
    np.testing.assert_array_equal(run(model, [prompts[1]], 10, temperature=5.0, top_p=1e-6, seed=3), greedy)


@pytest.mark.parametrize("n, bucket", [(1, 16), (16, 16), (17, 24), (25, 32), (33, 48), (49, 64), (1300, 1536)])
def test_bucket_length(n, bucket):
    assert gen.bucket_length(n) == bucket


def test_prefill_into_an_empty_cache_attends_in_causal_blocks_and_equals_full_forward(tiny_llama):
    model, _ = tiny_llama
    n = 96
    assert causal_blocks(n) > 1  # the blocked path, which shorter prompts do not take
    prompt = np.random.default_rng(1).integers(0, model.config.vocab_size, (1, n))
    variables = {"params": model.params}
    empty = KVCache.empty(model.config, 1, n + 8)
    prefill = model.decoder.apply(variables, prompt, np.arange(n)[None], np.ones_like(prompt), cache=empty)
    assert empty.unwritten and not prefill.cache.unwritten  # later calls attend over every slot
    step = model.decoder.apply(variables, np.array([[5]]), np.array([[n]]), np.ones((1, 1), np.int32), cache=prefill.cache)
    full = np.asarray(model.logits(np.concatenate([prompt, [[5]]], axis=1)))
    np.testing.assert_allclose(np.asarray(prefill.logits)[0], full[0, :n], atol=1e-5)
    np.testing.assert_allclose(np.asarray(step.logits)[0, 0], full[0, n], atol=1e-5)
