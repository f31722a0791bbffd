"""Forward-pass and decoding speed of SmolLM2-135M in JAX against the machine's matmul ceiling and PyTorch.

Measures, in one run:

  1. The matmul ceiling: achieved GFLOP/s of a jitted ``[n, n] @ [n, n]`` in JAX (and, for
     context, the same matmul in torch).
  2. The JAX forward of SmolLM2-135M-Instruct (``common.load_smollm2``) on one row of ``--tokens``
     random token ids with full logits ``[1, T, V]``: seconds, tokens/s, GFLOP/s from an analytic FLOP
     count (``forward_flops``), and the share of the matmul ceiling. Also timed without the lm head
     (logits at the last position only).
  3. The same forward in transformers + torch (2 threads, fp32 weights dequantized from the same GGUF
     file, same token ids), and the JAX/torch speed ratio.
  4. Greedy decoding of ``--new_tokens`` tokens after a prompt of ``--tokens`` random ids, in JAX
     (``generate_tokens``; no stop token can occur) and torch (``generate`` with ``min_new_tokens``):
     end-to-end tokens/s, and the decode-loop rate with the prefill (a 1-token generation) subtracted.

``--rows`` runs every forward and generation on that many rows of random ids at once (the batched decoding
of the evaluation harness and the teacher-answer generator); rates count the tokens of every row.

Every timing is the median of ``--repeats`` runs after one warm-up call (at least 10 runs for the
short ceiling matmul). The JAX and torch runs of each figure are interleaved, one of each per round,
so that load from other processes on a shared machine hits both sides alike; the header prints the
share of CPU time other processes took during the run, so that a skewed run can be recognised.
``--precision bfloat16`` runs JAX with bfloat16 weights and matmuls (float32 sums, the layer loop unrolled:
``common.load_smollm2``) and torch under ``torch.autocast("cpu", dtype=torch.bfloat16)``, and measures the
ceiling as a bfloat16 matmul on both sides.

Nothing here asserts on the figures.

Run with::

    python benchmarks/forward.py [--tokens 512] [--rows 1] [--repeats 3] [--new_tokens 64] [--precision bfloat16]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import resource
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

from d2l_jax.models import generate as gen
from d2l_jax.models.base_model import EMBEDDED_MODELS, _logits
from d2l_jax.models.decoder import Decoder
from d2l_jax.models.families import DecoderConfig
from d2l_jax.models.layout import stacked_layers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PRECISIONS, load_smollm2  # noqa: E402

MODEL = "smollm2-135m-instruct"
MATMUL_MIN_REPEATS = 10
TORCH_THREADS = 2
FIRST_ORDINARY_ID = 100  # SmolLM2's special tokens are ids 0-16; random ids start above them
NEVER_EMITTED = np.array([-5], np.int32)  # a stop id no sampled token can equal
TARGET = "Target: JAX >= 1.2x PyTorch forward speed and >= 50% of the matmul ceiling."

Benchmark = Callable[[], object]  # runs once and returns only when the work is done


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512, help="forward batch / prompt length")
    parser.add_argument("--rows", type=int, default=1, help="rows of random ids per forward and generation")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median reported)")
    parser.add_argument("--new_tokens", type=int, default=64, help="greedy tokens to decode")
    parser.add_argument("--matmul_size", type=int, default=2048, help="n of the n x n @ n x n ceiling matmul")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32", help="JAX weights and matmuls; torch autocast")
    return parser.parse_args()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy, own.ru_utime + own.ru_stime


def other_processes_share(start: tuple[float, float] | None, wall_seconds: float) -> str:
    """Share of the machine's CPU time that other processes used since ``start`` (from ``cpu_seconds``)."""
    end = cpu_seconds()
    if start is None or end is None:
        return "unknown"
    others = (end[0] - start[0]) - (end[1] - start[1])
    return f"{100 * max(others, 0.0) / (wall_seconds * os.cpu_count()):.0f}%"


