"""Needle-in-a-haystack records: layout, depth and length bins, splits, determinism, grain use."""

from __future__ import annotations

import itertools
import pickle
from collections import Counter

import grain
import numpy as np
import pytest

from d2l_jax.data.niah import (
    NEEDLE,
    NIAH_PROMPT,
    NOISE_BLOCK,
    NUM_DEPTH_BINS,
    SPLITS,
    NIAHSource,
    blocks_for_tokens,
    cell_records,
    first_number,
    needle_index_range,
    niah_context,
    niah_record,
    prose_needle_records,
    split_numbers,
)

BINS = [(32, 128), (128, 256), (32, 256)]
# The first numbers of each split, pinned so that the split assignment never changes silently.
PINNED = {
    "train": [9230, 9614, 714, 8040, 3121],
    "val": [5247, 8360, 8038, 208, 6126],
    "test": [6326, 5998, 9585, 9386, 3536],
}


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


def num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_context_layout():
    for num_blocks, needle_index, number in [(1, 0, 7), (5, 0, 42), (5, 4, 9999), (12, 6, 1234)]:
        blocks = niah_context(num_blocks, needle_index, number).split("\n")
        assert len(blocks) == num_blocks
        needles = [i for i, block in enumerate(blocks) if block.startswith("The special magic number is")]
        assert needles == [needle_index]
        assert blocks[needle_index] == f"The special magic number is {number:04d}."
        assert blocks.count(NOISE_BLOCK) == num_blocks - 1
    assert NEEDLE.format(number=42) == "The special magic number is 0042."
    with pytest.raises(ValueError):
        niah_context(3, 3, 1)
    with pytest.raises(ValueError):
        niah_context(3, 0, 10_000)


def test_needle_index_range_formula_and_coverage():
    assert needle_index_range(100, 0) == (0, 9)
    assert needle_index_range(100, 9) == (90, 99)
    assert needle_index_range(15, 1) == (1, 2)  # floor(1.5), ceil(3.0) - 1
    assert needle_index_range(1, 9) == (0, 0)
    for k in range(1, 201):
        ranges = [needle_index_range(k, b) for b in range(NUM_DEPTH_BINS)]
        assert all(0 <= start <= end < k for start, end in ranges)
        assert ranges[0][0] == 0 and ranges[-1][1] == k - 1
        for (_, end), (start, _) in itertools.pairwise(ranges):
            assert start <= end + 1, (k, ranges)  # no gap between neighbouring bins
        covered = set().union(*(range(start, end + 1) for start, end in ranges))
        assert covered == set(range(k))
    with pytest.raises(ValueError):
        needle_index_range(10, NUM_DEPTH_BINS)


def test_blocks_for_tokens_is_the_first_k_at_each_bound(tokenizer):
    for lo, hi in BINS:
        k_min, k_max = blocks_for_tokens(tokenizer, lo, hi)
        length = lambda k: num_tokens(tokenizer, niah_context(k, k - 1, 0))
        assert length(k_min) >= lo and (k_min == 1 or length(k_min - 1) < lo)
        assert length(k_max) >= hi and length(k_max - 1) < hi
    assert blocks_for_tokens(tokenizer, 32, 128) == (2, 6)  # 25 k - 14 tokens for SmolLM2
    assert blocks_for_tokens(tokenizer, 1, 12) == (1, 2)  # the needle alone is 11 tokens
    with pytest.raises(ValueError, match="lo < hi"):
        blocks_for_tokens(tokenizer, 128, 128)
    with pytest.raises(ValueError, match="lo < hi"):
        blocks_for_tokens(tokenizer, 0, 128)
    with pytest.raises(ValueError, match="no context"):
        blocks_for_tokens(tokenizer, 40, 45)  # 2 blocks give 36 tokens, 3 give 61


@pytest.mark.parametrize("lo,hi", BINS)
def test_records_have_the_bins_token_lengths(tokenizer, lo, hi):
    """Asserts exactly lo <= tokens < hi with the needle anywhere and any number. The bound is exact
    for SmolLM2: digits are single tokens and "\\n" is a token of its own, so a context's length
    depends only on its block count (checked against the needle-last, 0000 context below)."""
    source = NIAHSource(tokenizer, "test", lo, hi, num_records=200)
    for record in (source[i] for i in range(len(source))):
        length = num_tokens(tokenizer, record["context"])
        assert lo <= length < hi, record
        k = record["num_blocks"]
        assert length == num_tokens(tokenizer, niah_context(k, k - 1, 0))


def test_records_are_consistent(tokenizer):
    source = NIAHSource(tokenizer, "train", 32, 256, num_records=300)
    for record in (source[i] for i in range(len(source))):
        blocks = record["context"].split("\n")
        assert len(blocks) == record["num_blocks"]
        assert blocks[record["needle_index"]] == NEEDLE.format(number=record["number"])
        assert blocks.count(NOISE_BLOCK) == record["num_blocks"] - 1
        start, end = needle_index_range(record["num_blocks"], record["depth_bin"])
        assert start <= record["needle_index"] <= end
        assert record["prompt"] == NIAH_PROMPT
        assert record["response"] == f"{record['number']:04d}" and len(record["response"]) == 4
        assert first_number(record["context"]) == record["response"]


