"""RecordSource: JSON Lines and parquet records by index, validated when read, and errors that name the
file and the line or record. The training stream: bad records skipped and counted (or stopping the run),
and limits on the shares of bad records and dropped examples."""

import json
import logging
import re

import chex
import datasets
import pytest

from d2l_jax.data.chunking import document_affixes
from d2l_jax.data.examples import BatchShapes, TrainExampleBuilder
from d2l_jax.data.pipeline import MIN_RECORDS_FOR_SHARES, RecordSource, RecordStats, record_problem, training_batches

RECORDS = [
    {"context": "The vault code is 4817.", "prompt": "What is the vault code?", "response": "4817", "id": 7},
    {"context": "The vault is in Lisbon.", "prompt": "Where is the vault?", "response": "Lisbon", "id": 8},
    {"context": "Ada wrote it.", "prompt": "Who wrote it?", "response": "Ada", "id": 9},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_records_round_trip(tmp_path, suffix):
    path = tmp_path / f"records{suffix}"
    if suffix == ".parquet":
        datasets.Dataset.from_list(RECORDS).to_parquet(path)
    else:
        write_jsonl(path, RECORDS)
    source = RecordSource(path)
    assert len(source) == 3
    assert [source[i] for i in range(3)] == RECORDS
    assert source[2] == RECORDS[2] and source[0] == RECORDS[0]  # random access, in any order
    assert repr(source) == f"RecordSource({str(path)!r})"


def test_reading_twice_leaves_no_cache_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "user_cache")  # where datasets caches by default
    path = write_jsonl(tmp_path / "records.jsonl", RECORDS)
    assert RecordSource(path)[1] == RecordSource(path)[1] == RECORDS[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_missing_field_names_the_file_and_the_record(tmp_path, suffix):
    records = [RECORDS[0], {"context": "c", "response": "r", "id": 1}, {"context": "c", "id": 2}]
    path = tmp_path / f"records{suffix}"
    if suffix == ".parquet":
        datasets.Dataset.from_list(records).to_parquet(path)
    else:
        write_jsonl(path, records)
    where = f"{path}, line 2" if suffix == ".jsonl" else f"{path}, record 1"  # lines from 1, records from 0
    source = RecordSource(path)  # an unusable record is kept in its place, for the stream's bad-record policy
    assert len(source) == 3 and source[0] == RECORDS[0] and record_problem(source[0]) is None
    assert record_problem(source[1]) == f"{where}: the record lacks ['prompt']"
    assert sorted(source.unusable) == [1, 2]


def test_optional_fields_stay_absent_where_a_record_lacks_them(tmp_path):
    targets = dict(RECORDS[0], teacher_ids=[[1, 2], [3, 4]], teacher_log_probs=[[-0.5, -1.0], [-0.1, -3.0]])
    source = RecordSource(write_jsonl(tmp_path / "records.jsonl", [targets, RECORDS[1]]))
    assert source[0] == targets and source[1] == RECORDS[1]


def test_a_field_absent_from_every_record_is_missing_from_line_1(tmp_path):
    path = write_jsonl(tmp_path / "records.jsonl", [{"context": "c", "prompt": "p"}] * 2)
    with pytest.raises(ValueError, match=rf"no record of {re.escape(str(path))} is usable; the first: .*, line 1: the record lacks \['response'\]"):
        RecordSource(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_file_without_records_is_rejected(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    if suffix == ".parquet":
        datasets.Dataset.from_dict({k: [] for k in ("context", "prompt", "response")}).to_parquet(path)
    else:
        path.write_text("\n")
    with pytest.raises(ValueError, match=rf"{path} has no records"):
        RecordSource(path)


def test_other_suffixes_and_missing_files_are_rejected(tmp_path):
    path = tmp_path / "records.csv"
    path.write_text("context,prompt,response\nc,p,r\n")
    with pytest.raises(ValueError, match=rf"{path}: expected a \.jsonl or \.parquet file"):
        RecordSource(path)
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        RecordSource(tmp_path / "absent.jsonl")


def test_a_malformed_line_is_named_by_its_line_number(tmp_path):
    path = tmp_path / "records.jsonl"
    lines = [json.dumps(RECORDS[0]), "", '{"context": "c", "prompt": "p", "response": ', json.dumps(RECORDS[1])]
    path.write_text("\n".join(lines) + "\n")  # line 3 is cut short; the blank line 2 still counts
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 3: not valid JSON \(Expecting value, column 45\)") as error:
        RecordSource(path)
    assert isinstance(error.value.__cause__, json.JSONDecodeError)


@pytest.mark.parametrize("line, kind", [("[1, 2]", "array"), ('"a record"', "string"), ("null", "null"), ("7", "number")])
def test_a_line_that_is_not_an_object(tmp_path, line, kind):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 2: expected a JSON object \(a record\), got a JSON {kind}"):
        RecordSource(path)


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("context", 5, r"field 'context' must be a non-empty string, got number 5"),
        ("prompt", ["What?"], r"field 'prompt' must be a non-empty string, got array \['What\?'\]"),
        ("response", "", r"field 'response' must be a non-empty string, got ''"),
        ("context", " \n ", r"field 'context' must be a non-empty string, got ' \\n '"),
        ("prompt", "abc\ud800def", r"field 'prompt' is not valid Unicode text: character 3 is '\\ud800', a lone surrogate"),
    ],
)
def test_a_field_that_is_not_a_non_empty_string(tmp_path, field, value, problem):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]) + "\n" + json.dumps(dict(RECORDS[2], **{field: value})) + "\n")
    assert re.match(rf"{re.escape(str(path))}, line 3: {problem}", record_problem(RecordSource(path)[2]))


