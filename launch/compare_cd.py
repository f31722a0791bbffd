"""D2L against context distillation (CD) on the same NIAH documents: accuracy, update latency, memory.

    python -m launch.compare_cd --checkpoint=DIR --out=results/cd_vs_d2l.json \\
        [--documents=10 --cd_steps=10,30,100,300 --lo=32 --hi=256]

For each held-out document (test split, one length bin, depths spread evenly) D2L internalizes it once;
oracle CD trains a fresh rank-8 LoRA on the test question against the teacher with the document in its
prompt, once per step budget. Both then answer the question without the document. A warm-up document
compiles every program first, so latencies are steady-state. Writes one JSON file with every
per-document figure, beside it the plot of accuracy against update latency (``<out stem>_accuracy_vs_update_latency.png``),
and prints a summary table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from absl import flags

from d2l_jax.api import D2L
from d2l_jax.data.niah import cell_records
from d2l_jax.eval import plots
from d2l_jax.eval.cd_comparison import compare_with_cd
from launch import run

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir (or its checkpoints/ folder)", required=True)
_OUT = flags.DEFINE_string("out", None, "JSON file to write", required=True)
_DOCUMENTS = flags.DEFINE_integer("documents", 10, "held-out documents")
_CD_STEPS = flags.DEFINE_list("cd_steps", ["10", "30", "100", "300"], "CD step budgets (300 = the reference's)")
_LO = flags.DEFINE_integer("lo", 32, "shortest document, tokens")
_HI = flags.DEFINE_integer("hi", 256, "longest document, tokens (exclusive)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the documents")


def main(argv):
    del argv
    d2l = D2L.load(_CHECKPOINT.value)
    tokenizer = d2l.base.tokenizer
    depths = np.linspace(0, 9, _DOCUMENTS.value).round().astype(int)
    records = [cell_records(tokenizer, _LO.value, _HI.value, int(d), 1, _SEED.value + i)[0] for i, d in enumerate(depths)]
    warmup = cell_records(tokenizer, _LO.value, _HI.value, 0, 1, _SEED.value + 10_000)[0]
    comparison = compare_with_cd(d2l, records, [int(s) for s in _CD_STEPS.value], warmup=warmup)

    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = dict(checkpoint=str(Path(_CHECKPOINT.value).resolve()), documents=_DOCUMENTS.value, lo=_LO.value, hi=_HI.value, seed=_SEED.value)
    out.write_text(json.dumps(dict(settings=settings, **comparison), indent=2))
    figure = out.with_name(f"{out.stem}_accuracy_vs_update_latency.png")
    title = f"D2L vs oracle CD on {d2l.base.name}, {len(records)} NIAH documents of {_LO.value}-{_HI.value} tokens"
    plots.accuracy_vs_update_latency(comparison["summary"], figure, title=title)
    print(figure)
    print(f"{'method':<10} {'accuracy':>9} {'update s (median)':>18} {'peak GB':>8}")
    for method, s in comparison["summary"].items():
        print(f"{method:<10} {s['accuracy']:>9.2f} {s['update_seconds']:>18.3f} {s['peak_memory_gb']:>8.2f}")


if __name__ == "__main__":
    flags.mark_flag_as_required("checkpoint")
    flags.mark_flag_as_required("out")
    run(main)
