"""Self-generated QA data: parsing a generator's pairs, rounds that see the earlier pairs, the teacher's top-k
targets against the full log-softmax, a resumable parquet file that trains through RecordSource, and the
inputs it reads. Generation is scripted (``generate_replies`` replaced) where the test is about what is
done with replies; the teacher-forced forward always runs on a tiny random model with SmolLM2's tokenizer."""

import dataclasses
import json

import datasets
import jax
import numpy as np
import pytest

from d2l_jax.data import self_gen
from d2l_jax.data.chunking import document_affixes
from d2l_jax.data.examples import BatchShapes, TrainExampleBuilder, collate, sequence_with_labels, student_messages
from d2l_jax.data.pipeline import RecordSource
from d2l_jax.data.self_gen import QAPair, Reply, parse_qa_pairs
from d2l_jax.eval.qa_methods import QADocument, method_updates
from tests.conftest import random_base
from d2l_jax.models.families import DecoderConfig

TINY = DecoderConfig(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
)
DOCS = [
    "The vault code is 4817 and the vault is in Lisbon, near the river.",
    "The garden gate is blue and the garden is in Porto, near the sea.",
    "Ada Lovelace wrote the first program for the Analytical Engine.",
]


@pytest.fixture(scope="module")
def tiny_base(smollm2):
    return random_base(TINY, smollm2, seed=3, weight_scale=8)  # peaked: the top-k are well separated


def encode(base, text):
    return base.tokenizer(text, add_special_tokens=False)["input_ids"]


class ScriptedGenerator:
    """Stands in for ``generate_replies``: answers question-generation prompts with ``questions(prompt,
    call)`` and teacher prompts with ``answer(prompt)``, and records every call."""

    def __init__(self, questions=lambda prompt, call: "", answer=lambda prompt: "An answer."):
        self.questions, self.answer = questions, answer
        self.calls: list[tuple[str, list[str], int]] = []

    def __call__(self, base, prompts, max_new_tokens, top_k=0):
        texts = [base.tokenizer.decode(p) for p in prompts]
        kind = "questions" if self_gen.Q_GEN_SYSTEM_MESSAGE in texts[0] else "teacher"
        self.calls.append((kind, texts, max_new_tokens))
        if kind == "questions":
            return [Reply(encode(base, self.questions(t, len(self.calls))), True) for t in texts]
        return [Reply(encode(base, self.answer(t)), True) for t in texts]

    def count(self, kind):
        return sum(k == kind for k, _, _ in self.calls)


# Parsing ----------------------------------------------------------------------------------------------------


def test_parse_well_formed():
    text = "Question 1: What is the code?\nAnswer 1: 4817\nQuestion 2: Where is the vault?\nAnswer 2: In Lisbon,\nnear the river."
    assert parse_qa_pairs(text) == [("What is the code?", "4817"), ("Where is the vault?", "In Lisbon,\nnear the river.")]
    assert parse_qa_pairs("no pairs here") == [] and parse_qa_pairs("") == []


def test_parse_malformed():
    # A missing answer keeps its question without shifting the later answers onto it (the reference pairs
    # the i-th question with the i-th answer found, so Q1 would get A2).
    assert parse_qa_pairs("Question 1: Who?\nQuestion 2: Where?\nAnswer 2: Porto.") == [("Who?", None), ("Where?", "Porto.")]
    # Text around the pairs, numbering gaps and repeats, markdown emphasis and headings.
    text = (
        "Sure! Here are the pairs.\n\n### **Question 1:** What is the code?\n**Answer 1:** 4817\n\n"
        "Question 7: Where?\nAnswer 3: Lisbon.\n\nI hope these help!\nQuestion: Who?\nAnswer: Ada."
    )
    assert parse_qa_pairs(text) == [("What is the code?", "4817"), ("Where?", "Lisbon."), ("Who?", "Ada.")]
    # A statement under the marker, then another line: the question is the first line.
    assert parse_qa_pairs("### Question 1:\nIt is a church.\nThe building is a church.") == [("It is a church.", None)]
    # An answer with no question before it and an empty question are ignored.
    assert parse_qa_pairs("Answer 1: stray\nQuestion 2:\nAnswer 2: x\nQuestion 3: Why?\nAnswer 3: y") == [("Why?", "y")]
    # A reply that ran out of tokens loses its last pair, which may be cut off.
    cut = 'Question 1: Who?\nAnswer 1: Ada.\nQuestion 2: Who is the composer of the piece "The'
    assert parse_qa_pairs(cut, finished=False) == [("Who?", "Ada.")]
    assert parse_qa_pairs(cut, finished=True)[-1] == ('Who is the composer of the piece "The', None)