def interleaved_medians(benchmarks: dict[str, Benchmark], repeats: int) -> dict[str, float]:
    """Median seconds of each benchmark: one warm-up call each, then ``repeats`` rounds of one call each."""
    for run in benchmarks.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in benchmarks}
    for _ in range(repeats):
        for name, run in benchmarks.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def forward_flops(config: DecoderConfig, tokens: int) -> float:
    """Analytic FLOPs of one forward over one row of ``tokens`` tokens with full logits.

    2 FLOPs per multiply-add over every projection (q, k, v, o, gate, up, down) of every layer and the
    lm head, plus attention scores (QK^T) and values (PV), 2 * T * T * heads * head_dim each per layer.
    The attention term counts the full T x T square, not the causal half: that is what our dense masked
    attention computes (torch's CPU flash-attention kernel skips fully masked blocks, so it does less
    than this). Norms, RoPE, softmax and SiLU are left out (well under 1% of the total).
    """
    per_layer = sum(d_in * d_out for d_in, d_out in config.projection_shapes().values())
    weights = per_layer * config.num_layers + config.vocab_size * config.hidden_size
    attention = 4 * config.num_layers * tokens * tokens * config.num_heads * config.head_dim
    return 2.0 * tokens * weights + attention


def lm_head_flops(config: DecoderConfig, tokens: int) -> float:
    return 2.0 * tokens * config.hidden_size * config.vocab_size


def random_token_ids(config: DecoderConfig, tokens: int, seed: int, rows: int = 1) -> np.ndarray:
    """``[rows, tokens]`` int32 ids drawn from the ordinary (non-special) vocabulary."""
    return np.random.default_rng(seed).integers(FIRST_ORDINARY_ID, config.vocab_size, (rows, tokens), dtype=np.int32)


def load_torch_model():
    """SmolLM2 in transformers, from the same GGUF file, dequantized to fp32."""
    entry = EMBEDDED_MODELS[MODEL]
    directory = importlib.util.find_spec(entry.package).submodule_search_locations[0]
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=entry.filename, dtype=torch.float32).eval()


def torch_precision(precision: str):
    """The context torch runs in: bfloat16 autocast, or nothing for float32."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bfloat16" else contextlib.nullcontext()


def jax_matmul(n: int, precision: str) -> Benchmark:
    a = jax.random.normal(jax.random.key(0), (n, n), precision)
    b = jax.random.normal(jax.random.key(1), (n, n), precision)
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    return lambda: jax.block_until_ready(matmul(a, b))


def torch_matmul(n: int, precision: str) -> Benchmark:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator)
    b = torch.randn(n, n, generator=generator)

    def run():
        with torch_precision(precision):
            return torch.matmul(a, b)

    return run


def jax_forward(model, ids: np.ndarray) -> Benchmark:
    """Full-logits forward through the library's jitted ``_logits``."""
    tokens = jnp.asarray(ids)
    mask = jnp.ones_like(tokens)
    return lambda: jax.block_until_ready(_logits(model.config, model.params, tokens, mask, None))


def jax_forward_without_head(model, ids: np.ndarray) -> Benchmark:
    """Forward with logits at the last position only, so the lm head costs one token's worth."""
    tokens = jnp.asarray(ids)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    mask = jnp.ones_like(tokens)
    last = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1)

    @jax.jit
    def forward(params):
        return Decoder(model.config).apply({"params": stacked_layers(params)}, tokens, positions, mask, logit_positions=last).logits

    return lambda: jax.block_until_ready(forward(model.params))


