"""The QA comparison of every method on the tiny random D2L: complete results, resumption, summaries, the
evaluator a training run calls, and the gold answer's log-likelihood against a direct computation."""

import json

import jax
import numpy as np
import pytest

from d2l_jax.api import stack_adapters
from d2l_jax.data.examples import sequence_with_labels, student_messages
from d2l_jax.eval import plots, qa_methods
from d2l_jax.eval.qa import gold_log_likelihoods
from d2l_jax.eval.qa_methods import METHODS, QAEvaluator, markdown_table, plan_documents, run_comparison, summarize

PARAGRAPHS = [
    # Long enough for two chunks of the tiny D2L: its adapter has a higher rank than the others'.
    ("Lisbon", "The vault of the old bank in Lisbon opens with the code 4817. Only the manager knows it. " * 4, [("What opens the vault?", ["the code 4817", "4817"])]),
    ("Lisbon", "Lisbon lies on the Tagus river. Its trams are yellow and climb steep hills.", [("Which river?", ["Tagus"]), ("What colour are the trams?", ["yellow"])]),
    ("Moon", "The Moon orbits the Earth every 27 days and has no air.", [("How long is an orbit?", ["27 days"])]),
    ("Moon", "Astronauts first walked on the Moon in 1969, during the Apollo 11 mission.", [("When did astronauts walk on the Moon?", ["1969"])]),
]


def qa_records():
    return [
        {"context": context, "prompt": q, "response": answers[0], "answers": answers, "id": f"{title}-{i}-{j}", "group": title}
        for i, (title, context, qas) in enumerate(PARAGRAPHS)
        for j, (q, answers) in enumerate(qas)
    ]


def test_plan_takes_whole_documents_with_a_control_from_another_group():
    documents = plan_documents(qa_records(), questions=3, seed=0)
    assert sum(len(d.questions) for d in documents) >= 3
    by_context = {r["context"]: r for r in qa_records()}
    for d in documents:
        assert len(d.questions) == sum(r["context"] == d.context for r in qa_records())
        assert by_context[d.control]["group"] != d.group
        assert all(q.startswith("Answer the following question.") and q.endswith(r) for q, r in
                   zip(d.questions, [r["prompt"] for r in qa_records() if r["context"] == d.context]))
    assert plan_documents(qa_records(), 3, seed=0) == documents
    assert [d.context for d in plan_documents(qa_records(), 5, seed=0)][: len(documents)] == [d.context for d in documents]
    with pytest.raises(ValueError, match="hold 4 questions; 5 were asked"):
        plan_documents(qa_records()[:4], 5)
    with pytest.raises(ValueError, match="one group"):
        plan_documents([r for r in qa_records() if r["group"] == "Moon"], 1)


def test_gold_log_likelihood_matches_the_full_log_softmax(tiny_d2l):
    base = tiny_d2l.base
    [adapter] = tiny_d2l.adapters([PARAGRAPHS[0][1]])
    prompts, answers = ["What opens the vault?", "Which river?"], [["the code 4817", "4817"], ["Tagus"]]
    for context, lora in ((None, None), (PARAGRAPHS[1][1], None), (None, adapter.lora)):
        got = gold_log_likelihoods(base, prompts, answers, contexts=[context] * 2, lora=lora)
        for value, prompt, golds in zip(got, prompts, answers):
            best = -np.inf
            for gold in golds:
                ids, start, end = sequence_with_labels(base.tokenizer, student_messages(prompt, gold, context), base.stop_token_ids)
                log_probs = jax.nn.log_softmax(np.asarray(base.logits([ids], lora=lora))[0], -1)
                best = max(best, float(np.mean([log_probs[p - 1, ids[p]] for p in range(start, end)])))
            assert value == pytest.approx(best, abs=1e-4)
    assert gold_log_likelihoods(base, prompts, answers, lora=adapter.lora) != gold_log_likelihoods(base, prompts, answers)
    # A row per question: each question scored with its own adapter, as when scored alone.
    [other] = tiny_d2l.adapters([PARAGRAPHS[2][1]])
    both = stack_adapters([adapter, other])  # zero-pads the lower rank
    alone = [gold_log_likelihoods(base, [p], [a], lora=l)[0] for p, a, l in zip(prompts, answers, (adapter.lora, other.lora))]
    assert gold_log_likelihoods(base, prompts, answers, lora=both) == pytest.approx(alone, abs=1e-5)


