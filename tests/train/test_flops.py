"""Analytic FLOP counts against XLA's cost analysis where the latter is exact (a single scanned layer)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from d2l_jax.models.decoder import Decoder
from d2l_jax.train.flops import decoder_forward_flops, hypernet_forward_flops
from tests.train.conftest import BASE


def test_decoder_forward_flops_match_xla_on_one_layer():
    config = dataclasses.replace(BASE, num_layers=1, hidden_size=128, intermediate_size=384, num_heads=8, head_dim=16)
    rows, tokens, positions = 2, 32, 4
    ids = jnp.zeros((rows, tokens), jnp.int32)
    params = nn.unbox(Decoder(config).init(jax.random.key(0), ids, ids, ids + 1))["params"]
    logit_positions = jnp.zeros((rows, positions), jnp.int32)
    forward = lambda p: Decoder(config).apply({"params": p}, ids, ids, ids + 1, logit_positions=logit_positions).logits
    xla = jax.jit(forward).lower(params).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    analytic = decoder_forward_flops(config, rows, tokens, 1, positions)
    # XLA also counts elementwise work (norms, softmax, rotary), which the analytic count leaves out.
    assert 0.85 * xla["flops"] <= analytic <= xla["flops"]


@pytest.mark.parametrize("latents", [2, 64], ids=["folded-keys", "explicit-keys"])
def test_hypernet_forward_flops_match_xla_on_one_block(latents):
    from d2l_jax.hypernet import hypernet as hn
    from d2l_jax.hypernet.config import HypernetConfig

    base = dataclasses.replace(BASE, num_layers=3, hidden_size=128, intermediate_size=384)
    hyper = HypernetConfig(
        encoder_type="early_exit", early_exit_layer=1, latent_size=64, n_latent_queries=latents, num_blocks=1, num_heads=4, head_dim=16, num_kv_heads=2, lora_rank=2
    )
    chunks, tokens = 2, 48
    params = nn.unbox(hn.init_hypernet(hyper, base, jax.random.key(0)))
    features = jnp.zeros((chunks, tokens, base.hidden_size))
    mask = jnp.ones((chunks, tokens), jnp.int32)
    xla = jax.jit(lambda p: hn.chunk_adapters(hyper, base, p, features, mask)).lower(params).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    analytic = hypernet_forward_flops(hyper, base, chunks, tokens)
    assert 0.85 * xla["flops"] <= analytic <= xla["flops"]
