"""QA sets as records: every format read with all its gold answers, format detection, malformed files refused
naming the file and the record, the validation split by held-out groups, and the ``qa`` training source."""

import gzip
import hashlib
import json
import re

import datasets
import pytest

from d2l_jax.data.chunking import document_affixes
from d2l_jax.data.examples import EXTRA_QUERIES, BatchShapes, TrainExampleBuilder
from d2l_jax.data.pipeline import record_problem, training_batches
from d2l_jax.data.qa_sets import (
    CLOSED_QA_TEMPLATE,
    KEYED_NEEDLE,
    KEYED_QUESTION,
    NEEDLE_KEYS,
    VALIDATION_SHARES,
    QASource,
    answer_kind,
    answer_sentence,
    closed_qa_prompt,
    contexts,
    is_held_out,
    keyed_needles,
    paired_questions,
    load_qa,
    read_qa,
    split_records,
    swap_answers,
)
from d2l_jax.data.sources import SourceConfig, make_sources

RECORD_KEYS = ["context", "prompt", "response", "answers", "id", "group"]


def qa(question, *answers, id=None):
    entry = {"question": question, "answers": [{"text": a, "answer_start": 0} for a in answers]}
    return entry if id is None else dict(entry, id=id)


def squad(*articles):
    return {"version": "1.1", "data": [{"title": t, "paragraphs": [{"context": c, "qas": q} for c, q in ps]} for t, ps in articles]}


SQUAD = squad(
    ("Lisbon", [("The vault is in Lisbon.", [qa("Where is the vault?", "Lisbon", "in Lisbon", "Lisbon", id="q1")]),
                ("Ada wrote it.", [qa("Who wrote it?", "Ada", id="q2"), qa("What did Ada do?", "wrote it", id="q3")])]),
    ("Codes", [("The vault code is 4817.", [qa("What is the vault code?", "4817", id="q4")]),
               ("The vault is in Lisbon.", [qa("Which city?", "Lisbon", id="q5")])]),  # a context seen before
)
ROPES = {"version": "1.0", "data": [{"title": "ropes", "paragraphs": [
    {"background": "Heat melts ice.", "situation": "Tom heats ice A.",
     "qas": [{"question": "Which ice melts?", "id": "r1", "answers": [{"text": "ice A"}]}]},
    {"background": "Heat melts ice.", "situation": "Ann cools ice B.",
     "qas": [{"question": "Does ice B melt?", "id": "r2", "answers": [{"text": "no"}]}]},
    {"background": "Salt lowers the melting point.", "situation": "Road X is salted.",
     "qas": [{"question": "Which road thaws first?", "id": "r3", "answers": [{"text": "Road X"}]}]},
]}]}
DROP = [
    {"section_id": "nfl_1", "query_id": "d1", "passage": "The Lions scored 3 field goals.", "question": "How many field goals?",
     "answers_spans": {"spans": ["3", "three", "3"], "types": ["number", "span", "number"]}},
    {"section_id": "nfl_2", "query_id": "d2", "passage": "Ada ran 40 yards.", "question": "Who ran?",
     "answers_spans": {"spans": ["Ada"], "types": ["span"]}},
    {"section_id": "nfl_1", "query_id": "d3", "passage": "The Lions scored 3 field goals.", "question": "Who scored?",
     "answers_spans": {"spans": ["The Lions"], "types": ["span"]}},
]
LONGBENCH = [
    {"context": "A long paper about vaults.", "input": "What is it about?", "answers": ["vaults", "vault"], "_id": "lb1", "length": 5},
    {"context": "A long paper about codes.", "input": "What is it about?", "answers": ["codes"], "_id": "lb2", "length": 5},
]
GENERIC = [
    {"context": "The vault code is 4817.", "prompt": "What is the vault code?", "response": "4817", "answers": ["4817", "four eight one seven"], "id": 7},
    {"context": "Ada wrote it.", "prompt": "Who wrote it?", "response": "Ada", "answers": ["Ada Lovelace"], "id": 8},
]