def jax_generate(model, ids: np.ndarray, new_tokens: int) -> Benchmark:
    """Greedy generation of exactly ``new_tokens`` tokens with ``generate_tokens``."""
    tokens = jnp.asarray(ids)
    mask = jnp.ones_like(tokens)
    buffer = gen.bucket_length(new_tokens)

    def run():
        out = gen.generate_tokens(
            model.config, model.params, tokens, mask, None, jax.random.key(0), NEVER_EMITTED,
            np.float32(0.0), np.float32(1.0), np.int32(new_tokens), buffer=buffer,
        )  # fmt: skip
        produced = (np.asarray(out) != gen.NO_TOKEN).sum(axis=1)
        if (produced != new_tokens).any():
            raise RuntimeError(f"expected {new_tokens} generated tokens, got {produced}")

    return run


def torch_forward(model, ids: np.ndarray, precision: str, logits_to_keep: int = 0) -> Benchmark:
    """Forward under ``no_grad``; ``logits_to_keep=1`` computes logits at the last position only."""
    tokens = torch.from_numpy(ids.astype(np.int64))

    def run():
        with torch.no_grad(), torch_precision(precision):
            return model(input_ids=tokens, logits_to_keep=logits_to_keep).logits

    return run


def torch_generate(model, ids: np.ndarray, new_tokens: int, precision: str) -> Benchmark:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (``min_new_tokens`` masks end of sequence)."""
    tokens = torch.from_numpy(ids.astype(np.int64))
    mask = torch.ones_like(tokens)

    def run():
        with torch.no_grad(), torch_precision(precision):
            out = model.generate(
                input_ids=tokens, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=model.config.eos_token_id,
            )  # fmt: skip
        produced = out.shape[1] - tokens.shape[1]
        if produced != new_tokens:
            raise RuntimeError(f"expected {new_tokens} generated tokens, got {produced}")

    return run


def decode_rate(total_seconds: float, prefill_seconds: float, new_tokens: int) -> float:
    """Tokens/s of the decode loop alone: the tokens after the first over the time after the prefill."""
    if new_tokens < 2 or total_seconds <= prefill_seconds:
        return float("nan")
    return (new_tokens - 1) / (total_seconds - prefill_seconds)


def measure(args: argparse.Namespace) -> tuple[DecoderConfig, dict[str, float]]:
    """Runs every benchmark; returns the model config and the median seconds by name."""
    n, t, new, reps, precision = args.matmul_size, args.tokens, args.new_tokens, args.repeats, args.precision
    seconds: dict[str, float] = {}
    log(f"matmul ceiling ({n}x{n} @ {n}x{n} {precision})")
    matmuls = {"jax_matmul": jax_matmul(n, precision), "torch_matmul": torch_matmul(n, precision)}
    seconds.update(interleaved_medians(matmuls, max(reps, MATMUL_MIN_REPEATS)))

    log("loading the JAX and torch models")
    model = load_smollm2(precision)
    torch_model = load_torch_model()
    ids = random_token_ids(model.config, t, args.seed, args.rows)

    log(f"forward, {t} tokens")
    forwards = {
        "jax_forward": jax_forward(model, ids),
        "torch_forward": torch_forward(torch_model, ids, precision),
        "jax_body": jax_forward_without_head(model, ids),
        "torch_body": torch_forward(torch_model, ids, precision, logits_to_keep=1),
    }
    seconds.update(interleaved_medians(forwards, reps))

    log(f"greedy generation after a {t}-token prompt: {new} new tokens, and 1 for the prefill")
    generations = {
        "jax_generate": jax_generate(model, ids, new),
        "torch_generate": torch_generate(torch_model, ids, new, precision),
        "jax_prefill": jax_generate(model, ids, 1),
        "torch_prefill": torch_generate(torch_model, ids, 1, precision),
    }
    seconds.update(interleaved_medians(generations, reps))
    return model.config, seconds


def table_rows(config: DecoderConfig, s: dict[str, float], args: argparse.Namespace) -> list[tuple[str, str]]:
    """The measurements as (name, formatted value) rows, with the derived rates and ratios."""
    n, new, rows = args.matmul_size, args.new_tokens, args.rows
    t = args.tokens * rows  # tokens of all rows
    flops = forward_flops(config, args.tokens) * rows
    body_flops = flops - (lm_head_flops(config, args.tokens) - lm_head_flops(config, 1)) * rows
    ceiling = 2.0 * n**3 / s["jax_matmul"] / 1e9
    gflops = lambda f, seconds: f / seconds / 1e9
    return [
        (f"JAX matmul {n}^3 {args.precision} GFLOP/s (ceiling)", f"{ceiling:.1f}"),
        (f"torch matmul {n}^3 {args.precision} GFLOP/s", f"{gflops(2.0 * n**3, s['torch_matmul']):.1f}"),
        ("forward GFLOP, analytic (full logits)", f"{flops / 1e9:.2f}"),
        ("JAX forward s", f"{s['jax_forward']:.3f}"),
        ("JAX forward tokens/s", f"{t / s['jax_forward']:.0f}"),
        ("JAX forward GFLOP/s", f"{gflops(flops, s['jax_forward']):.1f}"),
        ("JAX forward % of matmul ceiling", f"{100 * gflops(flops, s['jax_forward']) / ceiling:.0f}%"),
        ("JAX forward without lm head s", f"{s['jax_body']:.3f}"),
        ("JAX forward without lm head GFLOP/s", f"{gflops(body_flops, s['jax_body']):.1f}"),
        ("torch forward s", f"{s['torch_forward']:.3f}"),
        ("torch forward tokens/s", f"{t / s['torch_forward']:.0f}"),
        ("torch forward GFLOP/s (same analytic count)", f"{gflops(flops, s['torch_forward']):.1f}"),
        ("torch forward without lm head s", f"{s['torch_body']:.3f}"),
        ("JAX/torch forward speed ratio", f"{s['torch_forward'] / s['jax_forward']:.2f}x"),
        ("JAX/torch forward speed ratio without lm head", f"{s['torch_body'] / s['jax_body']:.2f}x"),
        (f"JAX generate {new} tokens s (incl. prefill)", f"{s['jax_generate']:.3f}"),
        ("JAX generate tokens/s (incl. prefill)", f"{new * rows / s['jax_generate']:.1f}"),
        ("JAX decode tokens/s (prefill subtracted)", f"{rows * decode_rate(s['jax_generate'], s['jax_prefill'], new):.1f}"),
        (f"torch generate {new} tokens s (incl. prefill)", f"{s['torch_generate']:.3f}"),
        ("torch generate tokens/s (incl. prefill)", f"{new * rows / s['torch_generate']:.1f}"),
        ("torch decode tokens/s (prefill subtracted)",
         f"{rows * decode_rate(s['torch_generate'], s['torch_prefill'], new):.1f}"),
        ("JAX/torch generate speed ratio", f"{s['torch_generate'] / s['jax_generate']:.2f}x"),
    ]


def print_table(header: list[str], rows: list[tuple[str, str]]) -> None:
    print()
    print("\n".join(header))
    print()
    width = max(len(name) for name, _ in rows)
    print(f"| {'measure'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|------:|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    print()
    print(TARGET)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(TORCH_THREADS)
    cpu_at_start, wall_at_start = cpu_seconds(), time.perf_counter()
    config, seconds = measure(args)
    others = other_processes_share(cpu_at_start, time.perf_counter() - wall_at_start)
    header = [
        f"SmolLM2-135M-Instruct {args.precision}, batch {args.rows}, {args.tokens} tokens, median of {args.repeats} after a warm-up, "
        f"JAX and torch interleaved; {os.cpu_count()} CPUs, torch threads {TORCH_THREADS}",
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"CPU time taken by other processes during the run: {others} of the machine "
        "(near 0% on an idle machine; anything more skews every figure, torch's most)",
    ]
    print_table(header, table_rows(config, seconds, args))


if __name__ == "__main__":
    main()
