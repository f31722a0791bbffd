"""Forward-pass and decoding speed of SmolLM2-135M in JAX against the machine's matmul ceiling and PyTorch.

Measures, in one run (every timing is the median of ``--repeats`` runs after one warm-up call):

  1. The matmul ceiling: achieved GFLOP/s of a jitted fp32 ``[n, n] @ [n, n]`` in JAX (and, for
     context, the same matmul in torch); at least 10 timed runs, as it is short.
  2. The JAX forward of SmolLM2-135M-Instruct (``d2l_jax.load_base_model``) on one row of ``--tokens``
     random token ids with full logits ``[1, T, V]``: seconds, tokens/s, GFLOP/s from an analytic FLOP
     count, and the share of the matmul ceiling. Also timed without the lm head (logits at the last position only).
  3. The same forward in transformers + torch (2 threads, fp32 weights dequantized from the same GGUF
     file, same token ids), and the JAX/torch speed ratio.
  4. Greedy decoding of ``--new_tokens`` tokens after a prompt of ``--tokens`` random ids, in JAX
     (``generate_tokens``, no stop token can occur) and torch (``generate`` with ``min_new_tokens``):
     end-to-end tokens/s, and the per-token decode rate with the prefill (a 1-token generation)
     subtracted.

Run with::

    python benchmarks/forward.py [--tokens 512] [--repeats 3] [--new_tokens 64]

The figures depend on the machine; nothing here asserts on them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

import d2l_jax
from d2l_jax.models import generate as gen
from d2l_jax.models.base_model import EMBEDDED_MODELS, _logits
from d2l_jax.models.decoder import Decoder
from d2l_jax.models.families import DecoderConfig

MODEL = "smollm2-135m-instruct"
MATMUL_MIN_REPEATS = 10  # the ceiling matmul is short (~0.1 s), so it gets at least this many runs
TORCH_THREADS = 2
FIRST_ORDINARY_ID = 100  # SmolLM2's special tokens have the lowest ids; random ids start above them
TARGET = "Target: JAX >= 1.2x PyTorch forward speed and >= 50% of the matmul ceiling."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512, help="forward batch / prompt length")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median reported)")
    parser.add_argument("--new_tokens", type=int, default=64, help="greedy tokens to decode")
    parser.add_argument("--matmul_size", type=int, default=2048, help="n of the n x n @ n x n ceiling matmul")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one untimed warm-up call.

    ``fn`` must block until its work is done (``jax.block_until_ready`` for JAX results).
    """
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_flops(config: DecoderConfig, tokens: int) -> float:
    """Analytic FLOPs of one forward over ``tokens`` tokens (batch 1) with full logits.

    2 FLOPs per multiply-add: every projection (q, k, v, o, gate, up, down) in every layer plus the lm
    head, and attention scores (QK^T) and values (PV) at 2 * T * T * heads * head_dim each per layer.
    The attention term is the full T x T square, not halved for causality: that is what a dense masked
    implementation (ours and torch's eager/SDPA path) actually computes. Norms, RoPE, softmax and SiLU
    are left out (a few percent).
    """
    per_layer = sum(d_in * d_out for d_in, d_out in config.projection_shapes().values())
    weights = per_layer * config.num_layers + config.vocab_size * config.hidden_size
    attention = 4 * config.num_layers * tokens * tokens * config.num_heads * config.head_dim
    return 2.0 * tokens * weights + attention


def random_token_ids(config: DecoderConfig, tokens: int, seed: int) -> np.ndarray:
    """``[1, tokens]`` int32 ids drawn from the ordinary (non-special) vocabulary."""
    return np.random.default_rng(seed).integers(FIRST_ORDINARY_ID, config.vocab_size, (1, tokens), dtype=np.int32)


def jax_matmul_seconds(n: int, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return median_seconds(lambda: jax.block_until_ready(matmul(a, b)), repeats)


def torch_matmul_seconds(n: int, repeats: int) -> float:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator)
    b = torch.randn(n, n, generator=generator)
    return median_seconds(lambda: torch.matmul(a, b), repeats)


def jax_forward_seconds(model, ids: np.ndarray, repeats: int) -> float:
    """Full-logits forward through the library's jitted ``_logits``."""
    tokens = jnp.asarray(ids)
    mask = jnp.ones_like(tokens)
    return median_seconds(lambda: jax.block_until_ready(_logits(model.config, model.params, tokens, mask, None)), repeats)