def test_a_bad_parquet_record_is_named_by_its_number(tmp_path):
    path = tmp_path / "records.parquet"
    datasets.Dataset.from_list([RECORDS[0], RECORDS[1], dict(RECORDS[2], context="")]).to_parquet(path)
    assert record_problem(RecordSource(path)[2]) == f"{path}, record 2: field 'context' must be a non-empty string, got ''"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} has no records or cannot be read as parquet"):
        RecordSource(path)


def test_a_field_of_mixed_types_is_named(tmp_path):
    path = write_jsonl(tmp_path / "records.jsonl", [RECORDS[0], dict(RECORDS[1], id="eight")])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: field 'id' holds values of different types"):
        RecordSource(path)


def test_a_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + b'{"context": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 2: not UTF-8 text"):
        RecordSource(path)


# The training stream on records held in a list (a random-access source like any other).

SHAPES = BatchShapes(max_chunk_len=64, chunks_per_context=1, max_student_len=48, max_labels=8)


@pytest.fixture(scope="module")
def builder(smollm2):
    tok = smollm2.tokenizer
    return TrainExampleBuilder(tok, document_affixes(tok), smollm2.stop_token_ids, 64)


def vault_records(n):
    return [{"context": f"The vault code is {1000 + i}.", "prompt": "What is the vault code?", "response": str(1000 + i)} for i in range(n)]


def test_a_bad_record_is_skipped_counted_and_named_once(builder, caplog):
    records = vault_records(30)
    records[20]["context"] = ""  # past the 16 records probed before the stream starts
    stats = RecordStats()
    iterator = iter(training_batches([records], builder, SHAPES, batch_size=2, seed=1, stats=stats))
    with caplog.at_level(logging.WARNING, logger="d2l_jax.data.pipeline"):
        for _ in range(30):  # 60 good examples: more than two epochs of 29, so the bad record is met twice (this seed)
            next(iterator)
    assert stats.bad == 2 and stats.dropped == 0 and stats.records == 60 + stats.bad
    assert stats.as_metrics() == {"records_read": 62.0, "bad_records": 2.0, "dropped_examples": 0.0}
    warnings = [r.getMessage() for r in caplog.records if "skipped record" in r.getMessage()]
    assert len(warnings) == 1  # once per bad record, named by its index in the source (not its epoch's)
    assert re.match(r"skipped record 20 of \[\{'context': 'The vault code is 1000\.'.*\]: "
                    r"ValueError: field 'context' must be a non-empty string, got '' \(data\.bad_records='skip'\)$", warnings[0])
    state = iterator.get_state()  # skipping keeps the stream checkpointable
    expected = [next(iterator)["tokens"] for _ in range(3)]
    iterator.set_state(state)
    chex.assert_trees_all_equal([next(iterator)["tokens"] for _ in range(3)], expected)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_a_bad_record_of_a_file_follows_the_policy_and_is_named_by_its_line(builder, tmp_path, caplog, policy):
    """The user's probe: a JSON Lines record with an empty context past the first 16 records."""
    records = vault_records(30)
    records[20]["context"] = ""
    path = write_jsonl(tmp_path / "records.jsonl", records)
    stats = RecordStats()
    iterator = iter(training_batches([RecordSource(path)], builder, SHAPES, batch_size=2, seed=1, bad_records=policy, stats=stats))
    if policy == "stop":
        with pytest.raises(ValueError, match=rf"record 20 of RecordSource.* is bad: ValueError: {re.escape(str(path))}, line 21: field 'context'"):
            for _ in range(15):
                next(iterator)
        return
    with caplog.at_level(logging.WARNING, logger="d2l_jax.data.pipeline"):
        for _ in range(15):
            next(iterator)
    assert stats.bad == 1 and stats.records == 30 + stats.bad
    assert any(f"{path}, line 21: field 'context' must be a non-empty string" in r.getMessage() for r in caplog.records)


