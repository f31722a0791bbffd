"""The reference's two training recipes at full size (reference-facts section 6.3), for any base model.

The reference packs several (context, query) samples into one row per GPU with segment boundaries
(``max_packed_ctx_len`` context tokens and ``max_packed_inp_len`` student tokens per row) and has no
padding. This trainer takes static rows of one context and one query each, so a reference row becomes
a group of rows with the same token budget on one chip: the context budget is split into chunk rows and
the student budget into query rows. The global number of such groups per optimizer step is the
reference's (GPUs x gradient accumulation); on another number of chips keep ``batch_size x
grad_accum_steps`` and set ``batch_size`` to a multiple of the chips, e.g. for the main recipe on a
4-chip slice ``--config.train.batch_size=4 --config.train.grad_accum_steps=16``.

The ``base_execution`` section stores the frozen base in bfloat16, runs its matmuls in bfloat16 and
rematerialises every decoder layer in the backward pass; the hypernetwork keeps float32 parameters and
AdamW state and runs its matmuls in bfloat16 (``execution``: the reference's bf16 autocast). Not reproduced: NEFTune
noise on the student embeddings (main recipe) and the 4-bit context encoder.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from d2l_jax.hypernet.config import HypernetConfig

BF16_BASE = dict(param_dtype="bfloat16", dtype="bfloat16", remat_policy="full")


def main_experiment(model: str) -> ml_collections.ConfigDict:
    """Main stage 1 (scripts/main_exp/1-train.sh): 8 GPUs x 1 packed row x 8 accumulation steps, packed
    lengths 4096 (contexts) / 4096 (student), QAs of at most 2048 tokens, one QA per context, no
    chunking, top-16 KL to offline teacher log-probabilities, L1 0.1, 80k steps.

    Here one reference row = one row of a 4096-token context (one chunk) and a 4096-token student sequence
    scored at up to 2048 response positions, so a step is 64 such rows (``batch_size=8``, 8 accumulation steps).
    """
    config = ml_collections.ConfigDict()
    config.model = model
    # iterative: the Perceiver reads one base layer's features at a time (same outputs). Batched, it reads
    # all layers as one layer-major batch, which merges the layer axis with the chunk axis that is sharded
    # over the batch mesh axes; XLA then holds every chunk's activations on every chip (see docs/tpu.md).
    config.hypernet = dataclasses.asdict(HypernetConfig(max_chunk_len=4096, max_chunks=1))
    config.execution = dict(dtype="bfloat16", iterative=True, chunk_group_size=1)
    config.train = dict(
        loss="top_k_kl",
        teacher="offline",
        top_k=16,
        l1_coef=0.1,
        learning_rate=4e-5,
        min_learning_rate=1e-7,
        warmup_steps=100,
        steps=80_000,
        weight_decay=0.01,
        max_grad_norm=1.0,
        batch_size=8,
        grad_accum_steps=8,
        seed=42,
        mesh=(),
    )
    config.data = dict(
        # Self-generated QA records (context, prompt, response, teacher_log_probs [labels, 16], teacher_ids).
        source=dict(name="records", options=dict(path="data/self_gen_qa_level1.parquet")),
        chunk_probs=(),
        min_chunk_len=25,
        chunks_per_context=1,
        max_student_len=4096,
        max_labels=2048,
        max_teacher_len=0,
    )
    config.base_execution = dict(BF16_BASE)
    config.eval_every = 0  # the reference trains with evaluation off
    config.checkpoint_every = 5000
    config.keep_checkpoints = 2
    config.log_every = 10
    config.time_limit_minutes = 0.0
    return config


def niah_experiment(model: str) -> ml_collections.ConfigDict:
    """NIAH for Mistral-7B (scripts/niah/train_mistral_7b.sh on top of scripts/niah/1-train.sh): one GPU,
    one packed row x 64 accumulation steps, packed lengths 1024 / 1024, CE on the 4-digit answer, early-exit
    encoder (layer L // 4), 208 latents, 8 blocks, L1 2.0, chunks of at least 25 tokens drawn from the
    reference's chunk-count probabilities, contexts of 32-128 and 128-256 tokens, one epoch
    (about 640k contexts), seed 1, evaluation every 100 steps on 100 contexts.

    Here one reference row = 2 rows, each a context in up to 2 chunk rows of 256 tokens (1024 context slots)
    and a 64-token student sequence (a NIAH query is about 40 tokens; the reference's 1024 is a bound it
    does not reach with ~4 contexts per row). Chunk counts above 2 are left out of the draw, as they would
    not fit. One epoch is 640k / (2 x 64) = 5000 steps.
    """
    config = ml_collections.ConfigDict()
    config.model = model
    config.hypernet = dataclasses.asdict(HypernetConfig.niah(max_chunk_len=256, max_chunks=2))
    config.execution = dict(dtype="bfloat16", chunk_group_size=1)
    config.train = dict(
        loss="ce",
        teacher="online",
        l1_coef=2.0,
        learning_rate=4e-5,
        min_learning_rate=1e-7,
        warmup_steps=100,
        steps=5000,
        weight_decay=0.01,
        max_grad_norm=1.0,
        batch_size=2,
        grad_accum_steps=64,
        seed=1,
        mesh=(),
    )
    config.data = dict(
        source=dict(name="niah", options=dict(bins=((32, 128), (128, 256)))),
        chunk_probs=((1, 0.5), (2, 0.125)),
        min_chunk_len=25,
        chunks_per_context=2,
        max_student_len=64,
        max_labels=8,
        max_teacher_len=0,
    )
    config.base_execution = dict(BF16_BASE)
    config.evaluator = dict(name="niah", options=dict(bin=(32, 256), contexts=100))
    config.eval_every = 100
    config.checkpoint_every = 500
    config.keep_checkpoints = 2
    config.log_every = 10
    config.time_limit_minutes = 0.0
    return config
