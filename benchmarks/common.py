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
