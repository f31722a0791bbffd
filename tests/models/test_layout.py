"""Layers held apart (``d2l_jax.models.layout``): the same parameters, the same numbers as stacked ones."""

import dataclasses

import chex
import jax
import numpy as np

import d2l_jax
from d2l_jax.hypernet.adapter import batched_adapters
from d2l_jax.hypernet.hypernet import matmul_weights_in
from d2l_jax.models.decoder import first_layers_hidden_states
from d2l_jax.models.generate import generate_tokens
from d2l_jax.models.layout import split_layers, stacked_layers
from tests.conftest import random_base, randomized
from tests.hypernet.test_hypernet import TINY_BASE, TINY_HYPER


def test_split_layers_round_trips_and_leaves_loops_that_are_not_unrolled_stacked(tiny_llama):
    params = tiny_llama[0].params
    layers = tiny_llama[0].config.num_layers
    split = split_layers(params, layers)
    assert isinstance(split["layers"], tuple) and len(split["layers"]) == layers
    chex.assert_trees_all_equal(split["layers"][1], jax.tree.map(lambda p: p[1], params["layers"]))
    chex.assert_trees_all_equal(stacked_layers(split), params)
    assert split_layers(split, layers)["layers"] is split["layers"]
    assert split_layers(params, layers - 1)["layers"] is params["layers"]
    chex.assert_trees_all_equal(stacked_layers(params), params)


def test_a_model_with_its_layers_apart_computes_what_the_stacked_one_does(tiny_llama):
    stacked = tiny_llama[0]
    stacked = dataclasses.replace(stacked, config=stacked.config.replace(scan_unroll=stacked.config.num_layers), stop_token_ids=(0,))
    apart = dataclasses.replace(stacked, params=split_layers(stacked.params, stacked.config.num_layers))
    ids = np.random.default_rng(0).integers(1, stacked.config.vocab_size, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    chex.assert_trees_all_equal(apart.logits(ids, mask), stacked.logits(ids, mask))
    hidden = [first_layers_hidden_states(m.config, m.params, ids, mask, 2) for m in (apart, stacked)]
    chex.assert_trees_all_close(*hidden, rtol=1e-5, atol=1e-5)  # a Python loop against a scan: rounding apart
    prompts = [[1, 5, 9, 3], [7, 2]]
    replies = [generate_tokens(*args, buffer=buffer) for args, buffer in (m.generation_args(prompts, 6, None, 0.0, 1.0, 0) for m in (apart, stacked))]
    chex.assert_trees_all_equal(*replies)


def test_a_hypernetwork_with_its_perceiver_blocks_apart_writes_the_same_adapter(smollm2):
    base = random_base(TINY_BASE.replace(scan_unroll=TINY_BASE.num_layers), smollm2)
    execution = d2l_jax.HypernetExecution(dtype="bfloat16", scan_unroll=TINY_HYPER.num_blocks)
    d2l = d2l_jax.D2L(base, TINY_HYPER, randomized(d2l_jax.D2L.create(base, TINY_HYPER, seed=0)).params, execution)
    weights = matmul_weights_in(d2l.params, execution.dtype)
    documents = [d2l.document_chunks("The code of the red door is 4721. " * 3)]
    run = lambda base_params, params: batched_adapters(TINY_HYPER, execution, base.config, base_params, params, documents)[0]
    stacked = run(base.params, weights)
    apart = run(split_layers(base.params, TINY_BASE.num_layers), split_layers(weights, TINY_HYPER.num_blocks))
    assert isinstance(d2l._inference_params()["perceiver"]["encoder"]["layers"], tuple)
    assert float(np.abs(np.asarray(stacked.lora.B["down_proj"], np.float32)).max()) > 0
    chex.assert_trees_all_equal(apart.lora, stacked.lora)
