"""The matrix products of SmolLM2-135M's forward pass, each timed alone in XLA (jitted) and in torch.

Why the forward and greedy decoding are no faster than transformers on this CPU, though the layer loop no
longer copies weights (docs/benchmarks.md): what is left of the model's time is mostly its matmuls, and this
measures how fast each backend multiplies those exact shapes. For ``--tokens`` rows (the 512-token forward;
1 for a decoding step) it lists every distinct product of one layer (q, k, v, o, gate, up, down, the
attention scores and the weighted values over 9 heads) and the lm head, times 30 of each with distinct
operands (XLA: one jitted program; torch: eager, as transformers runs), interleaved, median of ``--repeats``
after a warm-up, 2 threads each, and prints GFLOP/s and the ratio, then
a forward made only of these products (30 layers + the head): the ratio a perfect rest of the program
would leave. float32, the precision of issue 26's forward target (bfloat16 products are measured in place by
``forward.py --precision=bfloat16``). Nothing is asserted.

    python benchmarks/matmul_shapes.py [--tokens 512] [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import interleaved_medians  # noqa: E402

# SmolLM2-135M-Instruct: hidden 576, MLP 1536, 9 query heads and 3 key/value heads of 64, vocabulary 49152.
LAYERS, HIDDEN, MLP, HEADS, KV, HEAD_DIM, VOCAB = 30, 576, 1536, 9, 3, 64, 49152


def products(tokens: int) -> list[tuple[str, tuple[int, ...], tuple[int, ...], int]]:
    """``(name, lhs shape, rhs shape, times per forward)``; a leading axis is a batch of heads."""
    per_layer = [
        ("q / o projection", (tokens, HIDDEN), (HIDDEN, HIDDEN), 2),
        ("k / v projection", (tokens, HIDDEN), (HIDDEN, KV * HEAD_DIM), 2),
        ("gate / up projection", (tokens, HIDDEN), (HIDDEN, MLP), 2),
        ("down projection", (tokens, MLP), (MLP, HIDDEN), 1),
        ("attention scores", (HEADS, tokens, HEAD_DIM), (HEADS, HEAD_DIM, tokens), 1),
        ("attention values", (HEADS, tokens, tokens), (HEADS, tokens, HEAD_DIM), 1),
    ]
    return [(n, a, b, LAYERS * k) for n, a, b, k in per_layer] + [("lm head", (tokens, HIDDEN), (HIDDEN, VOCAB), 1)]


def flops(lhs: tuple[int, ...], rhs: tuple[int, ...]) -> float:
    return 2.0 * np.prod(lhs) * rhs[-1]


def jax_product(lhs, rhs):
    """One program of ``LAYERS`` such products with distinct operands, as the layers run them."""
    a = [jax.random.normal(jax.random.key(2 * i), lhs) for i in range(LAYERS)]
    b = [jax.random.normal(jax.random.key(2 * i + 1), rhs) for i in range(LAYERS)]
    products = jax.jit(lambda a, b: [x @ y for x, y in zip(a, b)])
    return lambda: jax.block_until_ready(products(a, b))


def torch_product(lhs, rhs):
    generator = torch.Generator().manual_seed(0)
    a = [torch.randn(lhs, generator=generator) for _ in range(LAYERS)]
    b = [torch.randn(rhs, generator=generator) for _ in range(LAYERS)]
    return lambda: [torch.matmul(x, y) for x, y in zip(a, b)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"SmolLM2-135M's matrix products at {args.tokens} tokens, float32, jax {jax.__version__}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")
    print("| product | lhs @ rhs | per forward | XLA GFLOP/s | torch GFLOP/s | torch / XLA time |")
    print("|---|---|---:|---:|---:|---:|")
    total = {"xla": 0.0, "torch": 0.0}
    for name, lhs, rhs, count in products(args.tokens):
        seconds = interleaved_medians(
            {"xla": jax_product(lhs, rhs), "torch": torch_product(lhs, rhs)}, args.repeats
        )
        rate = {side: LAYERS * flops(lhs, rhs) / s / 1e9 for side, s in seconds.items()}
        for side in total:
            total[side] += count / LAYERS * seconds[side]
        print(f"| {name} | {lhs} @ {rhs} | {count} | {rate['xla']:.0f} | {rate['torch']:.0f} | {seconds['torch'] / seconds['xla']:.2f}x |")
    print(f"\nA forward of these products alone: XLA {total['xla']:.3f} s, torch {total['torch']:.3f} s, "
          f"torch / XLA = {total['torch'] / total['xla']:.2f}x")


if __name__ == "__main__":
    main()