def test_a_bad_record_stops_the_stream_under_stop(builder):
    records = vault_records(30)
    records[20]["context"] = ""
    iterator = iter(training_batches([records], builder, SHAPES, batch_size=2, seed=1, bad_records="stop"))
    with pytest.raises(ValueError, match=r"record 20 of \[.*\] is bad: ValueError: field 'context' must be a non-empty string, got ''.*data\.bad_records='stop'"):
        for _ in range(15):
            next(iterator)
    records[3]["prompt"] = 7  # among the records probed at once: no stream to start
    with pytest.raises(ValueError, match=r"record 3 of \[.*\] is bad: ValueError: field 'prompt' must be a non-empty string, got number 7"):
        training_batches([records], builder, SHAPES, batch_size=2, bad_records="stop")


def test_a_builder_error_is_a_bad_record(builder):
    class Failing:
        def __call__(self, record, rng):
            if record["response"] == "1020":
                raise ValueError("teacher and student label tokens differ")
            return builder(record, rng)

    stats = RecordStats()
    iterator = iter(training_batches([vault_records(30)], Failing(), SHAPES, batch_size=2, seed=1, stats=stats))
    for _ in range(15):
        next(iterator)
    assert stats.bad == 1


def test_too_many_bad_records_stop_the_run(builder):
    records = vault_records(MIN_RECORDS_FOR_SHARES)
    for i in range(20, MIN_RECORDS_FOR_SHARES, 20):
        records[i]["response"] = " "
    iterator = iter(training_batches([records], builder, SHAPES, batch_size=2, seed=1, max_bad_share=0.02))
    with pytest.raises(ValueError, match=r"4 of the 100 training records read so far were bad and skipped \(4\.0%\), more than data\.max_bad_share=0\.02"):
        for _ in range(MIN_RECORDS_FOR_SHARES):
            next(iterator)


def test_too_many_dropped_examples_stop_the_run(builder):
    records = vault_records(MIN_RECORDS_FOR_SHARES)
    for i, record in enumerate(records):
        if i % 4:  # three in four answers are longer than max_labels
            record["response"] = " ".join(["the code"] * 10)
    stats = RecordStats()
    iterator = iter(training_batches([records], builder, SHAPES, batch_size=2, seed=1, stats=stats))
    with pytest.raises(ValueError, match=r"did not fit the batch shapes and were dropped \(75\.0%\), more than data\.max_dropped_share=0\.5: raise"):
        for _ in range(MIN_RECORDS_FOR_SHARES):
            next(iterator)
    assert stats.records == MIN_RECORDS_FOR_SHARES and stats.dropped == 75
    # The same stream with a limit above the share runs on.
    iterator = iter(training_batches([records], builder, SHAPES, batch_size=2, seed=1, max_dropped_share=0.8))
    for _ in range(MIN_RECORDS_FOR_SHARES // 4):
        next(iterator)


def test_record_stats_judge_shares_only_after_the_minimum_records():
    RecordStats(records=MIN_RECORDS_FOR_SHARES - 1, bad=50, dropped=40).check(0.01, 0.5)  # too few records to judge
    RecordStats(records=MIN_RECORDS_FOR_SHARES, bad=1, dropped=49).check(0.01, 0.5)  # at the limits, not past them
    with pytest.raises(ValueError, match=r"data\.max_bad_share=0\.01"):
        RecordStats(records=MIN_RECORDS_FOR_SHARES, bad=2).check(0.01, 0.5)
    with pytest.raises(ValueError, match=r"50 of the 99 training examples built so far .* data\.max_dropped_share=0\.5"):
        RecordStats(records=MIN_RECORDS_FOR_SHARES, bad=1, dropped=50).check(0.01, 0.5)


def test_bad_stream_arguments_are_rejected(builder):
    with pytest.raises(ValueError, match=r"bad_records='ignore'; expected one of \('skip', 'stop'\)"):
        training_batches([vault_records(4)], builder, SHAPES, batch_size=2, bad_records="ignore")
    with pytest.raises(ValueError, match=r"max_dropped_share=1\.5 must be a share in \[0, 1\]"):
        training_batches([vault_records(4)], builder, SHAPES, batch_size=2, max_dropped_share=1.5)


def test_none_of_the_first_records_can_be_built(builder):
    records = [dict(r, context="") for r in vault_records(20)]
    with pytest.raises(ValueError, match=r"none of the first 16 records of \[.*\] can be built; record 0: ValueError: field 'context'"):
        training_batches([records], builder, SHAPES, batch_size=2)
