"""A tiny random D2L with SmolLM2's tokenizer (so NIAH documents tokenize as they do for SmolLM2) and a
512-token window, shared by the evaluation tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import d2l_jax
from d2l_jax.models.base_model import BaseModel
from d2l_jax.models.decoder import Decoder
from d2l_jax.models.families import DecoderConfig
from tests.conftest import randomized

TINY_BASE = DecoderConfig(
    vocab_size=49152, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512
)
TINY_HYPER = d2l_jax.HypernetConfig(
    encoder_type="early_exit", latent_size=32, n_latent_queries=4, num_blocks=1, num_heads=4, head_dim=8, num_kv_heads=2,
    lora_rank=2, max_chunk_len=64, max_chunks=2,
)


@pytest.fixture(scope="module")
def tiny_d2l(smollm2):
    """Non-zero B (as after training), so its adapters change the base model's replies."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = nn.unbox(Decoder(TINY_BASE).init(jax.random.key(1), tokens, tokens, tokens + 1))["params"]
    base = BaseModel("tiny", TINY_BASE, params, smollm2.tokenizer, smollm2.stop_token_ids)
    return randomized(d2l_jax.D2L.create(base, TINY_HYPER, seed=0, execution=d2l_jax.HypernetExecution(chunk_group_size=2)))
