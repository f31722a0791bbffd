"""The results file of a resumable evaluation: atomic writes, identity, cell keys."""

import json

import pytest

from d2l_jax.eval.results_store import RESULTS_FILE, ResultsFile, cell_key, read_results, write_results

CELL = dict(kind="niah", method="d2l", lo=8, hi=64, depth=3, seed=0, n=2, split="test", max_new_tokens=16)


def test_cell_key():
    assert cell_key(CELL) == ("niah", "d2l", 8, 64, 3, 0, 2, "test", 16, None)
    assert cell_key(CELL | {"cd_steps": 300, "accuracy": 0.5}) == ("niah", "d2l", 8, 64, 3, 0, 2, "test", 16, 300)
    with pytest.raises(KeyError):
        cell_key({k: v for k, v in CELL.items() if k != "seed"})


def test_read_and_write(tmp_path):
    path = tmp_path / "deep" / RESULTS_FILE
    assert read_results(path) == {"identity": {}, "settings": {}, "records": []}
    data = {"identity": {"step": 3}, "settings": {}, "records": [CELL]}
    write_results(path, data)
    assert read_results(path) == data
    assert [p.name for p in path.parent.iterdir()] == [RESULTS_FILE]  # no temporary file left
    with pytest.raises(TypeError):  # not JSON: the previous file survives, no temporary file is left
        write_results(path, {"records": [object()]})
    assert read_results(path) == data and [p.name for p in path.parent.iterdir()] == [RESULTS_FILE]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_results(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no 'records' list"):
        read_results(tmp_path / "other.json")


def test_results_file_resumes_and_refuses_another_run(tmp_path):
    results = ResultsFile(tmp_path, {"seed": 0}, {"checkpoint": "a"})
    results.add(dict(CELL))
    again = ResultsFile(tmp_path, {"seed": 1}, {"checkpoint": "a", "step": 5})
    assert again.done == {cell_key(CELL)} and again.data["records"] == [CELL]
    assert again.data["identity"] == {"checkpoint": "a", "step": 5} and again.data["settings"] == {"seed": 1}
    with pytest.raises(ValueError, match="another run"):
        ResultsFile(tmp_path, {}, {"checkpoint": "b"})
