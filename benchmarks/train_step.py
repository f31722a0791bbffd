"""One meta-training step on the embedded SmolLM2: 256 context tokens + 64 student tokens, batch 1 (fp32 by default).

The cases the authors' PyTorch code is measured on (`versus_reference.py` runs both): the main configuration
with the top-16 KL loss (offline teacher targets in the batch, as the reference trains) and with CE,
and the NIAH configuration with CE. Each case runs in its own process so its peak memory is its own;
step time is the median of ``--repeats`` steps after the compiling first step.

    python benchmarks/train_step.py [--cases=main:top_k_kl,main:ce,niah:ce] [--repeats=5] [--precision=bfloat16]

``--precision=bfloat16`` runs the base model and the hypernetwork's matmuls in bfloat16 (parameters and
optimizer state of the hypernetwork stay float32), as ``experiments/niah_smollm2.py`` trains.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import PRECISIONS, matmul_gflops, peak_rss_gb, train_step_case  # noqa: E402

_CASES = flags.DEFINE_list("cases", ["main:top_k_kl", "main:ce", "niah:ce"], "CONFIG:LOSS cases.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per case.")
_PRECISION = flags.DEFINE_enum("precision", "float32", PRECISIONS, "Base model and hypernetwork matmuls (see common.load_smollm2).")
_FIRST_MOMENT = flags.DEFINE_enum("first_moment_dtype", "float32", ["float32", "bfloat16"], "AdamW's first moment (train.first_moment_dtype).")
_CASE = flags.DEFINE_string("case", None, "Internal: run one case and print JSON.")


def run_case(case: str, repeats: int, precision: str, first_moment_dtype: str) -> dict:
    import jax

    import d2l_jax

    base, hyper, trainer, base_params, data = train_step_case(case, precision, first_moment_dtype)
    start = time.perf_counter()
    trainer.compile(trainer.abstract_state(), base_params, data)  # before the state, as training does
    compile_s = time.perf_counter() - start
    state = trainer.init_state()
    rss_before = peak_rss_gb()
    state, metrics = trainer.step(state, base_params, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = trainer.step(state, base_params, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {
        "case": case,
        "hypernet_params": d2l_jax.D2L(base, hyper, state.params).param_count(),
        "step_s": float(np.median(times)),
        "compile_s": compile_s,
        "rss_before_gb": rss_before,
        "peak_rss_gb": peak_rss_gb(),
        "loss": float(metrics["loss"]),
        "matmul_gflops": matmul_gflops(),
    }


def main(argv):
    del argv
    if _CASE.value:
        print(json.dumps(run_case(_CASE.value, _REPEATS.value, _PRECISION.value, _FIRST_MOMENT.value)))
        return
    rows = []
    for case in _CASES.value:
        command = [sys.executable, __file__, f"--case={case}", f"--repeats={_REPEATS.value}", f"--precision={_PRECISION.value}", f"--first_moment_dtype={_FIRST_MOMENT.value}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            print(f"{case} failed:\n{result.stderr[-2000:]}", flush=True)
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nSmolLM2-135M-Instruct, {_PRECISION.value}, CPU")
    print("| case | step (s) | peak RSS (GB) | compile (s) | matmul GFLOP/s then |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['step_s']:.2f} | {r['peak_rss_gb']:.2f} | {r['compile_s']:.0f} | {r['matmul_gflops']:.0f} |")
    print("(the reference's step on this machine, in the same run: benchmarks/versus_reference.py)")

if __name__ == "__main__":
    app.run(main)