def write_json(path, value):
    path.write_text(json.dumps(value))
    return path


def write_jsonl(path, rows, gap=""):
    path.write_text("".join(json.dumps(r) + "\n" + gap for r in rows))
    return path


def digest(text):
    return hashlib.sha1(text.encode()).hexdigest()[:12]


@pytest.mark.parametrize("name", ["squad.json", "squad.json.gz"])
def test_squad_keeps_every_answer_grouped_by_context(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            json.dump(SQUAD, f)
    else:
        write_json(path, SQUAD)
    records = load_qa(path)
    assert [r["id"] for r in records] == ["q1", "q5", "q2", "q3", "q4"]  # q5's context first appears with q1
    assert records[0] == {
        "context": "The vault is in Lisbon.", "prompt": "Where is the vault?", "response": "Lisbon",
        "answers": ["Lisbon", "in Lisbon"], "id": "q1", "group": "Lisbon",
    }
    assert [r["group"] for r in records] == ["Lisbon", "Lisbon", "Lisbon", "Lisbon", "Codes"]  # a context keeps one group
    assert all(list(r) == RECORD_KEYS and record_problem(r) is None for r in records)
    assert [(c, [r["id"] for r in rs]) for c, rs in contexts(records)] == [
        ("The vault is in Lisbon.", ["q1", "q5"]), ("Ada wrote it.", ["q2", "q3"]), ("The vault code is 4817.", ["q4"])
    ]


def test_a_file_datasets_cannot_type_is_read_with_json(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text("\ufeff" + json.dumps(SQUAD), encoding="utf-8")  # datasets refuses the byte-order mark
    assert load_qa(path) == load_qa(write_json(tmp_path / "plain.json", SQUAD))
    rows = [LONGBENCH[0], dict(LONGBENCH[1], answers=[["codes"]])]
    path = write_jsonl(tmp_path / "longbench.jsonl", rows)  # an answer that is a list: datasets fails, json names it
    with pytest.raises(ValueError, match=r"longbench\.jsonl, line 2: answers\[0\] must be a non-empty string, got array \[\'codes\'\]"):
        load_qa(path)


def test_ropes_context_is_background_and_situation(tmp_path):
    records = load_qa(write_json(tmp_path / "ropes.json", ROPES))
    assert [r["context"] for r in records] == ["Heat melts ice.\nTom heats ice A.", "Heat melts ice.\nAnn cools ice B.",
                                               "Salt lowers the melting point.\nRoad X is salted."]
    assert [r["group"] for r in records] == [digest("Heat melts ice.")] * 2 + [digest("Salt lowers the melting point.")]
    first = records[0]
    assert (first["prompt"], first["response"], first["answers"], first["id"]) == ("Which ice melts?", "ice A", ["ice A"], "r1")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_drop_rows_keep_every_span(tmp_path, suffix):
    path = tmp_path / f"drop{suffix}"
    if suffix == ".parquet":
        datasets.Dataset.from_list(DROP).to_parquet(path)
    else:
        write_jsonl(path, DROP)
    records = load_qa(path)
    assert [r["id"] for r in records] == ["d1", "d3", "d2"]  # the passage's questions together
    assert records[0]["answers"] == ["3", "three"] and records[0]["response"] == "3"
    assert [r["group"] for r in records] == ["nfl_1", "nfl_1", "nfl_2"]
    rows = [{k: v for k, v in r.items() if k not in ("section_id", "query_id")} for r in DROP]
    records = load_qa(write_jsonl(tmp_path / "bare.jsonl", rows))
    assert records[0]["group"] == digest(DROP[0]["passage"]) and records[0]["id"] == "record 0"


def test_longbench_and_generic_records(tmp_path):
    records = load_qa(write_jsonl(tmp_path / "longbench.jsonl", LONGBENCH))
    assert records[0] == {"context": "A long paper about vaults.", "prompt": "What is it about?", "response": "vaults",
                          "answers": ["vaults", "vault"], "id": "lb1", "group": digest("A long paper about vaults.")}
    records = load_qa(write_json(tmp_path / "records.json", GENERIC))  # a JSON array of rows
    assert [(r["response"], r["answers"], r["id"]) for r in records] == [
        ("4817", ["4817", "four eight one seven"], "7"), ("Ada", ["Ada", "Ada Lovelace"], "8")
    ]


def test_the_format_is_detected_from_the_content(tmp_path):
    files = {
        "squad": write_json(tmp_path / "a.json", SQUAD),
        "ropes": write_json(tmp_path / "b.json", ROPES),
        "drop": write_jsonl(tmp_path / "c.jsonl", DROP),
        "longbench": write_jsonl(tmp_path / "d.json", LONGBENCH),
        "records": write_jsonl(tmp_path / "e.jsonl", GENERIC, gap="\n"),
    }
    for format, path in files.items():
        assert read_qa(path)[0] == format
        assert read_qa(path, format) == read_qa(path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(files['drop']))}: format 'squad' expects one JSON object"):
        read_qa(files["drop"], "squad")
    with pytest.raises(ValueError, match=r"format 'drop' expects rows .* but the file holds one JSON object"):
        read_qa(files["squad"], "drop")
    path = write_jsonl(tmp_path / "other.jsonl", [{"text": "t", "label": "l"}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: cannot tell the format from the columns \['label', 'text'\]"):
        read_qa(path)
    with pytest.raises(ValueError, match=r"unknown QA format 'nq'"):
        read_qa(path, "nq")
    with pytest.raises(FileNotFoundError, match="absent.json"):
        read_qa(tmp_path / "absent.json")


def squad_with(tmp_path, field, value):
    """The SQuAD fixture with one field of data[1].paragraphs[0].qas[0] replaced (deleted for None)."""
    document = json.loads(json.dumps(SQUAD))
    entry = document["data"][1]["paragraphs"][0]["qas"][0]
    entry.pop(field) if value is None else entry.update({field: value})
    return write_json(tmp_path / "squad.json", document)


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("question", None, r"no 'question'"),
        ("question", 5, r"field 'question' must be a non-empty string, got number 5"),
        ("question", " ", r"field 'question' must be a non-empty string, got string ' '"),
        ("answers", [], r"no answers"),
        ("answers", [{"text": ""}], r"answers\[0\]: field 'text' must be a non-empty string, got string ''"),
        ("answers", "Lisbon", r"field 'answers' must be a list, got string 'Lisbon'"),
    ],
)
def test_a_bad_squad_question_is_named(tmp_path, field, value, problem):
    path = squad_with(tmp_path, field, value)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: data\[1\]\.paragraphs\[0\]\.qas\[0\]: {problem}$"):
        load_qa(path)


def test_a_bad_nested_file_is_named(tmp_path):
    document = json.loads(json.dumps(SQUAD))
    document["data"][0]["paragraphs"][1]["context"] = ""
    path = write_json(tmp_path / "squad.json", document)
    with pytest.raises(ValueError, match=r"squad\.json: data\[0\]\.paragraphs\[1\]: field 'context' must be a non-empty string, got string ''"):
        load_qa(path)
    path.write_text(json.dumps(SQUAD)[:-30])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not valid JSON \(.*, line 1 column \d+\)"):
        load_qa(path)
    write_json(path, {"data": {"title": "x"}})
    with pytest.raises(ValueError, match=r"squad\.json: expected a list of articles in 'data', got object"):
        load_qa(path, "squad")
    document = json.loads(json.dumps(ROPES))
    del document["data"][0]["paragraphs"][2]["situation"]
    with pytest.raises(ValueError, match=r"ropes\.json: data\[0\]\.paragraphs\[2\]: no 'situation'"):
        load_qa(write_json(tmp_path / "ropes.json", document))


def test_a_bad_row_is_named_by_its_line(tmp_path):
    rows = [DROP[0], DROP[1], dict(DROP[2], question=["Who?"])]
    path = write_jsonl(tmp_path / "drop.jsonl", rows, gap="\n")  # blank lines between rows: line 5 is the third row
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}, line 5: field 'question' must be a non-empty string, got array \['Who\?'\]$"):
        load_qa(path)
    write_jsonl(path, [DROP[0], dict(DROP[1], answers_spans={"spans": [], "types": []})])
    with pytest.raises(ValueError, match=r"drop\.jsonl, line 2: no answers \(answers_spans\.spans is empty\)"):
        load_qa(path)
    path.write_text(json.dumps(DROP[0]) + "\n" + json.dumps(DROP[1])[:-5] + "\n")
    with pytest.raises(ValueError, match=r"drop\.jsonl, line 2: not valid JSON"):
        load_qa(path)
    path.write_text(json.dumps(LONGBENCH[0]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"drop\.jsonl, line 2: expected a JSON object \(a record\), got array"):
        load_qa(path)
    write_jsonl(path, [LONGBENCH[0], dict(LONGBENCH[1], context="caf\ud800")])
    with pytest.raises(ValueError, match=r"line 2: field 'context' is not valid Unicode text: character 3"):
        load_qa(path)


def test_a_bad_parquet_row_is_named_by_its_number(tmp_path):
    path = tmp_path / "records.parquet"
    datasets.Dataset.from_list([GENERIC[0], dict(GENERIC[1], response="")]).to_parquet(path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}, record 1: field 'response' must be a non-empty string, got string ''$"):
        load_qa(path)


def test_reading_leaves_no_cache_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "user_cache")
    write_json(tmp_path / "squad.json", SQUAD)
    assert load_qa(tmp_path / "squad.json") == load_qa(tmp_path / "squad.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["squad.json"]


ARTICLES = [
    (f"Article_{a}", [(f"Paragraph {a}.{p}.", [qa(f"Question {a}.{p}.{q}?", "answer") for q in range(2)]) for p in range(2)])
    for a in range(40)
]


def test_the_split_holds_out_whole_groups(tmp_path):
    records = load_qa(write_json(tmp_path / "squad.json", squad(*ARTICLES)))
    train, validation = split_records(records, "train", 0.25), split_records(records, "validation", 0.25)
    held = sorted({r["group"] for r in validation})
    # Pinned: the split is the same on every machine and Python version.
    assert held == ["Article_17", "Article_19", "Article_23", "Article_24", "Article_27", "Article_3", "Article_34", "Article_39", "Article_9"]
    assert held == sorted(f"Article_{a}" for a in range(40) if is_held_out(f"Article_{a}", 0.25))
    assert len(validation) == 9 * 4 and len(train) + len(validation) == len(records) == 160
    assert sorted(r["id"] for r in train + validation) == sorted(r["id"] for r in records)  # each record once
    assert not {r["context"] for r in train} & {r["context"] for r in validation}
    assert not {r["group"] for r in train} & set(held)
    assert split_records(records, "all", 0.25) == records
    assert split_records(records, "validation", 0.0) == [] and split_records(records, "train", 1.0) == []
    with pytest.raises(ValueError, match=r"split='test'; expected one of \('train', 'validation', 'all'\)"):
        split_records(records, "test", 0.25)
    with pytest.raises(ValueError, match=r"validation_share=1\.5 must be a share in \[0, 1\]"):
        split_records(records, "train", 1.5)


def test_the_qa_source_serves_templated_prompts(tmp_path):
    path = write_json(tmp_path / "squad.json", squad(*ARTICLES))
    [train] = make_sources(SourceConfig("qa", {"path": str(path)}), tokenizer=None, seed=0)
    assert isinstance(train, QASource) and train.format == "squad" and train.validation_share == VALIDATION_SHARES["squad"]
    [validation] = make_sources(SourceConfig("qa", {"path": str(path), "split": "validation", "validation_share": 0.25}), None, 0)
    assert len(validation) == 36 and len(train) + len(split_records(load_qa(path), "validation", VALIDATION_SHARES["squad"])) == 160
    record = validation[0]
    assert record["prompt"] == CLOSED_QA_TEMPLATE.format(question="Question 3.0.0?") == closed_qa_prompt("Question 3.0.0?")
    assert record["prompt"].startswith("Answer the following question. Output only the answer") and record_problem(record) is None
    assert repr(validation) == f"QASource({str(path)!r}, format='squad', split='validation', context='passage', queries_per_context=1)"
    [raw] = make_sources(SourceConfig("qa", {"path": str(path), "template": "none", "split": "all"}), None, 0)
    assert raw[0]["prompt"] == "Question 0.0.0?" and len(raw) == 160
    with pytest.raises(ValueError, match=r"data source 'qa': missing options \[\], unknown options \['shuffle'\]"):
        SourceConfig("qa", {"path": str(path), "shuffle": True})
    with pytest.raises(ValueError, match=r"template='chat'; expected one of \('closed_qa', 'none'\)"):
        QASource(path, template="chat")
    with pytest.raises(ValueError, match=r"squad\.json: the 'validation' split \(validation_share=0\.0\) has no records"):
        QASource(path, split="validation", validation_share=0.0)


PASSAGE = "The vault opened in 1858. Its keeper, Ada Byron, lived in Lisbon! Was it safe? Nobody knows."


@pytest.mark.parametrize(
    "answer, sentence",
    [
        ("1858", "The vault opened in 1858."),
        ("Ada Byron", "Its keeper, Ada Byron, lived in Lisbon!"),
        ("safe", "Was it safe?"),
        ("Nobody", "Nobody knows."),
        ("Lisbon! Was it", "Its keeper, Ada Byron, lived in Lisbon! Was it safe?"),  # an answer across two sentences
        ("Paris", PASSAGE),  # not a span: the whole passage
        ("", PASSAGE),
    ],
)
def test_the_answer_sentence_is_the_passage_sentences_the_answer_overlaps(answer, sentence):
    assert answer_sentence(PASSAGE, answer) == sentence


def test_the_qa_source_can_serve_answer_sentences(tmp_path):
    path = write_json(tmp_path / "squad.json", squad(("Vaults", [(PASSAGE, [qa("Who kept it?", "Ada Byron"), qa("Where?", "Paris")])])))
    [source] = make_sources(SourceConfig("qa", {"path": str(path), "split": "all", "context": "answer_sentence"}), None, 0)
    assert [r["context"] for r in source] == ["Its keeper, Ada Byron, lived in Lisbon!", PASSAGE]
    assert [r["response"] for r in source] == ["Ada Byron", "Paris"] and source[0]["group"] == QASource(path, split="all")[0]["group"]
    both = make_sources(SourceConfig("qa", {"path": str(path), "split": "all", "context": ["answer_sentence", "passage"]}), None, 0)
    assert [s.context for s in both] == ["answer_sentence", "passage"] and both[1][0]["context"] == PASSAGE
    with pytest.raises(ValueError, match=r"context='sentence'; expected one of \('passage', 'answer_sentence', 'answer_swapped', 'keyed_needles'\)"):
        QASource(path, context="sentence")


def test_training_batches_read_a_qa_source(tmp_path, smollm2):
    tok = smollm2.tokenizer
    builder = TrainExampleBuilder(tok, document_affixes(tok), smollm2.stop_token_ids, 64)
    shapes = BatchShapes(max_chunk_len=64, chunks_per_context=1, max_student_len=64, max_labels=8)
    source = QASource(write_jsonl(tmp_path / "drop.jsonl", DROP), split="all")
    batch = next(iter(training_batches([source], builder, shapes, batch_size=2, seed=0)))
    assert batch["tokens"].shape == (1, 2, 64) and batch["label_mask"].sum() > 0
    text = tok.decode(batch["tokens"][0, 0])
    assert "Answer the following question." in text and "Question: " in text


def test_the_qa_source_can_group_a_contexts_questions(tmp_path):
    questions = [qa(f"Question {i}?", f"answer {i}") for i in range(5)]
    path = write_json(tmp_path / "squad.json", squad(("Vaults", [(PASSAGE, questions), ("Another passage.", [qa("Why?", "so")])])))
    [source] = make_sources(SourceConfig("qa", {"path": str(path), "split": "all", "template": "none"}), None, 0, queries_per_context=2)
    assert [(r["context"], r["prompt"], [q["prompt"] for q in r[EXTRA_QUERIES]]) for r in source] == [
        (PASSAGE, "Question 0?", ["Question 1?"]),
        (PASSAGE, "Question 2?", ["Question 3?"]),
        (PASSAGE, "Question 4?", []),
        ("Another passage.", "Why?", []),
    ]
    assert source[1][EXTRA_QUERIES] == [{"prompt": "Question 3?", "response": "answer 3"}] and record_problem(source[0]) is None
    assert record_problem(dict(source[0], extra_queries=[{"prompt": " ", "response": "x"}])) == (
        "extra_queries[0]: field 'prompt' must be a non-empty string, got ' '"
    )
    with pytest.raises(ValueError, match=r"queries_per_context=2: the 'niah' source serves one question per context"):
        make_sources(SourceConfig("niah", {"bins": ((8, 37),)}), None, 0, queries_per_context=2)
    with pytest.raises(ValueError, match=r"queries_per_context=0 must be >= 1"):
        QASource(path, queries_per_context=0)


def test_training_batches_of_grouped_questions_have_a_row_per_question(tmp_path, smollm2):
    tok = smollm2.tokenizer
    builder = TrainExampleBuilder(tok, document_affixes(tok), smollm2.stop_token_ids, 64)
    shapes = BatchShapes(max_chunk_len=64, chunks_per_context=2, max_student_len=64, max_labels=8, queries_per_context=3)
    path = write_json(tmp_path / "squad.json", squad(("Vaults", [(PASSAGE, [qa(f"Question {i}?", "1858") for i in range(7)])])))
    batch = next(iter(training_batches([QASource(path, split="all", queries_per_context=3)], builder, shapes, batch_size=2, seed=0)))
    assert batch["tokens"].shape == (1, 6, 64) and batch["num_chunks"].shape == (1, 2)
    questions = [q for q in range(6) if batch["label_mask"][0, q].sum()]
    assert len(questions) in (4, 6)  # two of the groups of 3, 3 and 1 questions


def swappable_paragraphs():
    """Three paragraphs: number and name answers with donors of their kind, and two answers without (no other
    "other" answer in a paragraph; an answer not in its paragraph)."""
    return [
        ("The vault opened in 1858 in Lisbon.", [qa("When did the vault open?", "1858"), qa("Where is the vault?", "Lisbon")]),
        ("The bridge was finished in 1932 near Porto.", [qa("When was the bridge finished?", "1932"), qa("Near which city?", "Porto")]),
        ("The tower is made of stone.", [qa("What is the tower made of?", "stone"), qa("Who built it?", "nobody knows")]),
    ]


def test_swapped_answers_make_the_answer_depend_on_the_document(tmp_path):
    paragraphs = swappable_paragraphs()
    path = write_json(tmp_path / "squad.json", squad(("Places", paragraphs)))
    original = QASource(path, split="all", template="none")
    swapped = QASource(path, split="all", template="none", context="answer_swapped")
    assert [answer_kind(a) for a in ("1858", "Lisbon", "stone")] == ["number", "name", "other"]
    by_question = {r["prompt"]: r for r in swapped}
    assert set(by_question) == {"When did the vault open?", "Where is the vault?", "When was the bridge finished?", "Near which city?"}
    vault = by_question["When did the vault open?"]
    assert vault["response"] == vault["answers"][0] == "1932" and vault["context"] == "The vault opened in 1932 in Lisbon."
    assert by_question["Near which city?"]["context"] == "The bridge was finished in 1932 near Lisbon."
    for record in swapped:  # the donor answer now stands where the original did, the original is gone
        first = next(r for r in original if r["prompt"] == record["prompt"])
        assert record["response"] in record["context"] and first["response"] not in record["context"]
        assert record["group"] == first["group"]
    assert swap_answers(list(original), seed=0) == swap_answers(list(original), seed=0)


def test_paired_questions_give_each_drawn_question_once_per_context_kind(tmp_path):
    paragraphs = swappable_paragraphs()
    path = write_json(tmp_path / "squad.json", squad(("Places", paragraphs)))
    pairs = paired_questions(path, ("passage", "answer_swapped"), split="all", max_questions=3, seed=1)
    swappable = {closed_qa_prompt(q) for q in ("When did the vault open?", "Where is the vault?", "When was the bridge finished?", "Near which city?")}
    assert len(pairs) == 6
    for original, twin in zip(pairs[::2], pairs[1::2]):
        assert original["id"] == twin["id"] and original["prompt"] == twin["prompt"]
        assert original["prompt"] in swappable
        assert original["response"] in original["context"] and twin["response"] in twin["context"]
        assert original["response"] != twin["response"] and original["context"] != twin["context"]
    # only questions both kinds serve ("Who built it?" has no swapped twin), drawn without repeats
    everything = paired_questions(path, ("passage", "answer_swapped"), split="all")
    assert len({r["id"] for r in everything}) == 4 and "Who built it?" not in str([r["prompt"] for r in everything])
    assert paired_questions(path, ("passage", "answer_swapped"), split="all", max_questions=3, seed=1) == pairs
    with pytest.raises(ValueError, match="distinct kinds"):
        paired_questions(path, ("passage", "passage"), split="all")
    with pytest.raises(ValueError, match="max_questions=0"):
        paired_questions(path, ("passage",), split="all", max_questions=0)


def test_keyed_needles_hide_numbers_in_the_passage_and_ask_for_one_of_them(tmp_path):
    path = write_json(tmp_path / "squad.json", squad(("Places", swappable_paragraphs())))
    original = QASource(path, split="all", template="none")
    keyed = QASource(path, split="all", template="none", context="keyed_needles")
    assert len(keyed) == len(original)
    needle = re.compile(KEYED_NEEDLE.replace("{key}", "(?P<key>[a-z ]+)").replace("{number:04d}", r"(?P<number>\d{4})").replace(".", r"\."))
    for before, record in zip(original, keyed):
        found = {m["key"]: m["number"] for m in needle.finditer(record["context"])}
        assert len(found) == 3 and set(found) <= set(NEEDLE_KEYS) and len(set(found.values())) == 3
        asked = next(key for key in found if record["prompt"] == KEYED_QUESTION.format(key=key))
        assert record["response"] == found[asked] and record["answers"] == [found[asked]]
        assert needle.sub("", record["context"]).split() == before["context"].split()  # the passage, word for word
        assert record["group"] == before["group"] and record["id"] == before["id"]
    assert keyed_needles(list(original), "all", seed=0) == list(keyed) != keyed_needles(list(original), "all", seed=1)
    templated = QASource(path, split="all", context="keyed_needles")
    assert templated[0]["prompt"] == closed_qa_prompt(keyed[0]["prompt"])
    # validation numbers are never those of training
    train, validation = (set(r["response"] for r in keyed_needles(list(original) * 50, split)) for split in ("train", "validation"))
    assert train and validation and not train & validation
    with pytest.raises(ValueError, match="needles=0 must be in"):
        keyed_needles(list(original), "all", needles=0)
