"""NIAH scoring: the first 4-digit number of a reply against the record's response."""

import pytest

from d2l_jax.eval.niah import correct, exact_match, is_correct

RECORDS = [{"response": "0042"}, {"response": "1234"}, {"response": "9999"}]


def test_is_correct_reads_the_first_four_digit_number():
    assert is_correct("The special magic number is 0042.", RECORDS[0])
    assert is_correct("12345 then 1234, not 9999", RECORDS[1])  # a 5-digit run is skipped whole
    assert not is_correct("9999 or maybe 0042", RECORDS[0])  # only the first number counts
    assert not is_correct("I do not know.", RECORDS[2])


def test_correct_and_exact_match():
    replies = ["0042", "It is 1234.", "42"]
    assert correct(replies, RECORDS) == 2
    assert exact_match(replies, RECORDS) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        correct(replies[:2], RECORDS)  # one reply per record
