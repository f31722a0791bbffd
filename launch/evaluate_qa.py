"""Every QA method on held-out real documents: D2L, its control, in-context, no document, generated-question
and oracle context distillation; token F1, recall, exact match and the gold answer's log-likelihood with
95% bootstrap intervals, update and answer latency, peak memory.

    python -m launch.evaluate_qa --data=../shared/data/qa/squad-train-v1.1.json.gz --workdir=OUT \\
        [--checkpoint=RUN_DIR | --pretrained=NAME] [--questions=500 --cd_documents=50 --cd_steps=... --methods=...]

Documents come whole from the data file's validation split (held-out articles / backgrounds,
``data.qa_sets.split_records``). Writes ``OUT/results.json`` (every reply and score, per method and
document), ``OUT/summary.json``, ``OUT/table.md`` and ``OUT/qa_f1_vs_update_latency.png``. Rerunning the
same command resumes: finished (method, document) cells are skipped; a larger ``--questions`` or
``--cd_documents`` adds documents to the same results, and another ``--cd_steps`` adds CD at that budget
beside the others (the plot then shows F1 against update latency per budget).

``--base_results=EARLIER/results.json`` joins an earlier run of the same plan (same data, split, seed, template,
base model and decoding; another checkpoint) into the summary, table and plot: its methods that need no
checkpoint (``no_document``, ``in_context``, CD), where this run has none, so that evaluating another
hypernetwork needs only ``--methods=d2l,d2l_control``. This run's ``results.json`` keeps its own records.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

from d2l_jax.data.qa_sets import QA_FORMATS, QASource
from d2l_jax.eval import plots
from d2l_jax.eval.qa_methods import (
    D2L_METHODS,
    METHODS,
    gap_lines,
    joined_base_records,
    lead_lines,
    markdown_table,
    plan_documents,
    run_comparison,
    summarize,
)
from d2l_jax.models.base_model import load_base_model
from launch import load_d2l, run

_DATA = flags.DEFINE_string("data", None, "QA data file (SQuAD / ROPES JSON, DROP, LongBench or records)", required=True)
_FORMAT = flags.DEFINE_enum("format", None, list(QA_FORMATS), "the data file's format (default: detected)")
_SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "train", "all"], "which documents of the file")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (results.json, summary.json, table.md, the plot)", required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "D2L training workdir (needed for the d2l and d2l_control methods)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "a named pretrained hypernetwork (D2L.from_pretrained) instead of --checkpoint")
_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "base model when neither --checkpoint nor --pretrained is given")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"methods to run, of {', '.join(METHODS)}")
_QUESTIONS = flags.DEFINE_integer("questions", 500, "at least this many questions (whole documents)")
_CD_DOCUMENTS = flags.DEFINE_integer("cd_documents", 50, "documents the CD methods run on (the first of the evaluation's)")
_BASE_RESULTS = flags.DEFINE_string(
    "base_results", None, "an earlier run's results.json of the same plan whose no-checkpoint methods join the summary"
)
_CD_STEPS = flags.DEFINE_integer("cd_steps", None, "CD optimizer steps per LoRA (default: the reference's 300 epochs)")
_CD_ROUNDS = flags.DEFINE_integer("cd_rounds", 4, "question-generation rounds of generated-question CD (the reference's 4)")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "reply budget (the reference's 256)")
_TEMPLATE = flags.DEFINE_enum("template", "closed_qa", ["closed_qa", "none"], "the reference's closed-QA instruction around each question, or the bare question")
_SEED = flags.DEFINE_integer("seed", 0, "which documents")


def main(argv):
    del argv
    methods = list(dict.fromkeys(_METHODS.value))
    if set(methods) & set(D2L_METHODS) and not (_CHECKPOINT.value or _PRETRAINED.value):
        raise app.UsageError(f"methods {sorted(set(methods) & set(D2L_METHODS))} need --checkpoint or --pretrained")
    d2l = load_d2l(_PRETRAINED.value, _CHECKPOINT.value, _STEP.value) if _CHECKPOINT.value or _PRETRAINED.value else None
    base = d2l.base if d2l is not None else load_base_model(_MODEL.value)
    source = QASource(_DATA.value, _FORMAT.value, _SPLIT.value, template="none")
    documents = plan_documents(source.records, _QUESTIONS.value, _SEED.value, _TEMPLATE.value)
    identity = {
        "data": str(Path(_DATA.value).resolve()),
        "format": source.format,
        "split": _SPLIT.value,
        "validation_share": source.validation_share,
        "template": _TEMPLATE.value,
        "seed": _SEED.value,
        "base_model": base.name,
        "checkpoint": str(Path(_CHECKPOINT.value).resolve()) if _CHECKPOINT.value else _PRETRAINED.value,
        "step": _STEP.value,
        "max_new_tokens": _MAX_NEW_TOKENS.value,
        "cd_rounds": _CD_ROUNDS.value,
    }
    settings = {"methods": methods, "questions": _QUESTIONS.value, "cd_documents": _CD_DOCUMENTS.value}
    workdir = Path(_WORKDIR.value)
    records = run_comparison(
        base, d2l, documents, methods, workdir, settings=settings, identity=identity, cd_documents=_CD_DOCUMENTS.value,
        cd_steps=_CD_STEPS.value, cd_rounds=_CD_ROUNDS.value, max_new_tokens=_MAX_NEW_TOKENS.value,
    )
    joined = []
    if _BASE_RESULTS.value:
        joined = joined_base_records(json.loads(Path(_BASE_RESULTS.value).read_text()), identity, records)
    summary = summarize([*records, *joined])
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    name = Path(_DATA.value).name
    table = [
        f"# QA on held-out documents of {name} ({_SPLIT.value} split), {base.name}",
        "",
        f"All documents of each method ({len(documents)} planned):",
        "",
    ]
    if joined:
        variants = ", ".join(sorted({r["variant"] for r in joined}))
        table += [f"{variants}: from {_BASE_RESULTS.value}, the same documents and questions.", ""]
    table.append(markdown_table(summary["all"]))
    if summary["cd_documents"]:
        count = next(iter(summary["cd_documents"].values()))["documents"]
        table += ["", f"The {count} documents where every CD variant has finished:", "", markdown_table(summary["cd_documents"])]
    table += ["", "Share of the no-document → in-context gap closed, with paired 95% bootstrap intervals:", "", gap_lines(summary["gap"])]
    if summary["lead"]:
        table += ["", "D2L minus its control on the same questions, with paired 95% bootstrap intervals:", "", lead_lines(summary["lead"])]
    (workdir / "table.md").write_text("\n".join(table) + "\n")
    plot = workdir / "qa_f1_vs_update_latency.png"
    scope = summary["cd_documents"] or summary["all"]
    plots.qa_f1_vs_update_latency(scope, plot, title=f"{name}: {next(iter(scope.values()))['documents']} held-out documents, {base.name}")
    print("\n".join(table))
    print("\n".join(str(p) for p in (workdir / "results.json", workdir / "summary.json", workdir / "table.md", plot)))


if __name__ == "__main__":
    run(main)