def test_niah_record():
    record = niah_record(num_blocks=12, depth_bin=5, needle_index=6, number=42)
    assert record == {
        "context": niah_context(12, 6, 42),
        "prompt": NIAH_PROMPT,
        "response": "0042",
        "num_blocks": 12,
        "depth_bin": 5,
        "needle_index": 6,
        "number": 42,
    }
    with pytest.raises(ValueError, match="needle_index"):
        niah_record(num_blocks=3, depth_bin=9, needle_index=3, number=1)


def test_records_are_pinned(tokenizer):
    """Records drawn before NIAHSource and cell_records shared niah_record: they must never change."""
    fields = lambda r: {k: r[k] for k in ("num_blocks", "depth_bin", "needle_index", "number", "response")}
    source = NIAHSource(tokenizer, "train", 32, 128, num_records=10)
    assert fields(source[3]) == {"num_blocks": 2, "depth_bin": 3, "needle_index": 0, "number": 2003, "response": "2003"}
    cell = cell_records(tokenizer, 200, 400, 7, 2, seed=5)
    assert [fields(r) | {"context_tokens": r["context_tokens"]} for r in cell] == [
        {"num_blocks": 11, "depth_bin": 7, "needle_index": 8, "number": 9261, "response": "9261", "context_tokens": 261},
        {"num_blocks": 15, "depth_bin": 7, "needle_index": 11, "number": 3406, "response": "3406", "context_tokens": 361},
    ]
    for r in [source[i] for i in range(len(source))] + cell:  # both built by niah_record
        built = niah_record(r["num_blocks"], r["depth_bin"], r["needle_index"], r["number"])
        assert {k: v for k, v in r.items() if k != "context_tokens"} == built


def test_cell_records_follow_the_bin_and_depth(tokenizer):
    records = cell_records(tokenizer, 200, 400, 7, 4, seed=5)
    assert records == cell_records(tokenizer, 200, 400, 7, 4, seed=5)
    assert len({r["num_blocks"] for r in records}) > 1  # spread over the bin, not all at its low end
    for r in records:
        assert 200 <= r["context_tokens"] < 400 and r["context_tokens"] == num_tokens(tokenizer, r["context"])
        start, end = needle_index_range(r["num_blocks"], 7)
        assert start <= r["needle_index"] <= end and r["depth_bin"] == 7
        assert f"The special magic number is {r['response']}." in r["context"]
        assert r["number"] in split_numbers("test")
    assert records != cell_records(tokenizer, 200, 400, 7, 4, seed=6)
    assert {r["number"] for r in cell_records(tokenizer, 200, 400, 7, 4, seed=5, split="val")} <= set(split_numbers("val").tolist())


def test_depth_bins_and_block_counts_are_spread_evenly(tokenizer):
    source = NIAHSource(tokenizer, "val", 32, 256, num_records=1000)
    k_min, k_max = source.num_blocks_range
    n_k = k_max - k_min
    records = [source[i] for i in range(NUM_DEPTH_BINS * n_k * 3)]
    bins = Counter(r["depth_bin"] for r in records)
    assert bins == {b: n_k * 3 for b in range(NUM_DEPTH_BINS)}
    pairs = Counter((r["depth_bin"], r["num_blocks"]) for r in records)
    assert pairs == {(b, k): 3 for b in range(NUM_DEPTH_BINS) for k in range(k_min, k_max)}
    for m in (1, 2, 7):
        assert Counter(r["depth_bin"] for r in records[: NUM_DEPTH_BINS * m]) == {b: m for b in range(NUM_DEPTH_BINS)}


def test_splits_are_disjoint_and_cover_every_digit_position():
    numbers = {split: split_numbers(split) for split in SPLITS}
    assert [len(numbers[s]) for s in SPLITS] == [9000, 500, 500]
    for a, b in itertools.combinations(SPLITS, 2):
        assert not set(numbers[a].tolist()) & set(numbers[b].tolist())
    assert sorted(np.concatenate(list(numbers.values())).tolist()) == list(range(10_000))
    for split, values in numbers.items():
        digits = np.array([list(f"{n:04d}") for n in values.tolist()])
        for position in range(4):
            assert set(digits[:, position]) == set("0123456789"), (split, position)
    np.testing.assert_array_equal(split_numbers("test"), split_numbers("test"))  # deterministic
    with pytest.raises(ValueError, match="'dev'"):
        split_numbers("dev")


def test_split_numbers_are_pinned():
    """Which numbers training may see must not change silently (e.g. with a NumPy upgrade)."""
    assert {split: split_numbers(split)[:5].tolist() for split in SPLITS} == PINNED