def test_answer_overlap():
    assert self_gen.answer_overlap("The vault is in Lisbon.", DOCS[0]) == 1.0
    assert self_gen.answer_overlap("Madrid, Spain", DOCS[0]) == 0.0
    assert self_gen.answer_overlap("...", DOCS[0]) == 0.0


# Question generation ------------------------------------------------------------------------------------------


def test_rounds_see_the_earlier_pairs_and_repeats_are_removed(tiny_base, monkeypatch):
    replies = {
        (0, 1): "Question 1: What is the vault code?\nAnswer 1: 4817\nQuestion 2: Where is the vault?\nAnswer 2: Lisbon.",
        (0, 2): "Question 1: what is the VAULT code\nAnswer 1: again\nQuestion 2: What is near the vault?\nAnswer 2: The river.",
        (2, 1): "".join(f"Question {i}: Question number {i}?\nAnswer {i}: {i}.\n" for i in range(1, 8)),
    }
    script = ScriptedGenerator(questions=lambda prompt, call: replies.get((next(i for i, d in enumerate(DOCS) if d in prompt), call), ""))
    monkeypatch.setattr(self_gen, "generate_replies", script)
    pairs = self_gen.generate_questions(tiny_base, DOCS, rounds=2, batch_size=3, max_new_tokens=77)

    assert [kind for kind, _, _ in script.calls] == ["questions", "questions"]  # one batched call per round
    assert {tokens for _, _, tokens in script.calls} == {77}  # every round has the same budget
    first, second = script.calls[0][1], script.calls[1][1]
    assert all("### Example Question-Answer Pairs ###" not in p for p in first)
    assert all("### Example Question-Answer Pairs ###" in p for p in second)
    assert (
        "Question 1: What is the vault code?\nAnswer 1: 4817\nQuestion 2: Where is the vault?\nAnswer 2: Lisbon.\n\n\n\n### Rules"
        in second[0]
    )
    assert pairs[0] == [("What is the vault code?", "4817"), ("Where is the vault?", "Lisbon."), ("What is near the vault?", "The river.")]
    assert pairs[0][2] == QAPair(question="What is near the vault?", answer="The river.")
    assert pairs[1] == []  # a document without questions keeps its place
    assert [p.question for p in pairs[2]] == [f"Question number {i}?" for i in range(1, 6)]  # at most 5 new per round


def test_a_document_too_long_for_the_window_is_named(tiny_base):
    with pytest.raises(ValueError, match=r"document 1 \('word word.*question round 1.*the model's context is 2048 tokens"):
        self_gen.generate_questions(tiny_base, [DOCS[0], "word " * 3000], max_new_tokens=8)
    with pytest.raises(ValueError, match="document 0 must be a non-empty string"):
        self_gen.generate_questions(tiny_base, ["  "])


def test_generate_replies_reports_whether_a_stop_token_ended_the_reply(tiny_base):
    prompts = [tiny_base.chat_ids(student_messages("Where is the vault?")), tiny_base.chat_ids(student_messages("Who?"))]
    replies = self_gen.generate_replies(tiny_base, prompts, 3)
    assert [tiny_base.tokenizer.decode(r.ids, skip_special_tokens=True) for r in replies] == tiny_base.generate_ids(prompts, 3)
    assert all(len(r.ids) == 3 and not r.finished for r in replies)
    # With the first reply's first token as the stop token, that reply ends at once.
    stopping = dataclasses.replace(tiny_base, stop_token_ids=(replies[0].ids[0],))
    assert self_gen.generate_replies(stopping, prompts[:1], 3) == [Reply([], True)]


