"""Forward-pass and decoding speed of SmolLM2-135M in JAX against the machine's matmul ceiling and PyTorch.

Measures, in one run (every timing is the median of ``--repeats`` runs after one warm-up call):

  1. The matmul ceiling: achieved GFLOP/s of a jitted fp32 ``[n, n] @ [n, n]`` in JAX (and, for
     context, the same matmul in torch).
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

import d2l_jax
from d2l_jax.models import generate as gen
from d2l_jax.models.base_model import EMBEDDED_MODELS, _logits
from d2l_jax.models.decoder import Decoder
from d2l_jax.models.families import DecoderConfig

MODEL = "smollm2-135m-instruct"
TORCH_THREADS = 2
FIRST_ORDINARY_ID = 100  # SmolLM2's special tokens have the lowest ids; random ids start above them
TARGET = "Target: JAX >= 1.2x PyTorch forward speed and >= 50% of the matmul ceiling."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512, help="forward batch / prompt length")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median reported)")
    parser.add_argument("--new_tokens", type=int, default=64, help="greedy tokens to decode")
    parser.add_argument("--matmul_size", type=int, default=4096, help="n of the n x n @ n x n ceiling matmul")
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


def xla_forward_flops(model, ids: np.ndarray) -> float | None:
    """FLOPs XLA's cost analysis counts for the compiled full-logits forward (None if unavailable)."""
    tokens = jnp.asarray(ids)
    mask = jnp.ones_like(tokens)
    compiled = _logits.lower(model.config, model.params, tokens, mask, None).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


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
    from transformers import AutoModelForCausalLM

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


def main() -> None:
    args = parse_args()
    torch.set_num_threads(TORCH_THREADS)
    n, t, new, reps = args.matmul_size, args.tokens, args.new_tokens, args.repeats

    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
    log(f"matmul ceiling ({n}x{n} @ {n}x{n} fp32)")
    matmul_flops = 2.0 * n**3
    jax_matmul = matmul_flops / jax_matmul_seconds(n, reps) / 1e9
    torch_matmul = matmul_flops / torch_matmul_seconds(n, reps) / 1e9

    log("loading JAX model")
    model = d2l_jax.load_base_model(MODEL)
    config = model.config
    ids = random_token_ids(config, t, args.seed)
    flops = forward_flops(config, t)
    body_flops = flops - 2.0 * t * config.vocab_size * config.hidden_size

    log(f"JAX forward ({t} tokens)")
    jax_fwd = jax_forward_seconds(model, ids, reps)
    jax_body = jax_body_seconds(model, ids, reps)
    xla_flops = xla_forward_flops(model, ids)

    log(f"JAX greedy generation ({t}-token prompt, {new} new tokens, and 1 for the prefill)")
    jax_gen = jax_generate_seconds(model, ids, new, reps)
    jax_prefill = jax_generate_seconds(model, ids, 1, reps)

    log("loading torch model")
    torch_model = load_torch_model()
    log(f"torch forward ({t} tokens)")
    torch_fwd = torch_forward_seconds(torch_model, ids, reps)
    torch_body = torch_body_seconds(torch_model, ids, reps)
    log(f"torch greedy generation ({new} new tokens, and 1 for the prefill)")
    torch_gen = torch_generate_seconds(torch_model, ids, new, reps)
    torch_prefill = torch_generate_seconds(torch_model, ids, 1, reps)

    gflops = lambda f, s: f"{f / s / 1e9:.1f}"
    rows = [
        (f"JAX matmul {n}^3 fp32 GFLOP/s (ceiling)", f"{jax_matmul:.1f}"),
        (f"torch matmul {n}^3 fp32 GFLOP/s", f"{torch_matmul:.1f}"),
        ("forward analytic GFLOP (full logits)", f"{flops / 1e9:.2f}"),
        ("forward XLA cost_analysis GFLOP", "n/a" if xla_flops is None else f"{xla_flops / 1e9:.2f}"),
        ("JAX forward s", f"{jax_fwd:.3f}"),
        ("JAX forward tokens/s", f"{t / jax_fwd:.0f}"),
        ("JAX forward GFLOP/s", gflops(flops, jax_fwd)),
        ("JAX forward % of matmul ceiling", f"{100 * flops / jax_fwd / 1e9 / jax_matmul:.0f}%"),
        ("JAX forward without lm head s", f"{jax_body:.3f}"),
        ("JAX forward without lm head GFLOP/s", gflops(body_flops, jax_body)),
        ("torch forward s", f"{torch_fwd:.3f}"),
        ("torch forward tokens/s", f"{t / torch_fwd:.0f}"),
        ("torch forward GFLOP/s", gflops(flops, torch_fwd)),
        ("torch forward without lm head s", f"{torch_body:.3f}"),
        ("JAX/torch forward speed ratio", f"{torch_fwd / jax_fwd:.2f}x"),
        ("JAX/torch forward speed ratio without lm head", f"{torch_body / jax_body:.2f}x"),
        (f"JAX generate {new} tokens s (incl. prefill)", f"{jax_gen:.3f}"),
        ("JAX generate tokens/s (incl. prefill)", f"{new / jax_gen:.1f}"),
        ("JAX decode tokens/s (prefill subtracted)", f"{decode_rate(jax_gen, jax_prefill, new):.1f}"),
        (f"torch generate {new} tokens s (incl. prefill)", f"{torch_gen:.3f}"),
        ("torch generate tokens/s (incl. prefill)", f"{new / torch_gen:.1f}"),
        ("torch decode tokens/s (prefill subtracted)", f"{decode_rate(torch_gen, torch_prefill, new):.1f}"),
        ("JAX/torch generate speed ratio", f"{torch_gen / jax_gen:.2f}x"),
    ]
    import transformers

    header = [
        f"SmolLM2-135M-Instruct fp32, batch 1, {t} tokens, median of {reps} after warm-up; "
        f"{os.cpu_count()} CPUs, torch threads {TORCH_THREADS}",
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, transformers {transformers.__version__}",
    ]
    print_table(rows, header)


if __name__ == "__main__":
    main()
