r"""Self-generated question-answer training data (reference-facts §7.2): the base model writes questions about
each document, answers them with the document in its prompt, and the teacher's top-k log-probabilities are
stored for offline distillation.

  python -m launch.generate_qa --documents=FILE_OR_DIR --out=qa.parquet [--rounds=2 --max_documents=100]
  python -m launch.generate_qa --questions_from=squad.jsonl --out=squad_teacher.parquet   # teacher only

``--documents``: a ``.txt`` file (the whole file is one document), a directory of ``.txt`` files (one
document each), or a ``.jsonl``/``.parquet`` file with a ``context`` field (its distinct contexts, in order).
``--questions_from``: a ``.jsonl``/``.parquet`` file of ``context, prompt`` records (e.g. a QA data set's
own questions): no questions are generated, the teacher answers these.
``--qa_set``: a QA data set (SQuAD, ROPES, ...; ``d2l_jax.data.qa_sets``) whose ``--split`` questions, in the
closed-QA prompt, the teacher answers: ``--max_questions`` of them drawn with ``--seed``, each once per kind of
``--contexts`` (``passage,answer_swapped``: with its passage and with its answer-swapped twin)::

  python -m launch.generate_qa --qa_set=../shared/data/qa/squad-train-v1.1.json.gz --contexts=passage,answer_swapped \
      --max_questions=3000 --out=squad_teacher.parquet

Writes ``--out`` (parquet rows ``context, prompt, response, generator_answer, round, document_index,
teacher_log_probs, teacher_ids``, a ``records`` data source for training) and ``<out>.summary.json``, and
prints the summary. Work is saved per batch under ``<out>.parts/``: rerunning the same command resumes.
"""

import json

from absl import app, flags

from d2l_jax.data import qa_sets, self_gen
from d2l_jax.models.base_model import load_base_model
from launch import run

_DOCUMENTS = flags.DEFINE_string("documents", None, "Documents to write questions about (.txt, a directory of .txt, .jsonl or .parquet).")
_QUESTIONS_FROM = flags.DEFINE_string(
    "questions_from", None, "Records with context and prompt to answer (teacher only; no question generation)."
)
_QA_SET = flags.DEFINE_string("qa_set", None, "A QA data set whose questions the teacher answers (teacher only).")
_SPLIT = flags.DEFINE_enum("split", "train", list(qa_sets.SPLITS), "--qa_set: the split (held-out groups are 'validation').")
_CONTEXTS = flags.DEFINE_list("contexts", ["passage"], f"--qa_set: the context kinds each question is answered with, of {qa_sets.CONTEXT_KINDS}.")
_MAX_QUESTIONS = flags.DEFINE_integer("max_questions", None, "--qa_set: draw this many questions (default: all).")
_SEED = flags.DEFINE_integer("seed", 0, "--qa_set: the seed the questions are drawn with.")
_OUT = flags.DEFINE_string("out", None, "Output parquet file.", required=True)
_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Embedded model name, .gguf file or HF directory.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
_ROUNDS = flags.DEFINE_integer(
    "rounds",
    self_gen.TRAINING_DATA_ROUNDS,
    "Question rounds per document (the reference: 2 for training data, 4 for context distillation).",
)
_PAIRS_PER_ROUND = flags.DEFINE_integer("pairs_per_round", self_gen.PAIRS_PER_ROUND, "Question-answer pairs asked for per round.")
_MAX_DOCUMENTS = flags.DEFINE_integer("max_documents", None, "Use only the first N documents (distinct contexts).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Documents per part (and prompts per generate call).")
_TOP_K = flags.DEFINE_integer("top_k", self_gen.TOP_K, "Teacher log-probabilities stored per label token.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", self_gen.TEACHER_TOKENS, "The teacher's reply budget; longer replies are dropped.")
_QUESTION_TOKENS = flags.DEFINE_integer("question_tokens", self_gen.QUESTION_TOKENS, "The question generator's budget per round.")


def main(argv):
    del argv
    if sum(flag.value is not None for flag in (_DOCUMENTS, _QUESTIONS_FROM, _QA_SET)) != 1:
        raise app.UsageError("give exactly one of --documents, --questions_from and --qa_set")
    try:
        if _DOCUMENTS.value is not None:
            inputs = self_gen.read_documents(_DOCUMENTS.value, _MAX_DOCUMENTS.value)
        elif _QUESTIONS_FROM.value is not None:
            inputs = self_gen.read_records(_QUESTIONS_FROM.value, _MAX_DOCUMENTS.value)
        else:
            questions = qa_sets.paired_questions(_QA_SET.value, _CONTEXTS.value, _SPLIT.value, _MAX_QUESTIONS.value, _SEED.value)
            inputs = [{"context": r["context"], "prompt": r["prompt"]} for r in questions]
    except (OSError, ValueError) as error:
        raise app.UsageError(str(error)) from error
    base = load_base_model(_MODEL.value, dtype=_DTYPE.value)
    common = dict(batch_size=_BATCH_SIZE.value, top_k=_TOP_K.value, max_new_tokens=_MAX_NEW_TOKENS.value)
    if _DOCUMENTS.value is not None:
        summary = self_gen.generate_qa_file(
            base,
            inputs,
            _OUT.value,
            rounds=_ROUNDS.value,
            pairs_per_round=_PAIRS_PER_ROUND.value,
            question_tokens=_QUESTION_TOKENS.value,
            **common,
        )
    else:
        summary = self_gen.answer_records_file(base, inputs, _OUT.value, **common)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    run(main)
