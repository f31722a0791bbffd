"""A needle in real prose: the NIAH needle sentence hidden in held-out QA paragraphs, asked without them.

    python -m launch.evaluate_prose_needle --pretrained=smollm2-135m-niah \\
        --data=../shared/data/qa/squad-train-v1.1.json.gz --records=60 --out=results/prose_needle/niah.json

Each record is one held-out paragraph with ``The special magic number is NNNN.`` at a random sentence
boundary (``data.niah.prose_needle_records``). Exact match of the first 4-digit number of the reply for:
D2L (the paragraph internalized, not in the prompt), its control (another record's paragraph and number
internalized), the base model without the paragraph, and with it in the prompt; each with its 95%
bootstrap interval. Writes the replies and the summary as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags
from tqdm.auto import tqdm

from launch import check_model_flags, load_d2l, run

_PRETRAINED = flags.DEFINE_string("pretrained", None, "pretrained name or directory")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir (instead of --pretrained)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (latest by default)")
_DATA = flags.DEFINE_string("data", None, "QA file whose paragraphs are the haystacks", required=True)
_FORMAT = flags.DEFINE_string("format", None, "its format (default: detected)")
_SPLIT = flags.DEFINE_enum("split", "validation", ["train", "validation", "all"], "which paragraphs")
_RECORDS = flags.DEFINE_integer("records", 60, "paragraphs (one needle each)")
_SEED = flags.DEFINE_integer("seed", 0, "which paragraphs, boundaries and numbers")
_OUT = flags.DEFINE_string("out", None, "JSON file to write", required=True)


def main(argv):
    del argv
    check_model_flags(_PRETRAINED.value, _CHECKPOINT.value, _STEP.value)
    from d2l_jax.data.niah import prose_needle_records
    from d2l_jax.data.qa_sets import QASource, contexts
    from d2l_jax.eval.niah import base_replies, is_correct, student_replies
    from d2l_jax.eval.statistics import mean_and_interval

    d2l = load_d2l(_PRETRAINED.value, _CHECKPOINT.value, _STEP.value)
    paragraphs = [context for context, _ in contexts(QASource(_DATA.value, _FORMAT.value, _SPLIT.value).records)]
    records = prose_needle_records(paragraphs, _RECORDS.value, _SEED.value)
    # The control reads the next record's paragraph (another number) and is asked the same question.
    controls = [dict(r, context=records[(i + 1) % len(records)]["context"]) for i, r in enumerate(records)]
    methods = {
        "d2l": lambda: student_replies(d2l, records),
        "d2l_control": lambda: student_replies(d2l, controls),
        "no_document": lambda: base_replies(d2l.base, records, with_context=False),
        "in_context": lambda: base_replies(d2l.base, records, with_context=True),
    }
    replies = {method: answer() for method, answer in tqdm(methods.items(), desc="methods")}
    summary = {}
    for method, texts in replies.items():
        hits = [float(is_correct(reply, record)) for reply, record in zip(texts, records, strict=True)]
        summary[method] = {"correct": int(sum(hits)), **mean_and_interval(hits)}
        print(f"{method:12s} {int(sum(hits)):3d}/{len(hits)}  [{summary[method]['low']:.2f}, {summary[method]['high']:.2f}]")
    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    identity = {"hypernetwork": _PRETRAINED.value or str(Path(_CHECKPOINT.value).resolve()), "step": _STEP.value,
                "data": _DATA.value, "split": _SPLIT.value, "seed": _SEED.value}
    rows = [dict(record, replies={m: replies[m][i] for m in replies}) for i, record in enumerate(records)]
    out.write_text(json.dumps({"identity": identity, "summary": summary, "records": rows}, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    run(main)