# The teacher --------------------------------------------------------------------------------------------------


def test_teacher_top_k_equals_the_full_log_softmax_top_k(tiny_base, monkeypatch):
    records = [{"context": DOCS[0], "prompt": q, "id": i} for i, q in enumerate(["Where?", "Code?", "Near?", "Who?"])]
    canonical = encode(tiny_base, "In Lisbon, near the river.")
    spelled = [t for ch in "Madrid" for t in encode(tiny_base, ch)]  # a tokenisation the tokenizer would not choose
    assert encode(tiny_base, "Madrid") != spelled
    scripted = {"Where?": Reply(canonical, True), "Code?": Reply(spelled, True), "Near?": Reply(canonical, False), "Who?": Reply([], True)}
    monkeypatch.setattr(
        self_gen,
        "generate_replies",
        lambda base, prompts, n, top_k=0: [scripted[base.tokenizer.decode(p).split("\n\n")[-1].split("<")[0]] for p in prompts],
    )
    answered, stats = self_gen.teacher_answers(tiny_base, records, top_k=16, batch_size=4)

    assert stats == self_gen.TeacherStats(asked=4, kept=2, unfinished=1, empty=1, retokenized=1, overlapping=1)
    assert [(r["id"], r["response"]) for r in answered] == [(0, "In Lisbon, near the river."), (1, "Madrid")]
    for record, reply in zip(answered, (canonical, encode(tiny_base, "Madrid"))):
        ids, start, end = sequence_with_labels(
            tiny_base.tokenizer, student_messages(record["prompt"], record["response"], record["context"]), tiny_base.stop_token_ids
        )
        assert ids[start:end] == reply + [tiny_base.stop_token_ids[0]]  # the labels: the reply through end-of-turn
        assert record["teacher_log_probs"].dtype == np.float32 and record["teacher_ids"].dtype == np.int32
        assert record["teacher_log_probs"].shape == record["teacher_ids"].shape == (end - start, 16)
        full = jax.nn.log_softmax(tiny_base.logits(np.array([ids]))[0, start - 1 : end - 1], axis=-1)
        log_probs, top_ids = jax.lax.top_k(full, 16)
        np.testing.assert_allclose(record["teacher_log_probs"], log_probs, atol=1e-4)
        np.testing.assert_array_equal(record["teacher_ids"], top_ids)


def test_teacher_targets_are_the_generated_distributions_where_the_reply_tokenizes_back(tiny_base, monkeypatch):
    """Real greedy replies (each ended by a token the model emits): a reply whose text tokenizes back to its ids keeps
    the distributions it was generated from, which equal the teacher-forced top-k; only the others are
    forwarded again."""
    records = [{"context": doc, "prompt": q} for doc in DOCS for q in ("Where is it?", "What is it?")]
    prompts = [tiny_base.chat_ids(student_messages(r["prompt"], context=r["context"])) for r in records]
    emitted = [r.ids for r in self_gen.generate_replies(tiny_base, prompts, 8)]
    base = dataclasses.replace(tiny_base, stop_token_ids=(*tiny_base.stop_token_ids, *{ids[4] for ids in emitted}))
    forwarded = []
    teacher_forced = self_gen.label_top_k
    monkeypatch.setattr(self_gen, "label_top_k", lambda b, sequences, k: forwarded.append(len(sequences)) or teacher_forced(b, sequences, k))
    answered, stats = self_gen.teacher_answers(base, records, top_k=8, max_new_tokens=8, batch_size=8)

    assert stats.kept - stats.retokenized >= 2 and sum(forwarded) == stats.retokenized
    for record in answered:
        ids, start, end = sequence_with_labels(
            base.tokenizer, student_messages(record["prompt"], record["response"], record["context"]), base.stop_token_ids
        )
        log_probs, top_ids = jax.lax.top_k(jax.nn.log_softmax(base.logits(np.array([ids]))[0, start - 1 : end - 1], axis=-1), 8)
        np.testing.assert_allclose(record["teacher_log_probs"], log_probs, atol=1e-4)
        np.testing.assert_array_equal(record["teacher_ids"], top_ids)


