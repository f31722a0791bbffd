"""NIAH sweep (and efficiency report) of a trained D2L against in-context learning and the base model.

    python -m launch.evaluate --config=experiments/niah_smollm2_eval.py --checkpoint=DIR --workdir=OUT \\
        [--config.sweep.samples_per_cell=1 ...]

Writes ``OUT/results.json`` (every record with its method, length, depth and seed) and the figures
(``niah_heatmap_<method>.png``, ``niah_accuracy_by_length.png``, ``efficiency_by_length.png``).
Rerunning the same command resumes: finished cells are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from d2l_jax.api import D2L
from d2l_jax.eval import plots, sweep
from d2l_jax.eval.results_store import RESULTS_FILE
from d2l_jax.models.base_model import BaseExecution
from d2l_jax.train.checkpoint import Checkpointer
from launch import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "evaluation config file (ml_collections)", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir (or its checkpoints/ folder)", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory for results.json and the figures", required=True)


def _latest_step(checkpoint: str, step: int | None) -> int | None:
    """The step ``D2L.load`` will restore (the latest when ``step`` is None), so results name it."""
    checkpoints = Checkpointer.of_run(checkpoint)
    try:
        return checkpoints.latest_step() if step is None else step
    finally:
        checkpoints.close()


def main(argv):
    del argv
    config = _CONFIG.value
    settings = sweep.SweepSettings.from_dict(config.sweep.to_dict())
    step = _latest_step(_CHECKPOINT.value, config.step)
    base_execution = BaseExecution(param_dtype=config.base_execution.param_dtype, dtype=config.base_execution.dtype or None)
    d2l = D2L.load(_CHECKPOINT.value, step=step, base_execution=base_execution)
    execution = d2l.execution.replace(**{k: v for k, v in config.execution.items() if v})
    hypernet = d2l.config if config.max_chunk_len is None else d2l.config.replace(max_chunk_len=config.max_chunk_len)
    d2l = D2L(d2l.base, hypernet, d2l.params, execution)
    identity = {
        "checkpoint": str(Path(_CHECKPOINT.value).resolve()),
        "step": step,
        "base_model": d2l.base.name,
        "max_chunk_len": d2l.config.max_chunk_len,
        "base_dtypes": {"params": base_execution.param_dtype, "matmuls": base_execution.compute_dtype},
        "hypernet_dtype": d2l.execution.dtype,
    }
    workdir = Path(_WORKDIR.value)
    records = sweep.run_sweep(d2l, settings, workdir, identity=identity)
    if config.efficiency and settings.efficiency_bins:
        records = sweep.run_efficiency(
            d2l, settings, workdir, identity=identity, repeats=config.efficiency_repeats, program_memory=config.program_memory
        )
    window = d2l.base.config.max_position_embeddings
    paths = plots.write_plots(records, workdir, window=window, title=f"D2L on {d2l.base.name}")
    summary = {}
    for r in records:
        if r["kind"] == "niah" and r["accuracy"] is not None:
            total = summary.setdefault(r["method"], {}).setdefault(r["hi"], [0, 0])
            total[0] += r["correct"]
            total[1] += r["n"]
    print(json.dumps({m: {str(n): c / t for n, (c, t) in sorted(by.items())} for m, by in summary.items()}, indent=2))
    print("\n".join(str(p) for p in [workdir / RESULTS_FILE, *paths]))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    run(main)
