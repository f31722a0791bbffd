"""D2L and its control from this run (shipped QA hypernetwork) + the base model's no-document and in-context
records of the earlier run on the same 114 documents / 504 questions.

    python results/qa_squad_qa_hypernetwork/merge.py WORKDIR/results.json results/qa_squad/results.json OUT
"""
import json, sys
from pathlib import Path
from d2l_jax.eval.qa_methods import gap_lines, markdown_table, summarize

new = json.load(open(sys.argv[1]))
old = json.load(open(sys.argv[2]))
ours = [r for r in new["records"] if r["variant"] in ("d2l", "d2l_control")]
base = [r for r in old["records"] if r["variant"] in ("no_document", "in_context")]
docs = {v: sorted(r["document"] for r in ours if r["variant"] == v) for v in ("d2l", "d2l_control")}
print({v: len(d) for v, d in docs.items()})
merged = ours + base
summary = summarize(merged)
out = Path(sys.argv[3]); out.mkdir(parents=True, exist_ok=True)
(out / "results.json").write_text(json.dumps(new, indent=1))
(out / "summary.json").write_text(json.dumps(summary, indent=1))
table = ["# SQuAD held-out articles: the shipped QA hypernetwork (smollm2-135m-qa = run 12r step 811)", "",
         "D2L and control from this run; no document and in-context from results/qa_squad/results.json (same 114 documents, same questions, same base model and decoding).", "",
         markdown_table(summary["all"]), "", "Share of the no-document → in-context gap closed, with paired 95% bootstrap intervals:", "", gap_lines(summary["gap"])]
(out / "table.md").write_text("\n".join(table) + "\n")
print("\n".join(table))
