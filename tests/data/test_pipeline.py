"""RecordSource: JSON Lines and parquet records by index, and errors that name the file and the record."""

import json

import datasets
import pytest

from d2l_jax.data.pipeline import RecordSource

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
    with pytest.raises(ValueError, match=rf"{path}: record 1 lacks \['prompt'\]"):
        RecordSource(path)


def test_optional_fields_stay_absent_where_a_record_lacks_them(tmp_path):
    targets = dict(RECORDS[0], teacher_ids=[[1, 2], [3, 4]], teacher_log_probs=[[-0.5, -1.0], [-0.1, -3.0]])
    source = RecordSource(write_jsonl(tmp_path / "records.jsonl", [targets, RECORDS[1]]))
    assert source[0] == targets and source[1] == RECORDS[1]


def test_a_field_absent_from_every_record_is_missing_from_record_0(tmp_path):
    path = write_jsonl(tmp_path / "records.jsonl", [{"context": "c", "prompt": "p"}] * 2)
    with pytest.raises(ValueError, match=rf"{path}: record 0 lacks \['response'\]"):
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
