"""Analytic matmul FLOPs of one training step, over the padded shapes the hardware computes.

XLA's cost analysis counts the body of a scanned loop once, so it undercounts models whose layers run
under ``scan``; these counts are used for achieved FLOP/s instead. Elementwise work, softmax and norms
are left out; attention is counted in full (causal block skipping saves part of it).
"""

from __future__ import annotations

from d2l_jax.hypernet.config import HypernetConfig
from d2l_jax.hypernet.head import head_width
from d2l_jax.models.families import DecoderConfig
from d2l_jax.train.config import TrainConfig


def decoder_forward_flops(c: DecoderConfig, rows: int, tokens: int, layers: int, logits: int = 0, lora_rank: int = 0, lora_modules=()) -> float:
    """Forward FLOPs of ``layers`` decoder layers on ``[rows, tokens]``, plus ``logits`` positions per row."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    projections = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    attention = 2 * tokens * q
    shapes = c.projection_shapes()
    lora = sum(lora_rank * (shapes[m][0] + shapes[m][1]) for m in lora_modules)
    per_token = layers * 2 * (projections + attention + lora)
    return rows * (tokens * per_token + logits * 2 * c.hidden_size * c.vocab_size)


def hypernet_forward_flops(h: HypernetConfig, base: DecoderConfig, chunks: int, tokens: int) -> float:
    """Forward FLOPs of the Perceiver and head on ``[chunks, tokens]`` context features."""
    width, hidden = base.hidden_size, h.latent_size
    q, kv = h.num_heads * h.head_dim, h.num_kv_heads * h.head_dim
    feature_sets = h.num_adapted(base) if h.layer_to_layer else 1
    per_module = len(h.target_modules) * h.lora_rank
    outputs = per_module if h.layer_to_layer else h.num_adapted(base) * per_module
    projection = tokens * (2 * width * h.intermediate_factor * width + h.intermediate_factor * width * hidden)
    def cross_attention(latents: int, context: int) -> int:
        own = latents * (hidden * q + q * hidden + 3 * hidden * h.intermediate_factor * hidden)
        if latents * h.num_heads < kv:  # keys and values folded into the queries (see CrossAttentionLayer)
            return own + 2 * latents * h.num_heads * (h.head_dim + context) * hidden
        return own + context * 2 * hidden * kv + latents * context * 2 * q
    # The encoder's latents read the context tokens; the decoder's outputs read the encoder's latents.
    encoder = h.num_blocks * cross_attention(h.n_latent_queries, tokens)
    perceiver = projection + encoder + cross_attention(outputs, h.n_latent_queries)
    shapes = base.projection_shapes()
    lora_width = sum(head_width(shapes[m], h.shared_a) for m in h.target_modules)
    pre_head = h.num_pre_head_layers * 2 * hidden * h.intermediate_factor * hidden
    head = h.num_adapted(base) * h.lora_rank * (len(h.target_modules) * pre_head + hidden * lora_width)
    return 2 * chunks * (feature_sets * perceiver + head)


def train_step_flops(h: HypernetConfig, base: DecoderConfig, train: TrainConfig, batch: dict) -> float:
    """FLOPs of one optimizer step for a batch in the train-step layout (shapes only are read)."""
    micro, rows, student = batch["tokens"].shape
    chunks, chunk_len = batch["ctx_tokens"].shape[1:]
    labels = batch["labels"].shape[-1]
    encoder_layers = base.num_layers - 1 if h.layer_to_layer else (0 if h.encoder_type == "embed_only" else h.exit_layer(base))
    rank = (h.max_chunks + int(h.use_bias)) * h.lora_rank
    encoder = decoder_forward_flops(base, chunks, chunk_len, encoder_layers)
    hypernet = 3 * hypernet_forward_flops(h, base, chunks, chunk_len)  # forward + backward
    # Backward through the frozen student needs activation gradients only: about one more forward of
    # the adapted layers (the layers below them run outside the gradient).
    forward = lambda layers, logits: decoder_forward_flops(base, rows, student, layers, logits, rank, h.target_modules)
    student_flops = forward(base.num_layers, labels) + forward(h.num_adapted(base), labels)
    teacher = 0.0
    if "teacher_tokens" in batch:
        teacher = decoder_forward_flops(base, rows, batch["teacher_tokens"].shape[-1], base.num_layers, labels)
    return micro * (encoder + hypernet + student_flops + teacher)
