"""QA metrics against hand-computed cases, and the per-document evaluation of a method."""

import pytest

from d2l_jax.eval.qa import answer_tokens, exact_match, f1_precision_recall, normalize_answer, score_reply, token_f1


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


def test_score_reply_takes_the_best_gold_answer():
    scores = score_reply("an apple", ["red apple", "apple"])
    assert scores == {"f1": 1.0, "precision": 1.0, "recall": 1.0, "em": 1.0}
    scores = score_reply("a red fruit", ["red apple", "seven"])
    assert scores["f1"] == pytest.approx(0.5) and scores["precision"] == 0.5 and scores["recall"] == 0.5 and scores["em"] == 0.0
