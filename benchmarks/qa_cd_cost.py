"""What context distillation (CD) costs per held-out SQuAD document on the embedded SmolLM2, at the
reference's budgets: oracle CD (300 steps on one test question) and the step time of generated-question CD
(minibatches of 16 questions with the teacher's replies; the reference runs 300 epochs, 600 steps for 20
questions). Prints the summaries of both as JSON (latency split into the teacher's replies, its targets and
training; peak resident memory).

    python benchmarks/qa_cd_cost.py [--document=0 --steps=20]
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

from d2l_jax.baselines.context_distillation import distill_document, distill_oracle
from d2l_jax.data.qa_sets import QASource
from d2l_jax.eval.qa_methods import plan_documents
from d2l_jax.models.base_model import load_base_model

SQUAD = Path(__file__).resolve().parents[2] / "shared/data/qa/squad-train-v1.1.json.gz"

_DATA = flags.DEFINE_string("data", str(SQUAD), "SQuAD v1.1 file")
_DOCUMENT = flags.DEFINE_integer("document", 0, "which held-out document of launch.evaluate_qa's plan (seed 0)")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps of generated-question-sized CD (16 questions a step)")


def main(argv):
    del argv
    base = load_base_model("smollm2-135m-instruct")
    records = QASource(_DATA.value, split="validation", template="none").records
    document = plan_documents(records, 500)[_DOCUMENT.value]
    oracle = distill_oracle(base, document.context, document.questions[0], progress=False)
    # 20 questions (the reference's 4 rounds of 5), here the document's own repeated, in minibatches of 16.
    questions = (list(document.questions) * 20)[:20]
    generated = distill_document(base, document.context, questions, steps=_STEPS.value, progress=False)
    print(json.dumps({
        "document_chars": len(document.context),
        "questions": len(document.questions),
        "oracle_cd_300_steps_one_question": oracle.summary(),
        f"generated_cd_20_questions_{_STEPS.value}_steps": generated.summary(),
    }, indent=1))


if __name__ == "__main__":
    app.run(main)
