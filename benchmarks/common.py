"""Helpers shared by the benchmark scripts (run them from the repository root or this folder)."""

from __future__ import annotations

import resource
import time

import numpy as np


PRECISIONS = ("float32", "bfloat16")


def hypernet_config(name: str, precision: str = "float32"):
    """A named hypernetwork configuration and its execution: matmuls in ``precision`` (parameters stay
    float32); in bfloat16 the Perceiver's blocks are unrolled, as ``load_smollm2`` unrolls the base model's layers."""
    import d2l_jax

    config = {
        "main": d2l_jax.HypernetConfig(max_chunks=64),
        "niah": d2l_jax.HypernetConfig.niah(early_exit_layer=7),
        "niah_cpu": d2l_jax.HypernetConfig.niah_cpu(early_exit_layer=7, max_chunk_len=1024, max_chunks=64),
    }[name]
    unroll = 1 if precision == "float32" else config.num_blocks
    return config, d2l_jax.HypernetExecution(dtype=precision, scan_unroll=unroll)


def load_smollm2(precision: str = "float32"):
    """The embedded SmolLM2 in ``precision``: float32 as loaded, or bfloat16 weights and matmuls (float32
    sums) with the layer loops unrolled, which is how XLA's CPU backend multiplies bfloat16 fastest."""
    from d2l_jax.models.base_model import BaseExecution, base_architecture

    name = "smollm2-135m-instruct"
    unroll = 1 if precision == "float32" else base_architecture(name).num_layers
    return BaseExecution(param_dtype=precision, scan_unroll=unroll).load(name)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """The machine's fp32 matmul speed right now (it varies on shared machines); median of ``repeats``."""
    import jax
    import jax.numpy as jnp

    matmul = jax.jit(lambda a, b: a @ b)
    a = jnp.ones((size, size), jnp.float32)
    matmul(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / float(np.median(times)) / 1e9


# The train-step benchmarks' batch: the shapes the reference's PyTorch code was measured on.
CONTEXT, STUDENT, LABELS, TOP_K = 256, 64, 16, 16


def train_step_batch(vocab: int, with_targets: bool) -> dict:
    """One batch in the train-step layout: CONTEXT context tokens, STUDENT student tokens, the last LABELS
    of them labelled, and (``with_targets``) offline teacher targets of TOP_K ids; random, seed 0."""
    rng = np.random.default_rng(0)
    one = lambda *shape: np.ones((1, 1, *shape), np.int32)
    b = {
        "ctx_tokens": rng.integers(0, vocab, (1, 1, CONTEXT)).astype(np.int32),
        "ctx_mask": one(CONTEXT),
        "chunk_document": np.zeros((1, 1), np.int32),
        "chunk_slot": np.zeros((1, 1), np.int32),
        "num_chunks": np.ones((1, 1), np.int32),
        "tokens": rng.integers(0, vocab, (1, 1, STUDENT)).astype(np.int32),
        "mask": one(STUDENT),
        "label_positions": np.arange(STUDENT - LABELS - 1, STUDENT - 1, dtype=np.int32)[None, None],
        "labels": rng.integers(0, vocab, (1, 1, LABELS)).astype(np.int32),
        "label_mask": one(LABELS),
    }
    if with_targets:
        logits = rng.normal(size=(1, 1, LABELS, vocab)).astype(np.float32)
        ids = np.argsort(-logits, -1)[..., :TOP_K].astype(np.int32)
        log_probs = np.take_along_axis(logits, ids, -1) - np.log(np.exp(logits).sum(-1, keepdims=True))
        b.update(teacher_ids=ids, teacher_log_probs=log_probs.astype(np.float32))
    return b


WORDS = "the of and river house garden window number quiet blue seven market bridge winter".split()


def document_of_length(d2l, tokens: int) -> str:
    """Random words whose templated token count is exactly ``tokens``."""
    rng = np.random.default_rng(0)
    words = list(rng.choice(WORDS, tokens))
    while True:
        text = " ".join(words)
        count = d2l.document_chunks(text)[1]
        if count == tokens:
            return text
        words = words[: len(words) + tokens - count] if count > tokens else words + list(rng.choice(WORDS, tokens - count))


def train_step_case(case: str, precision: str = "float32", first_moment_dtype: str = "float32"):
    """``(base, hyper, trainer, base_params, batch)`` for a ``CONFIG:LOSS`` train-step case on the embedded
    SmolLM2 (batch 1, offline teacher targets as the reference trains), uncompiled."""
    from d2l_jax.train.config import TrainConfig
    from d2l_jax.train.step import Trainer

    config_name, loss = case.split(":")
    base = load_smollm2(precision)
    hyper, execution = hypernet_config(config_name, precision)
    hyper = hyper.replace(max_chunk_len=CONTEXT)
    train = TrainConfig(loss=loss, teacher="offline", batch_size=1, steps=1000, first_moment_dtype=first_moment_dtype)
    trainer = Trainer(hyper, base.config, train, execution=execution)
    base_params = trainer.put_base_params(base.params)
    batch = trainer.put_batch(train_step_batch(base.config.vocab_size, loss == "top_k_kl"))
    return base, hyper, trainer, base_params, batch
