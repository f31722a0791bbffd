"""QA metrics against hand-computed cases, and the per-document evaluation of a method."""

import pytest

from d2l_jax.eval.qa import answer_tokens, evaluate_qa, exact_match, f1_precision_recall, normalize_answer, token_f1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Cat's  HAT!", "cat s hat"),
        ("An apple, a day.", "apple day"),
        ("state-of-the-art", "state of art"),  # hyphens break words, then "the" goes
        ("Theory of another", "theory of another"),  # articles only as whole words
        ("C\\D", "c\\d"),  # the reference's punctuation class misses the backslash
        ("Paris\u2014France", "paris france"),  # em dash -> "-" -> word break
        ("\u201cHello\u201d \u2026", "hello"),  # curly quotes and the ellipsis character are punctuation
        ("zero\u200bwidth", "zerowidth"),  # hidden characters are removed, not turned into breaks
        ("a\u00a0b", "b"),  # no-break space separates words
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_partial_overlap_f1():
    # prediction [quick, brown, fox] vs gold [quick, red, fox]: 2 common, P = R = 2/3.
    assert token_f1("The quick brown fox", "quick red fox!") == pytest.approx(2 / 3)
    f1, precision, recall = f1_precision_recall("Lisbon Portugal", "Lisbon")
    assert (precision, recall) == (0.5, 1.0) and f1 == pytest.approx(2 / 3)


def test_repeated_tokens_count_with_multiplicity():
    # [fox, fox] vs [fox]: one common token, P = 1/2, R = 1, F1 = 2/3.
    assert token_f1("fox fox", "fox") == pytest.approx(2 / 3)
    assert answer_tokens("fox-fox") == ["fox", "fox"]


def test_best_of_several_gold_answers():
    assert token_f1("Paris", ["London", "paris."]) == 1.0
    assert token_f1("in Paris", ["London", "Paris"]) == pytest.approx(2 / 3)
    assert exact_match("Paris", ["London", "PARIS!"]) == 1.0
    assert exact_match("Paris", ["London", "Rome"]) == 0.0


def test_exact_match_after_normalisation_only():
    assert exact_match("The Eiffel Tower!", "eiffel   tower") == 1.0
    assert exact_match("Eiffel Tower in Paris", "Eiffel Tower") == 0.0
    assert token_f1("Eiffel Tower in Paris", "Eiffel Tower") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_empty_answers():
    assert token_f1("", "") == 0.0 and exact_match("", "") == 1.0  # the reference's F1 finds no common token
    assert token_f1("The.", "a") == 0.0 and exact_match("The.", "a") == 1.0  # both normalise to nothing
    assert token_f1("", "4817") == 0.0 and exact_match("", "4817") == 0.0
    assert token_f1("4817", "") == 0.0 and exact_match("4817", "") == 0.0
    assert token_f1("green", "blue") == 0.0
    with pytest.raises(ValueError, match="no gold answers"):
        token_f1("x", [])


def test_evaluate_qa_groups_questions_by_document():
    records = [
        {"context": "doc A", "prompt": "qa1", "response": "red apple"},
        {"context": "doc B", "prompt": "qb1", "response": "blue"},
        {"context": "doc A", "prompt": "qa2", "answers": ["seven", "7"]},
    ]
    calls = []

    def method(document, questions, max_new_tokens):
        calls.append((document, list(questions), max_new_tokens))
        replies = {"qa1": "an apple", "qa2": "7", "qb1": "green"}
        return [replies[q] for q in questions]

    result = evaluate_qa(records, method, max_new_tokens=12, progress=False)
    assert calls == [("doc A", ["qa1", "qa2"], 12), ("doc B", ["qb1"], 12)]
    f1s = [r["f1"] for r in result.records]
    assert f1s == pytest.approx([2 / 3, 0.0, 1.0])
    assert [r["em"] for r in result.records] == [0.0, 0.0, 1.0]
    assert [r["document"] for r in result.records] == [0, 1, 0]
    assert result.records[0]["precision"] == 1.0 and result.records[0]["recall"] == 0.5
    assert result.f1 == pytest.approx((2 / 3 + 1.0) / 3) and result.em == pytest.approx(1 / 3)
    assert result.as_dict()["num_records"] == 3


def test_evaluate_qa_rejects_bad_input():
    records = [{"context": "d", "prompt": "q", "response": "a"}]
    with pytest.raises(ValueError, match="replies"):
        evaluate_qa(records, lambda d, qs, n: [], progress=False)
    with pytest.raises(ValueError, match="lacks"):
        evaluate_qa([{"context": "d", "response": "a"}], lambda d, qs, n: ["x"] * len(qs), progress=False)
