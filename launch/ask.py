"""Internalize a document with a pretrained D2L and answer a question without the document in the prompt,
beside the base model's answer without it:

    python -m launch.ask --pretrained=smollm2-135m-niah --document=docs/examples/haystack.txt \\
        --question="What is the special magic number? Reply with only the number."

``--pretrained`` is a shipped name (``d2l_jax.pretrained.available()``) or a directory written by
``D2L.save_pretrained``; ``--checkpoint`` takes a training workdir instead. ``--in_context`` also prints the
base model's answer with the document in its prompt. ``--template=closed_qa`` puts the question in the
reference's closed-QA instruction, as the QA hypernetworks were trained and evaluated::

    python -m launch.ask --pretrained=smollm2-135m-qa --document=docs/examples/ministry_of_defence.txt \
        --template=closed_qa --question="During what years did the five Departments of State do the work of the modern Ministry of Defence?"
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import app, flags

from launch import run

_PRETRAINED = flags.DEFINE_string("pretrained", None, "pretrained name or directory")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir (instead of --pretrained)")
_DOCUMENT = flags.DEFINE_string("document", None, "text file to internalize", required=True)
_QUESTION = flags.DEFINE_string("question", None, "the question, asked without the document", required=True)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "longest answer in tokens")
_IN_CONTEXT = flags.DEFINE_bool("in_context", False, "also answer with the document in the prompt")
_TEMPLATE = flags.DEFINE_enum("template", "none", ["none", "closed_qa"], "the question as given, or in the closed-QA instruction")


def main(argv):
    del argv
    if bool(_PRETRAINED.value) == bool(_CHECKPOINT.value):
        raise app.UsageError("give exactly one of --pretrained and --checkpoint")
    document = Path(_DOCUMENT.value)
    if not document.is_file():
        raise app.UsageError(f"--document={document}: no such file")
    text = document.read_text()

    import jax

    from d2l_jax.api import D2L
    from d2l_jax.data.examples import student_messages
    from d2l_jax.data.qa_sets import closed_qa_prompt

    d2l = D2L.from_pretrained(_PRETRAINED.value) if _PRETRAINED.value else D2L.load(_CHECKPOINT.value)
    prompt = closed_qa_prompt(_QUESTION.value) if _TEMPLATE.value == "closed_qa" else _QUESTION.value
    question = [student_messages(prompt)]
    d2l.internalize(text)  # compiles; the timed run below is what a second document costs
    start = time.perf_counter()
    adapter = jax.block_until_ready(d2l.internalize(text))
    seconds = time.perf_counter() - start
    answer = d2l.generate(question, adapter=adapter, max_new_tokens=_MAX_NEW_TOKENS.value)[0]
    without = d2l.base.generate(question, max_new_tokens=_MAX_NEW_TOKENS.value)[0]
    print(f"document: {document} ({adapter.num_tokens} tokens, {adapter.num_chunks} chunks), internalized in {seconds:.2f} s")
    print(f"question: {_QUESTION.value}")
    print(f"D2L, document internalized (not in the prompt): {answer!r}")
    print(f"base model, no document:                        {without!r}")
    if _IN_CONTEXT.value:
        with_document = d2l.base.generate([student_messages(prompt, context=text)], max_new_tokens=_MAX_NEW_TOKENS.value)[0]
        print(f"base model, document in the prompt:             {with_document!r}")


if __name__ == "__main__":
    run(main)
