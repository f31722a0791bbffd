"""What the generated (document-dependent) part of run 10's adapters adds, on the training loop's own
validation questions (the qa evaluator's 96-question plan of held-out SQuAD articles, seed 42):

    python results/qa_smollm2/run10_swapped/generated_part.py --workdir=/work/runs/qa_run10 --step=STEP > OUT.json

Gold-answer log-likelihood per token of the student with: the bias LoRA alone (the generated chunk adapters
scaled by 0), the paragraph's own adapter (scale 1, the D2L figure), an unrelated paragraph's (the control),
and both again with the generated part doubled; paired 95% bootstrap intervals of the differences.
"""

import json

import numpy as np
from absl import app, flags

from d2l_jax.api import D2L
from d2l_jax.data.qa_sets import QASource
from d2l_jax.eval.qa import gold_log_likelihoods
from d2l_jax.eval.qa_methods import plan_documents
from d2l_jax.eval.statistics import mean_and_interval, paired_bootstrap_interval
from d2l_jax.hypernet.adapter import stack_adapters

_WORKDIR = flags.DEFINE_string("workdir", None, "run 10's training workdir", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
SQUAD = "../shared/data/qa/squad-train-v1.1.json.gz"


def main(argv):
    del argv
    d2l = D2L.load(_WORKDIR.value, step=_STEP.value)
    documents = plan_documents(QASource(SQUAD, split="validation", template="none").records, 96, seed=42)
    owner = [i for i, d in enumerate(documents) for _ in d.questions]
    prompts = [q for d in documents for q in d.questions]
    answers = [a for d in documents for a in d.answers]
    conditions = {"bias_only": (0.0, False), "d2l": (1.0, False), "control": (1.0, True), "d2l_x2": (2.0, False), "control_x2": (2.0, True)}
    scores = {}
    for name, (scaler, control) in conditions.items():
        adapters = d2l.adapters([d.control if control else d.context for d in documents], scaler=scaler)
        lora = stack_adapters([adapters[i] for i in owner])
        scores[name] = np.asarray(gold_log_likelihoods(d2l.base, prompts, answers, lora=lora))
    out = {"workdir": _WORKDIR.value, "step": _STEP.value, "questions": len(prompts)}
    out |= {name: mean_and_interval(values) for name, values in scores.items()}
    for a, b in (("d2l", "control"), ("d2l", "bias_only"), ("control", "bias_only"), ("d2l_x2", "control_x2")):
        low, high = paired_bootstrap_interval(lambda x, y: x - y, {"x": scores[a], "y": scores[b]})
        out[f"{a}_minus_{b}"] = {"mean": float(scores[a].mean() - scores[b].mean()), "low": low, "high": high}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    app.run(main)