# Files -----------------------------------------------------------------------------------------------------------


def scripted_questions(prompt, call):
    doc = next(d for d in DOCS if d in prompt)
    if "### Example Question-Answer Pairs ###" in prompt:
        return "Question 1: What else does it say?\nAnswer 1: More."
    return f"Question 1: What does the text say about {doc.split()[1]}?\nAnswer 1: {doc}"


def test_resume_skips_finished_parts_and_the_file_trains(tiny_base, monkeypatch, tmp_path):
    out = tmp_path / "qa.parquet"
    crash = ScriptedGenerator(scripted_questions)

    def crashing(base, prompts, n, top_k=0):
        if len(crash.calls) == 4:  # part 0 done (two question rounds, its 4 questions answered 2 at a time), part 1 starting
            raise RuntimeError("interrupted")
        return crash(base, prompts, n)

    monkeypatch.setattr(self_gen, "generate_replies", crashing)
    kwargs = dict(rounds=2, batch_size=2, top_k=4, question_tokens=64, max_new_tokens=32, progress=False)
    with pytest.raises(RuntimeError, match="interrupted"):
        self_gen.generate_qa_file(tiny_base, DOCS, out, **kwargs)
    assert not out.exists() and sorted(p.name for p in self_gen.parts_dir(out).glob("*.parquet")) == ["00000.parquet"]

    resumed = ScriptedGenerator(scripted_questions, answer=lambda prompt: "It is in the text.")
    monkeypatch.setattr(self_gen, "generate_replies", resumed)
    summary = self_gen.generate_qa_file(tiny_base, DOCS, out, **kwargs)
    assert resumed.count("questions") == 2 and resumed.count("teacher") == 1  # only part 1 (one document) ran
    assert summary["documents"] == 3 and summary["pairs_kept"] == 6 and summary["dropped_no_end_of_turn"] == 0
    assert summary["pairs_per_document"] == {"mean": 2.0, "min": 2, "max": 2, "none": 0}
    assert json.loads(out.with_name("qa.parquet.summary.json").read_text())["pairs_kept"] == 6

    again = ScriptedGenerator(scripted_questions)
    monkeypatch.setattr(self_gen, "generate_replies", again)
    self_gen.generate_qa_file(tiny_base, DOCS, out, **kwargs)
    assert again.calls == []
    with pytest.raises(ValueError, match=r"other settings \(differing: \['rounds'\]\)"):
        self_gen.generate_qa_file(tiny_base, DOCS, out, **{**kwargs, "rounds": 3})

    source = RecordSource(out)
    rows = [source[i] for i in range(len(source))]
    assert [r["document_index"] for r in rows] == [0, 0, 1, 1, 2, 2] and [r["context"] for r in rows[::2]] == DOCS
    assert [r["round"] for r in rows] == [0, 1] * 3 and [r["generator_answer"] for r in rows[:2]] == [DOCS[0], "More."]
    assert [r["response"] for r in rows] == ["An answer."] * 4 + ["It is in the text."] * 2
    tokenizer = tiny_base.tokenizer
    builder = TrainExampleBuilder(tokenizer, document_affixes(tokenizer), tiny_base.stop_token_ids, 64, with_teacher=True)
    examples = [builder(r, np.random.default_rng(0)) for r in rows]
    for example in examples:
        assert example["label_end"] - example["label_start"] == len(example["teacher_ids"]) == len(example["teacher_log_probs"])
    shapes = BatchShapes(max_chunk_len=64, chunks_per_context=1, max_student_len=64, max_labels=16, max_teacher_len=96, top_k=4)
    batch = collate(examples, shapes)
    labels = examples[5]["label_end"] - examples[5]["label_start"]
    np.testing.assert_array_equal(batch["teacher_ids"][0, 5, :labels], np.asarray(rows[5]["teacher_ids"]))