def test_records_stay_in_their_split(tokenizer):
    seen = {}
    for split in SPLITS:
        source = NIAHSource(tokenizer, split, 32, 128, num_records=200)
        seen[split] = {source[i]["number"] for i in range(len(source))}
        assert seen[split] <= set(split_numbers(split).tolist())
    for a, b in itertools.combinations(SPLITS, 2):
        assert not seen[a] & seen[b]


def test_records_are_deterministic(tokenizer):
    a = NIAHSource(tokenizer, "train", 32, 128, num_records=50)
    b = NIAHSource(tokenizer, "train", 32, 128, num_records=50)
    other_seed = NIAHSource(tokenizer, "train", 32, 128, num_records=50, seed=43)
    longer = NIAHSource(tokenizer, "train", 32, 128, num_records=500)
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    assert [a[i] for i in range(50)] == [longer[i] for i in range(50)]  # depends on i, not on len
    assert a[np.int64(7)] == a[7]
    assert [a[i] for i in range(50)] != [other_seed[i] for i in range(50)]
    assert [r["number"] for r in (a[i] for i in range(50))] != [r["number"] for r in (other_seed[i] for i in range(50))]


def test_first_number():
    assert first_number("The special magic number is 0042.") == "0042"
    assert first_number("12345 then 6789") == "6789"
    assert first_number("no digits") is None
    assert first_number("1234.") == "1234"
    assert first_number("123 and 12345") is None
    assert first_number("a1234b") == "1234"


def test_source_errors(tokenizer):
    with pytest.raises(ValueError, match="'dev'"):
        NIAHSource(tokenizer, "dev", 32, 128, num_records=10)
    with pytest.raises(ValueError, match="lo < hi"):
        NIAHSource(tokenizer, "train", 128, 32, num_records=10)
    with pytest.raises(ValueError, match="num_records"):
        NIAHSource(tokenizer, "train", 32, 128, num_records=0)
    source = NIAHSource(tokenizer, "train", 32, 128, num_records=10)
    assert len(source) == 10
    for bad in (10, 11, -1):
        with pytest.raises(IndexError):
            source[bad]


def test_works_as_a_grain_dataset(tokenizer):
    source = NIAHSource(tokenizer, "train", 32, 128, num_records=100)
    shuffled = grain.MapDataset.source(source).shuffle(seed=0)
    record = shuffled[0]
    assert record in [source[i] for i in range(len(source))]
    assert sorted(shuffled[i]["context"] + str(shuffled[i]["depth_bin"]) for i in range(100)) == sorted(
        source[i]["context"] + str(source[i]["depth_bin"]) for i in range(100)
    )

    dataset = grain.MapDataset.source(source).to_iter_dataset()
    iterator = iter(dataset)
    for _ in range(7):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    assert expected == [source[i] for i in range(7, 10)]
    resumed = iter(dataset)
    resumed.set_state(state)
    assert [next(resumed) for _ in range(3)] == expected


def test_source_pickles_without_the_tokenizer(tokenizer):
    source = NIAHSource(tokenizer, "val", 32, 128, num_records=20)
    copy = pickle.loads(pickle.dumps(source))
    assert [copy[i] for i in range(20)] == [source[i] for i in range(20)]
    assert len(pickle.dumps(source)) < 100_000




SENTENCES = [
    ["Paris is the capital of France.", "It lies on the Seine!", "Is it large?", "It has two million people."],
    ["The Nile flows north.", "It ends in the Mediterranean Sea."],
    ["Oxygen was isolated in 1774.", '"Dephlogisticated air," Priestley called it.'],
]
PROSE = [" ".join(sentences) for sentences in SENTENCES]


def test_prose_needles_insert_one_needle_at_a_sentence_boundary():
    records = prose_needle_records(PROSE + PROSE[:1], 3, seed=0)  # a repeated paragraph counts once
    used = []
    for record in records:
        needle = NEEDLE.format(number=record["number"])
        sentences = SENTENCES[PROSE.index(" ".join(record["context"].replace(needle, "").split()))]
        i = record["needle_index"]
        assert record["context"] == " ".join(sentences[:i] + [needle] + sentences[i:])
        assert record["sentences"] == len(sentences) and 0 <= i <= len(sentences)
        assert record["response"] == f"{record['number']:04d}" and record["number"] in set(split_numbers("test"))
        assert record["prompt"] == NIAH_PROMPT
        used.append(sentences)
    assert sorted(map(len, used)) == [2, 2, 4]  # every paragraph once
    assert prose_needle_records(PROSE, 3, seed=0) == prose_needle_records(PROSE, 3, seed=0)


def test_prose_needles_need_enough_paragraphs():
    with pytest.raises(ValueError, match="n=4 prose needles need 4 distinct paragraphs; 3 given"):
        prose_needle_records(PROSE + PROSE, 4, seed=0)
