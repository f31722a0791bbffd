"""Examples per second of an experiment's training step, on its own batches (real records, its shapes).

    python benchmarks/train_recipe.py --config=experiments/qa_smollm2.py [--repeats=8] [--config.train.loss=ce]

Prints the median step time after the compiling first step, examples (query rows) per second, and the share
of the step the online teacher's forward takes (timed alone on the same batches), with the fp32 matmul
ceiling of the moment beside them.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import matmul_gflops, peak_rss_gb  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
_REPEATS = flags.DEFINE_integer("repeats", 8, "timed steps after the compiling one")


def _median_seconds(fn, repeats: int) -> float:
    import jax

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv):
    del argv
    import jax

    from d2l_jax.train.config import parse_experiment
    from d2l_jax.train.distillation import teacher_targets
    from d2l_jax.train.loop import training_batch_stream
    from d2l_jax.train.step import Trainer

    run = parse_experiment(json.loads(_CONFIG.value.to_json()))
    base = run.base_execution.load(run.model)
    trainer = Trainer(run.hypernet, base.config, run.train, execution=run.execution)
    base_params = trainer.put_base_params(base.params)
    stream = iter(training_batch_stream(run, base))
    batches = [trainer.put_batch(next(stream)) for _ in range(_REPEATS.value + 1)]
    state = trainer.init_state()
    start = time.perf_counter()
    state, _ = trainer.step(state, base_params, batches[0])
    jax.block_until_ready(state)
    compile_seconds = time.perf_counter() - start
    times = []
    for batch in batches[1:]:
        start = time.perf_counter()
        state, metrics = trainer.step(state, base_params, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step = float(np.median(times))
    rows = run.train.batch_size * run.train.grad_accum_steps
    result = {
        "config": _CONFIG.value.to_dict(),
        "device": str(jax.devices()[0].device_kind),
        "compile_and_first_step_s": round(compile_seconds, 1),
        "step_s": round(step, 3),
        "examples_per_s": round(rows / step, 2),
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }
    if run.train.uses_teacher and run.train.teacher == "online":
        teacher = jax.jit(teacher_targets, static_argnums=(0, 5))
        micro = jax.tree.map(lambda x: x[0], batches[1])
        args = (base.config, base_params, micro["teacher_tokens"], micro["teacher_mask"], micro["teacher_label_positions"], run.train.distillation)
        jax.block_until_ready(teacher(*args))
        seconds = _median_seconds(lambda: teacher(*args), _REPEATS.value) * run.train.grad_accum_steps
        result.update(teacher_forward_s=round(seconds, 3), teacher_share=round(seconds / step, 2))
    result["matmul_gflops_fp32"] = round(matmul_gflops(), 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
