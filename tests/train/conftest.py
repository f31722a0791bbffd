import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2l_jax.hypernet.config import HypernetConfig
from d2l_jax.models.decoder import Decoder
from d2l_jax.models.families import DecoderConfig

# Widths divisible by every mesh axis size used in the sharding tests.
BASE = DecoderConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512
)
HYPER = HypernetConfig(
    latent_size=32, n_latent_queries=4, num_blocks=2, num_heads=4, head_dim=8, num_kv_heads=2, lora_rank=2,
    target_modules=("q_proj", "down_proj"), max_chunk_len=16, max_chunks=3,
)


def random_batch(seed=0, micro_batches=1, rows=2, teacher_top_k=None):
    """A batch in the train-step layout: rows contexts of 1-2 chunks, 12-token student sequences with 3 labels."""
    rng = np.random.default_rng(seed)
    chunks = 2 * rows
    a = micro_batches
    batch = dict(
        ctx_tokens=rng.integers(1, 256, (a, chunks, 16)),
        ctx_mask=np.ones((a, chunks, 16)),
        chunk_document=np.tile(np.repeat(np.arange(rows), 2), (a, 1)),
        chunk_slot=np.tile([0, 1] * rows, (a, 1)),
        num_chunks=np.full((a, rows), 2),
        tokens=rng.integers(1, 256, (a, rows, 12)),
        mask=np.ones((a, rows, 12)),
        label_positions=np.tile([7, 8, 9], (a, rows, 1)),
        labels=rng.integers(1, 256, (a, rows, 3)),
        label_mask=np.ones((a, rows, 3)),
        teacher_tokens=rng.integers(1, 256, (a, rows, 24)),
        teacher_mask=np.ones((a, rows, 24)),
        teacher_label_positions=np.tile([19, 20, 21], (a, rows, 1)),
    )
    batch["ctx_mask"][:, 1, 10:] = 0  # a shorter second chunk
    batch["chunk_document"][:, -1] = rows  # and a padding chunk
    batch["num_chunks"][:, -1] = 1
    batch["label_mask"][:, 0, 2] = 0
    return {k: v.astype(np.int32) for k, v in batch.items()}


@pytest.fixture(scope="module")
def base_params():
    tokens = jnp.zeros((1, 4), jnp.int32)
    return nn.unbox(Decoder(BASE).init(jax.random.key(1), tokens, tokens, tokens + 1))["params"]
