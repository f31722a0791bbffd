"""NIAH accuracy of a trained D2L on held-out contexts, and the learning curve of its run.

    python -m launch.report_niah --workdir=DIR --out=results/niah_smollm2 [--contexts=200 --split=test]

Writes ``OUT/accuracy.json`` (student without the document, base model without and with it, on
``--contexts`` contexts of the run's evaluation lengths) and ``OUT/learning_curve.png``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from absl import app, flags

from d2l_jax.api import D2L
from d2l_jax.data.niah import NIAHSource
from d2l_jax.eval import niah
from d2l_jax.eval.plots import learning_curve
from d2l_jax.train.config import RunConfig
from launch import run

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "training workdir (config.json, metrics.jsonl, checkpoints/)", required=True
)
_OUT = flags.DEFINE_string("out", None, "output directory", required=True)
_CONTEXTS = flags.DEFINE_integer("contexts", 200, "held-out contexts to evaluate")
_SPLIT = flags.DEFINE_string("split", "test", "NIAH split of the held-out contexts")


def main(argv):
    del argv
    workdir, out = Path(_WORKDIR.value), Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    experiment = RunConfig.from_json(json.loads((workdir / "config.json").read_text()))
    if experiment.evaluator is None or experiment.evaluator.name != "niah":
        raise app.UsageError(f"{workdir} is not a NIAH run (its evaluator is {experiment.evaluator}); there is no length bin to report on")
    lo, hi = experiment.evaluator.options["bin"]
    d2l = D2L.load(workdir)
    source = NIAHSource(d2l.base.tokenizer, _SPLIT.value, lo, hi, _CONTEXTS.value, seed=experiment.train.seed)
    records = [source[i] for i in range(len(source))]
    student = niah.student_replies(d2l, records)
    result = {
        "split": _SPLIT.value,
        "contexts": len(records),
        "tokens": [lo, hi],
        "student_without_document": niah.exact_match(student, records),
        "base_without_document": niah.exact_match(niah.base_replies(d2l.base, records, with_context=False), records),
        "base_with_document": niah.exact_match(niah.base_replies(d2l.base, records, with_context=True), records),
        "student_examples": [{"response": r["response"], "reply": s} for r, s in zip(records[:10], student)],
        "scoring": "exact match of the first 4-digit number in the greedy reply",
    }
    (out / "accuracy.json").write_text(json.dumps(result, indent=2))
    shutil.copy(workdir / "config.json", out / "config.json")
    shutil.copy(workdir / "metrics.jsonl", out / "metrics.jsonl")
    learning_curve(workdir / "metrics.jsonl", out / "learning_curve.png", title=f"D2L NIAH meta-training on {experiment.model}")
    print(json.dumps({k: v for k, v in result.items() if k != "student_examples"}, indent=2))


if __name__ == "__main__":
    run(main)