def jax_body_seconds(model, ids: np.ndarray, repeats: int) -> float:
    """Forward with logits at the last position only: the lm head drops out (57 MFLOP for one token)."""
    tokens = jnp.asarray(ids)
    positions = jnp.arange(tokens.shape[1])[None]
    mask = jnp.ones_like(tokens)
    last = jnp.full((1, 1), tokens.shape[1] - 1)

    @jax.jit
    def body(params):
        return Decoder(model.config).apply({"params": params}, tokens, positions, mask, logit_positions=last).logits

    return median_seconds(lambda: jax.block_until_ready(body(model.params)), repeats)


def jax_generate_seconds(model, ids: np.ndarray, new_tokens: int, repeats: int) -> float:
    """Greedy generation of exactly ``new_tokens`` tokens (the stop id -5 never occurs)."""
    tokens = jnp.asarray(ids)
    mask = jnp.ones_like(tokens)
    buffer = gen.bucket_length(new_tokens)

    def run():
        out = gen.generate_tokens(
            model.config,
            model.params,
            tokens,
            mask,
            None,
            jax.random.key(0),
            np.array([-5], np.int32),
            np.float32(0.0),
            np.float32(1.0),
            np.int32(new_tokens),
            buffer=buffer,
        )
        out = np.asarray(out)
        produced = int((out[0] != gen.NO_TOKEN).sum())
        if produced != new_tokens:
            raise RuntimeError(f"expected {new_tokens} generated tokens, got {produced}")
        return out

    return median_seconds(run, repeats)


def load_torch_model():
    transformers.utils.logging.disable_progress_bar()
    entry = EMBEDDED_MODELS[MODEL]
    directory = importlib.util.find_spec(entry.package).submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=entry.filename, dtype=torch.float32)
    return model.eval()


def torch_forward_seconds(model, ids: np.ndarray, repeats: int) -> float:
    tokens = torch.from_numpy(ids.astype(np.int64))

    def run():
        with torch.no_grad():
            return model(input_ids=tokens).logits

    return median_seconds(run, repeats)


def torch_body_seconds(model, ids: np.ndarray, repeats: int) -> float:
    """Forward with logits at the last position only (``logits_to_keep=1``), as in ``jax_body_seconds``."""
    tokens = torch.from_numpy(ids.astype(np.int64))

    def run():
        with torch.no_grad():
            return model(input_ids=tokens, logits_to_keep=1).logits

    return median_seconds(run, repeats)


def torch_generate_seconds(model, ids: np.ndarray, new_tokens: int, repeats: int) -> float:
    tokens = torch.from_numpy(ids.astype(np.int64))
    mask = torch.ones_like(tokens)

    def run():
        with torch.no_grad():
            out = model.generate(
                input_ids=tokens,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=model.config.eos_token_id,
            )
        produced = out.shape[1] - tokens.shape[1]
        if produced != new_tokens:
            raise RuntimeError(f"expected {new_tokens} generated tokens, got {produced}")
        return out

    return median_seconds(run, repeats)


def decode_rate(total_seconds: float, prefill_seconds: float, new_tokens: int) -> float:
    """Tokens/s of the decode loop alone: the tokens after the first over the time after the prefill."""
    if new_tokens < 2 or total_seconds <= prefill_seconds:
        return float("nan")
    return (new_tokens - 1) / (total_seconds - prefill_seconds)


