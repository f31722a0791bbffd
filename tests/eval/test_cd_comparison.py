"""D2L against oracle context distillation on the same NIAH documents, on a tiny random D2L."""

import numpy as np
import pytest

from d2l_jax.data.examples import student_messages
from d2l_jax.data.niah import cell_records, first_number
from d2l_jax.eval.cd_comparison import compare_with_cd


@pytest.fixture(scope="module")
def records(tiny_d2l):
    return [cell_records(tiny_d2l.base.tokenizer, 32, 64, depth, 1, seed)[0] for seed, depth in enumerate((0, 9))]


def test_every_method_answers_every_document(tiny_d2l, records):
    comparison = compare_with_cd(tiny_d2l, records, [1, 3], max_new_tokens=4, progress=False)
    rows, summary = comparison["rows"], comparison["summary"]
    assert [(r["method"], r["depth"]) for r in rows] == [(m, d) for d in (0, 9) for m in ("d2l", "cd_1", "cd_3")]
    for r in rows:
        assert r["update_seconds"] > 0 and r["peak_memory_gb"] > 0
        assert r["correct"] == (first_number(r["reply"]) == r["response"])
    for r in rows[1:3]:
        assert r["train_seconds"] > 0 and r["update_seconds"] >= r["teacher_seconds"] + r["train_seconds"]
    # D2L's reply is the one its adapter of that document gives, and the session is left without one.
    assert tiny_d2l.adapter is None
    adapter = tiny_d2l.internalize(records[0]["context"])
    tiny_d2l.reset()
    prompt = [student_messages(records[0]["prompt"])]
    assert rows[0]["reply"] == tiny_d2l.base.generate(prompt, max_new_tokens=4, lora=adapter.lora)[0]
    assert rows[0]["reply"] != tiny_d2l.base.generate(prompt, max_new_tokens=4)[0]
    assert set(summary) == {"d2l", "cd_1", "cd_3"}
    assert [summary[m].get("cd_steps") for m in ("d2l", "cd_1", "cd_3")] == [None, 1, 3]
    for method, s in summary.items():
        mine = [r for r in rows if r["method"] == method]
        assert s["accuracy"] == np.mean([r["correct"] for r in mine])
        assert s["update_seconds"] == np.median([r["update_seconds"] for r in mine])


def test_bad_arguments(tiny_d2l, records):
    with pytest.raises(ValueError, match="records is empty"):
        compare_with_cd(tiny_d2l, [], [1], progress=False)
    with pytest.raises(ValueError, match="budgets"):
        compare_with_cd(tiny_d2l, records, [0], progress=False)
