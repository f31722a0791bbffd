"""Does run 11's adapter keep each number with its key, or only the paragraph's numbers?

    python results/qa_smollm2/run11_needles/key_binding.py --workdir=/work/runs/qa_run11_needles [--step=STEP] > OUT.json

On the training loop's own 96 validation questions (held-out passages with three keyed needles each, seed 42),
the gold answer's log-likelihood per token under the passage's adapter for: the asked key's number (gold),
the passage's two other numbers (same adapter, wrong key), and the gold under another passage's adapter (the
control). ``bound`` is the share of questions where the gold beats both other numbers (chance: 1/3, if the
adapter carried the numbers without their keys); paired 95% bootstrap intervals of the differences.
"""

import json
import re

import numpy as np
from absl import app, flags

from d2l_jax.api import D2L
from d2l_jax.data.qa_sets import KEYED_NEEDLE, QASource
from d2l_jax.eval.qa import gold_log_likelihoods
from d2l_jax.eval.qa_methods import plan_documents
from d2l_jax.eval.statistics import mean_and_interval, paired_bootstrap_interval
from d2l_jax.hypernet.adapter import stack_adapters

_WORKDIR = flags.DEFINE_string("workdir", None, "run 11's training workdir", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
SQUAD = "../shared/data/qa/squad-train-v1.1.json.gz"
NEEDLE = re.compile(KEYED_NEEDLE.replace("{key}", "[a-z ]+").replace("{number:04d}", r"(\d{4})").replace(".", r"\."))


def main(argv):
    del argv
    d2l = D2L.load(_WORKDIR.value, step=_STEP.value)
    documents = plan_documents(QASource(SQUAD, split="validation", template="none", context="keyed_needles").records, 96, seed=42)
    prompts = [q for d in documents for q in d.questions]
    gold = [a for d in documents for a in d.answers]
    others = [[n for n in NEEDLE.findall(d.context) if n != a[0]] for d in documents for a in d.answers]
    assert all(len(o) == 2 for o in others)
    owner = [i for i, d in enumerate(documents) for _ in d.questions]
    adapters = d2l.adapters([d.context for d in documents])
    controls = d2l.adapters([d.control for d in documents])
    lora = stack_adapters([adapters[i] for i in owner])
    control_lora = stack_adapters([controls[i] for i in owner])
    score = lambda answers, l: np.asarray(gold_log_likelihoods(d2l.base, prompts, answers, lora=l))
    scores = {
        "gold": score(gold, lora),
        "other_0": score([(o[0],) for o in others], lora),
        "other_1": score([(o[1],) for o in others], lora),
        "control_gold": score(gold, control_lora),
    }
    best_other = np.maximum(scores["other_0"], scores["other_1"])
    mean_other = (scores["other_0"] + scores["other_1"]) / 2
    out = {"questions": len(prompts), **{k: mean_and_interval(v) for k, v in scores.items()}}
    difference = lambda x, y: x - y
    for name, (a, b) in {"gold_minus_mean_other": (scores["gold"], mean_other), "gold_minus_control": (scores["gold"], scores["control_gold"])}.items():
        low, high = paired_bootstrap_interval(difference, {"x": a, "y": b})
        out[name] = {"mean": float(np.mean(a - b)), "low": low, "high": high}
    out["bound"] = mean_and_interval((scores["gold"] > best_other).astype(float))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    app.run(main)