def print_table(rows: list[tuple[str, str]], header: list[str]) -> None:
    for line in header:
        print(line)
    print()
    width = max(len(name) for name, _ in rows)
    print(f"| {'measure'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    print()
    print(TARGET)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def measure(args: argparse.Namespace) -> dict:
    """Runs every timing; returns the seconds (and GFLOP/s of the ceiling matmuls) by name."""
    n, t, new, reps = args.matmul_size, args.tokens, args.new_tokens, args.repeats
    r = {}
    log(f"matmul ceiling ({n}x{n} @ {n}x{n} fp32)")
    matmul_reps = max(reps, MATMUL_MIN_REPEATS)
    r["jax_matmul_gflops"] = 2.0 * n**3 / jax_matmul_seconds(n, matmul_reps) / 1e9
    r["torch_matmul_gflops"] = 2.0 * n**3 / torch_matmul_seconds(n, matmul_reps) / 1e9

    log("loading JAX model")
    model = d2l_jax.load_base_model(MODEL)
    ids = random_token_ids(model.config, t, args.seed)
    r["config"] = model.config
    log(f"JAX forward ({t} tokens)")
    r["jax_forward"] = jax_forward_seconds(model, ids, reps)
    r["jax_body"] = jax_body_seconds(model, ids, reps)
    log(f"JAX greedy generation ({t}-token prompt, {new} new tokens, and 1 for the prefill)")
    r["jax_generate"] = jax_generate_seconds(model, ids, new, reps)
    r["jax_prefill"] = jax_generate_seconds(model, ids, 1, reps)
    del model

    log("loading torch model")
    torch_model = load_torch_model()
    log(f"torch forward ({t} tokens)")
    r["torch_forward"] = torch_forward_seconds(torch_model, ids, reps)
    r["torch_body"] = torch_body_seconds(torch_model, ids, reps)
    log(f"torch greedy generation ({new} new tokens, and 1 for the prefill)")
    r["torch_generate"] = torch_generate_seconds(torch_model, ids, new, reps)
    r["torch_prefill"] = torch_generate_seconds(torch_model, ids, 1, reps)
    return r


def table_rows(r: dict, args: argparse.Namespace) -> list[tuple[str, str]]:
    """The measurements as (name, formatted value) rows, with the derived rates and ratios."""
    n, t, new = args.matmul_size, args.tokens, args.new_tokens
    config = r["config"]
    flops = forward_flops(config, t)
    body_flops = flops - 2.0 * t * config.vocab_size * config.hidden_size
    gflops = lambda f, seconds: f"{f / seconds / 1e9:.1f}"
    return [
        (f"JAX matmul {n}^3 fp32 GFLOP/s (ceiling)", f"{r['jax_matmul_gflops']:.1f}"),
        (f"torch matmul {n}^3 fp32 GFLOP/s", f"{r['torch_matmul_gflops']:.1f}"),
        ("forward analytic GFLOP (full logits)", f"{flops / 1e9:.2f}"),
        ("JAX forward s", f"{r['jax_forward']:.3f}"),
        ("JAX forward tokens/s", f"{t / r['jax_forward']:.0f}"),
        ("JAX forward GFLOP/s", gflops(flops, r["jax_forward"])),
        ("JAX forward % of matmul ceiling", f"{100 * flops / r['jax_forward'] / 1e9 / r['jax_matmul_gflops']:.0f}%"),
        ("JAX forward without lm head s", f"{r['jax_body']:.3f}"),
        ("JAX forward without lm head GFLOP/s", gflops(body_flops, r["jax_body"])),
        ("torch forward s", f"{r['torch_forward']:.3f}"),
        ("torch forward tokens/s", f"{t / r['torch_forward']:.0f}"),
        ("torch forward GFLOP/s", gflops(flops, r["torch_forward"])),
        ("torch forward without lm head s", f"{r['torch_body']:.3f}"),
        ("JAX/torch forward speed ratio", f"{r['torch_forward'] / r['jax_forward']:.2f}x"),
        ("JAX/torch forward speed ratio without lm head", f"{r['torch_body'] / r['jax_body']:.2f}x"),
        (f"JAX generate {new} tokens s (incl. prefill)", f"{r['jax_generate']:.3f}"),
        ("JAX generate tokens/s (incl. prefill)", f"{new / r['jax_generate']:.1f}"),
        ("JAX decode tokens/s (prefill subtracted)", f"{decode_rate(r['jax_generate'], r['jax_prefill'], new):.1f}"),
        (f"torch generate {new} tokens s (incl. prefill)", f"{r['torch_generate']:.3f}"),
        ("torch generate tokens/s (incl. prefill)", f"{new / r['torch_generate']:.1f}"),
        ("torch decode tokens/s (prefill subtracted)", f"{decode_rate(r['torch_generate'], r['torch_prefill'], new):.1f}"),
        ("JAX/torch generate speed ratio", f"{r['torch_generate'] / r['jax_generate']:.2f}x"),
    ]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(TORCH_THREADS)
    load_before = os.getloadavg()[0]
    results = measure(args)
    header = [
        f"SmolLM2-135M-Instruct fp32, batch 1, {args.tokens} tokens, median of {args.repeats} after warm-up; "
        f"{os.cpu_count()} CPUs, torch threads {TORCH_THREADS}",
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, transformers {transformers.__version__}",
        f"1-minute load average before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f} "
        "(other processes on the machine skew every figure)",
    ]
    print_table(table_rows(results, args), header)


if __name__ == "__main__":
    main()