def test_teacher_only_file_from_a_records_file(tiny_base, monkeypatch, tmp_path):
    path = tmp_path / "squad.jsonl"
    lines = [
        {"context": DOCS[0], "prompt": "Where?", "answers": ["Lisbon"]},
        {"context": DOCS[1], "prompt": "Colour?"},
        {"context": DOCS[0], "prompt": "Code?"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    records = self_gen.read_records(path)
    assert records == [{"context": r["context"], "prompt": r["prompt"]} for r in lines]
    assert self_gen.read_records(path, max_documents=1) == [records[0], records[2]]
    script = ScriptedGenerator(answer=lambda prompt: "Lisbon.")
    monkeypatch.setattr(self_gen, "generate_replies", script)
    out = tmp_path / "teacher.parquet"
    summary = self_gen.answer_records_file(tiny_base, records, out, batch_size=2, top_k=4, progress=False)
    assert script.count("questions") == 0 and script.count("teacher") == 2
    assert summary["documents"] == 2 and summary["pairs_kept"] == 3
    assert summary["answer_overlap_share"] == pytest.approx(2 / 3)  # "Lisbon." is not in the second document
    source = RecordSource(out)
    assert [source[i]["document_index"] for i in range(3)] == [0, 1, 0]
    assert "generator_answer" not in source[0] and "round" not in source[0]


def test_generated_question_cd_distils_on_four_rounds_of_questions(tiny_base, monkeypatch):
    script = ScriptedGenerator(lambda prompt, call: f"Question 1: Question of round {call}?\nAnswer 1: Answer {call}.")
    monkeypatch.setattr(self_gen, "generate_replies", script)
    update = method_updates(tiny_base, None, ["cd_generated"], cd_steps=1, max_response_tokens=2)["cd_generated"]
    document = QADocument(0, DOCS[0], "a", DOCS[1], ("Where is the vault?",), (("Lisbon",),), ("q0",))
    conditions, details = update(document)
    assert script.count("questions") == 4  # the reference's CD: 4 rounds
    assert [q for q, _ in details["generated"]] == [f"Question of round {i}?" for i in range(1, 5)]
    assert details["steps"] == 1 and len(details["teacher_replies"]) == 4 and conditions[0][0] is not None


# Reading inputs ------------------------------------------------------------------------------------------------


def test_read_documents(tmp_path):
    (tmp_path / "one.txt").write_text("  First document.\n\nSecond paragraph.\n")
    assert self_gen.read_documents(tmp_path / "one.txt") == ["First document.\n\nSecond paragraph."]
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in [("b.txt", "Bee."), ("a.txt", "Ay."), ("c.md", "ignored")]:
        (folder / name).write_text(text)
    assert self_gen.read_documents(folder) == ["Ay.", "Bee."]
    rows = [{"context": "X.", "prompt": "1"}, {"context": "Y.", "prompt": "2"}, {"context": "X.", "prompt": "3"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "r.parquet")
    assert self_gen.read_documents(tmp_path / "r.jsonl") == self_gen.read_documents(tmp_path / "r.parquet") == ["X.", "Y."]
    assert self_gen.read_documents(tmp_path / "r.jsonl", max_documents=1) == ["X."]

    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(ValueError, match="empty.txt"):
        self_gen.read_documents(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"context": "X."}\n{"text": "Y."}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: field 'context'"):
        self_gen.read_documents(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="no column 'prompt'"):
        datasets.Dataset.from_list([{"context": "X."}]).to_parquet(tmp_path / "c.parquet")
        self_gen.read_records(tmp_path / "c.parquet")
    with pytest.raises(FileNotFoundError):
        self_gen.read_documents(tmp_path / "missing.txt")