@pytest.fixture()
def fixed_questions(monkeypatch):
    """Generated-question CD on fixed questions: the tiny random model writes no parsable pairs."""
    calls = []

    def generate_questions(base, documents, rounds):
        calls.append(documents)
        return [[("What is in the text?", "a code")] for _ in documents]

    monkeypatch.setattr(qa_methods, "generate_questions", generate_questions)
    return calls


def test_comparison_writes_every_method_and_resumes_without_recomputing(tiny_d2l, tmp_path, fixed_questions, monkeypatch):
    documents = plan_documents(qa_records(), questions=3, seed=0)
    run = lambda: run_comparison(
        tiny_d2l.base, tiny_d2l, documents, METHODS, tmp_path, settings={}, identity={"seed": 0}, cd_documents=1, cd_steps=2,
        cd_rounds=1, max_new_tokens=4, progress=False,
    )
    records = run()
    cells = {(r["variant"], r["document"]) for r in records}
    expected = {(m + "@2" if m.startswith("cd_") else m, d.index) for m in METHODS for d in (documents[:1] if m.startswith("cd_") else documents)}
    assert cells == expected and len(records) == len(expected)
    for r in records:
        document = documents[r["document"]]
        assert [q["prompt"] for q in r["questions"]] == list(document.questions)
        for q in r["questions"]:
            assert set(q) >= {"reply", "answers", "f1", "recall", "em", "gold_log_likelihood"}
            assert 0 <= q["f1"] <= 1 and q["gold_log_likelihood"] < 0
        assert r["update_seconds"] >= 0 and r["peak_memory_gb"] > 0
    assert fixed_questions == [[documents[0].context]]
    by_cell = {(r["method"], r["document"]): r for r in records}
    assert by_cell[("cd_generated", 0)]["details"]["steps"] == 2 and by_cell[("cd_generated", 0)]["variant"] == "cd_generated@2"
    assert len(by_cell[("cd_oracle", 0)]["details"]["per_question"]) == len(documents[0].questions)
    # Answered in one batch with other documents' questions and adapters (of other ranks), as each document alone.
    ranks = {tiny_d2l.adapters([d.context])[0].lora.A["down_proj"].shape[2] for d in documents}
    assert len(ranks) > 1
    [adapter] = tiny_d2l.adapters([documents[0].context])
    for method, kwargs in (("d2l", {"lora": adapter.lora}), ("in_context", {})):
        context = documents[0].context if method == "in_context" else None
        alone = tiny_d2l.base.generate([student_messages(q, context=context) for q in documents[0].questions], max_new_tokens=4, **kwargs)
        assert [q["reply"] for q in by_cell[(method, 0)]["questions"]] == alone
    # The control's adapter comes from another document: its gold likelihoods differ from D2L's.
    assert [q["gold_log_likelihood"] for q in by_cell[("d2l", 0)]["questions"]] != [
        q["gold_log_likelihood"] for q in by_cell[("d2l_control", 0)]["questions"]
    ]

    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["records"] == records
    monkeypatch.setattr(qa_methods, "evaluate_documents", lambda *a, **k: pytest.fail("a finished cell was recomputed"))
    assert run() == records
    with pytest.raises(ValueError, match="another run"):
        run_comparison(tiny_d2l.base, tiny_d2l, documents, METHODS, tmp_path, settings={}, identity={"seed": 1}, progress=False)

    summary = summarize(records)
    assert summary["all"]["d2l"]["questions"] == sum(len(d.questions) for d in documents)
    assert summary["cd_documents"]["in_context"]["questions"] == len(documents[0].questions)
    for s in summary["all"].values():
        assert s["f1"]["low"] <= s["f1"]["mean"] <= s["f1"]["high"]
    assert {"d2l/f1/all", "d2l_control/f1/all", "cd_oracle@2/gold_log_likelihood/cd_documents"} <= set(summary["gap"])
    for metric, lead in summary["lead"].items():
        assert lead["n"] == summary["all"]["d2l"]["questions"] and lead["low"] <= lead["mean"] <= lead["high"]
        np.testing.assert_allclose(lead["mean"], summary["all"]["d2l"][metric]["mean"] - summary["all"]["d2l_control"][metric]["mean"], atol=1e-12)
    table = markdown_table(summary["all"])
    assert len(table.splitlines()) == 2 + len(METHODS)
    plots.qa_f1_vs_update_latency(summary["cd_documents"], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_unknown_or_unavailable_methods_are_refused(tiny_d2l, tmp_path):
    documents = plan_documents(qa_records(), 1)
    with pytest.raises(ValueError, match="unknown methods"):
        run_comparison(tiny_d2l.base, tiny_d2l, documents, ["d2l", "rag"], tmp_path, settings={}, progress=False)
    with pytest.raises(ValueError, match="need a trained D2L"):
        run_comparison(tiny_d2l.base, None, documents, ["d2l_control"], tmp_path, settings={}, progress=False)


def test_evaluator_reports_student_control_and_the_base_models_bounds(tiny_d2l, tmp_path):
    data = {"version": "1.1", "data": [
        {"title": title, "paragraphs": [{"context": context, "qas": [
            {"id": f"{title}{i}{j}", "question": q, "answers": [{"text": a, "answer_start": max(context.find(a), 0)} for a in answers]}
            for j, (q, answers) in enumerate(qas)]}]}
        for i, (title, context, qas) in enumerate(PARAGRAPHS)]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    evaluator = QAEvaluator(tiny_d2l.base, str(path), split="all", questions=2, max_new_tokens=4)
    keys = lambda methods: {f"eval/{m}_{k}{end}" for m in methods for k in ("f1", "gold_log_likelihood") for end in ("", "_low", "_high")}
    assert set(evaluator.baseline()) == keys(("no_document", "in_context")) | {"eval/questions"}
    metrics = evaluator(tiny_d2l)
    assert set(metrics) == keys(("d2l", "d2l_control", "d2l_minus_control")) | {"eval/questions"}
    assert all(np.isfinite(v) for v in metrics.values())
    questions = sum(len(d.questions) for d in evaluator.documents)
    assert metrics["eval/questions"] == questions >= 2
    for name in ("d2l", "d2l_control", "d2l_minus_control"):
        for metric in ("f1", "gold_log_likelihood"):
            key = f"eval/{name}_{metric}"
            assert metrics[f"{key}_low"] <= metrics[key] <= metrics[f"{key}_high"], key
    lead = metrics["eval/d2l_gold_log_likelihood"] - metrics["eval/d2l_control_gold_log_likelihood"]
    np.testing.assert_allclose(metrics["eval/d2l_minus_control_gold_log_likelihood"], lead, rtol=1e-9, atol=1e-12)
    sentences = QAEvaluator(tiny_d2l.base, str(path), split="all", questions=5, max_new_tokens=4, context="answer_sentence")
    assert {d.context for d in sentences.documents} == {
        "The vault of the old bank in Lisbon opens with the code 4817.", "Lisbon lies on the Tagus river.",
        "Its trams are yellow and climb steep hills.", PARAGRAPHS[2][1], PARAGRAPHS[3][1],
    }


def test_an_earlier_runs_base_model_records_join_only_on_the_same_plan():
    def record(method, document, ids, variant=None):
        return {"method": method, "variant": variant or method, "document": document, "questions": [{"id": i} for i in ids]}

    identity = {"data": "squad.json", "seed": 0, "checkpoint": "runs/b", "step": 20}
    ours = [record("d2l", 0, ["a", "b"]), record("d2l_control", 0, ["a", "b"]), record("cd_oracle", 0, ["a", "b"], "cd_oracle@2")]
    earlier_records = [
        record("d2l", 0, ["a", "b"]),
        record("no_document", 0, ["a", "b"]),
        record("in_context", 0, ["a", "b"]),
        record("cd_oracle", 0, ["a", "b"], "cd_oracle@2"),
        record("cd_oracle", 0, ["a", "b"], "cd_oracle@300"),
    ]
    earlier = {"identity": {**identity, "checkpoint": "runs/a", "step": 10}, "records": earlier_records}
    joined = qa_methods.joined_base_records(earlier, identity, ours)
    assert [r["variant"] for r in joined] == ["no_document", "in_context", "cd_oracle@300"]
    with pytest.raises(ValueError, match="seed is 1 there, 0 here"):
        qa_methods.joined_base_records({**earlier, "identity": {**identity, "seed": 1}}, identity, ours)
    with pytest.raises(ValueError, match="document 0 holds other questions"):
        qa_methods.joined_base_records({**earlier, "records": [record("no_document", 0, ["a", "c"])]}, identity, ours)
