"""Where the time goes: XLA's CPU time by kind of operation for one workload, from a profiler trace.

    python benchmarks/op_profile.py --workload=train_step [--case=niah:ce] [--precision=bfloat16]
    python benchmarks/op_profile.py --workload=forward|generate [--tokens=512 --new_tokens=64] [--precision=...]
    python benchmarks/op_profile.py --workload=internalize [--case=niah:128] [--precision=...]

The workload runs twice to compile and warm up, then ``--calls`` times under ``jax.profiler.trace``; every
operation XLA ran on its worker threads is summed by kind (the HLO name without its number, e.g.
``ynn_fusion`` = matmuls, ``dynamic-slice_bitcast_fusion`` = a layer's weights copied out of the stacked
array inside a loop) and reported in milliseconds of thread time per call (two threads on a 2-core machine:
the wall time is at most about half the sum) with its share. Nothing is asserted.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import PRECISIONS, document_of_length, hypernet_config, load_smollm2, train_step_case  # noqa: E402

_WORKLOAD = flags.DEFINE_enum("workload", "train_step", ["train_step", "forward", "generate", "internalize"], "What to profile.")
_CASE = flags.DEFINE_string("case", None, "train_step: CONFIG:LOSS (default niah:ce); internalize: CONFIG:TOKENS (default niah:128).")
_PRECISION = flags.DEFINE_enum("precision", "float32", PRECISIONS, "Base model and hypernetwork matmuls (see common.load_smollm2).")
_TOKENS = flags.DEFINE_integer("tokens", 512, "forward / generate: prompt tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "generate: greedy tokens.")
_CALLS = flags.DEFINE_integer("calls", 2, "Traced calls (figures are per call).")
_TOP = flags.DEFINE_integer("top", 15, "Kinds of operation listed.")


def workload(name: str, case: str | None, precision: str):
    """A zero-argument function that runs the workload once and waits for it."""
    import jax

    if name == "train_step":
        _, _, trainer, base_params, data = train_step_case(case or "niah:ce", precision)
        trainer.compile(trainer.abstract_state(), base_params, data)
        state = [trainer.init_state()]

        def step():
            state[0], metrics = trainer.step(state[0], base_params, data)
            jax.block_until_ready(metrics)

        return step
    if name == "internalize":
        import d2l_jax
        config_name, tokens = (case or "niah:128").split(":")
        hyper, execution = hypernet_config(config_name, precision)
        d2l = d2l_jax.D2L.create(load_smollm2(precision), hyper, execution=execution)
        document = document_of_length(d2l, int(tokens))
        return lambda: jax.block_until_ready(d2l.internalize(document).lora)
    from forward import jax_forward, jax_generate, random_token_ids

    model = load_smollm2(precision)
    ids = random_token_ids(model.config, _TOKENS.value, 0)
    return jax_forward(model, ids) if name == "forward" else jax_generate(model, ids, _NEW_TOKENS.value)


def thread_time_by_kind(trace_dir: str) -> collections.Counter:
    """Microseconds of XLA worker-thread time by kind of operation, summed over a perfetto trace."""
    (path,) = glob.glob(f"{trace_dir}/plugins/profile/*/perfetto_trace.json.gz")
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    kinds: collections.Counter = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or "XLAEigen" not in threads.get((e["pid"], e["tid"]), "") or "::" in name:
            continue  # only operations on XLA's worker threads, not the executor's own spans
        kinds[re.sub(r"^end: |[._]\d+$", "", name)] += e["dur"]
    return kinds


def main(argv):
    del argv
    import jax

    run = workload(_WORKLOAD.value, _CASE.value, _PRECISION.value)
    run(), run()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(_CALLS.value):
                run()
        wall = (time.perf_counter() - start) / _CALLS.value
        kinds = thread_time_by_kind(trace_dir)
    total = sum(kinds.values())
    calls = _CALLS.value
    print(f"{_WORKLOAD.value} {_CASE.value or ''} {_PRECISION.value}: {wall:.3f} s per call traced (tracing adds to it), "
          f"{total / calls / 1e3:.0f} ms of XLA thread time per call on {jax.device_count()} device(s), {len(kinds)} kinds")
    print("| kind of operation | ms per call | share |")
    print("|---|---:|---:|")
    for kind, micros in kinds.most_common(_TOP.value):
        print(f"| {kind} | {micros / calls / 1e3:.1f} | {100 * micros / total:.1f}% |")
    rest = total - sum(m for _, m in kinds.most_common(_TOP.value))
    print(f"| (the rest) | {rest / calls / 1e3:.1f} | {100 * rest / total:.1f}% |")
    share = lambda pattern: 100 * sum(m for k, m in kinds.items() if re.match(pattern, k)) / total
    print(f"matmuls (ynn_fusion, dot, dot_general): {share(r'(ynn_fusion|dot|dot_general)$'):.0f}%; "
          f"copies (slices of stacked layers' weights, loop carries: dynamic-slice / slice / copy fusions): "
          f"{share(r'(wrapped_)?(dynamic-slice|slice|copy)(_bitcast_fusion)?$'):.0f}%; "
          f"conversions (convert fusions: float32 to bfloat16, and bfloat16 weight slices): {share(r'(wrapped_)?convert'):.0f}%")
    print(f"(numpy {np.__version__}, jax {jax.__version__})")


if __name__ == "__main__":
    app.run(main)
