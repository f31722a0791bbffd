"""The NIAH sweep and efficiency drivers with their method functions, results file and figures, and
chunked internalization of long documents, on a tiny random base model with SmolLM2's tokenizer."""

import dataclasses
import json

import chex
import pytest

import d2l_jax
from d2l_jax.data.examples import student_messages
from d2l_jax.eval import plots, sweep
from d2l_jax.eval.efficiency import kv_cache_bytes
from d2l_jax.eval.in_context import truncate_middle
from d2l_jax.eval.niah_methods import METHODS, niah_methods
from d2l_jax.eval.results_store import RESULTS_FILE
from d2l_jax.hypernet.adapter import delta_weights, segmented_adapter
from tests.eval.conftest import TINY_BASE, TINY_HYPER

SHORT, LONG = (8, 64), (520, 600)  # LONG is past the tiny model's 512-token window
SETTINGS = sweep.SweepSettings(bins=(SHORT, LONG), depths=(0, 9), samples_per_cell=2, max_new_tokens=4, batch_size=2)
DOC = "The vault code is 4817 and the vault is in Lisbon, near the river. " * 6


def counting(d2l):
    """SETTINGS' method functions, each counting its calls in the returned dict."""
    methods = niah_methods(
        d2l, SETTINGS.methods, max_new_tokens=SETTINGS.max_new_tokens, batch_size=SETTINGS.batch_size,
        icl_batch_tokens=SETTINGS.icl_batch_tokens, progress=False,
    )
    calls = {name: 0 for name in methods}

    def wrap(name, fn):
        def counted(records):
            calls[name] += 1
            return fn(records)

        return counted

    return {name: wrap(name, fn) for name, fn in methods.items()}, calls


@pytest.fixture(scope="module")
def swept(tiny_d2l, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sweep")
    methods, calls = counting(tiny_d2l)
    records = sweep.run_sweep(tiny_d2l, SETTINGS, workdir, identity={"checkpoint": "tiny"}, methods=methods, progress=False)
    return workdir, records, calls


def by_cell(records):
    return {(r["method"], r["hi"], r["depth"]): r for r in records}


def test_sweep_writes_every_cell(tiny_d2l, swept):
    workdir, records, calls = swept
    assert calls == {"d2l": 4, "icl": 4, "truncated_icl": 4, "base": 4}  # 2 lengths x 2 depths each
    stored = json.loads((workdir / RESULTS_FILE).read_text())
    assert stored["records"] == records and stored["identity"] == {"checkpoint": "tiny"}
    cells = by_cell(records)
    assert len(cells) == len(records) == 16
    assert set(cells) == {(m, hi, d) for m in METHODS for hi in (64, 600) for d in (0, 9)}
    for r in records:
        assert r["kind"] == "niah" and r["seed"] == 0 and r["n"] == 2 and r["lo"] in (8, 520)
        assert r["length"] == r["hi"] and r["split"] == "test" and r["max_new_tokens"] == 4
        assert r["lo"] <= r["context_tokens"] < r["hi"]
        if r["status"] == "ok":
            assert len(r["replies"]) == len(r["responses"]) == 2
            assert r["accuracy"] == r["correct"] / 2 and r["answer_s"] > 0


def test_window_exceeding_icl_cells_are_marked_not_run(swept):
    _, records, _ = swept
    cells = by_cell(records)
    for depth in (0, 9):
        long_icl = cells["icl", 600, depth]
        assert long_icl["status"].startswith("not run: exceeds window 512")
        assert long_icl["accuracy"] is None and long_icl["replies"] is None and long_icl["prompt_tokens"] > 512
        assert cells["icl", 64, depth]["status"] == "ok"
        # Truncated in-context runs everywhere; it only cuts where the window demands it.
        truncated = cells["truncated_icl", 600, depth]
        assert truncated["status"] == "ok" and truncated["truncated"] == 2 and truncated["prompt_tokens"] == 2 * ((512 - 4) // 2)
        assert cells["truncated_icl", 64, depth]["truncated"] == 0
        assert cells["truncated_icl", 64, depth]["replies"] == cells["icl", 64, depth]["replies"]
        assert cells["truncated_icl", 64, depth]["reused_replies"] and "reused_replies" not in cells["icl", 64, depth]
        assert "reused_replies" not in truncated
        # Long documents were internalized in more chunks than the hypernetwork's static max_chunks.
        assert cells["d2l", 600, depth]["chunks"] > TINY_HYPER.max_chunks
        assert cells["d2l", 64, depth]["chunks"] <= TINY_HYPER.max_chunks


def test_resume_skips_finished_cells(tiny_d2l, swept, tmp_path):
    workdir, records, _ = swept
    before = (workdir / RESULTS_FILE).read_text()
    methods, calls = counting(tiny_d2l)
    again = sweep.run_sweep(tiny_d2l, SETTINGS, workdir, identity={"checkpoint": "tiny"}, methods=methods, progress=False)
    assert calls == {"d2l": 0, "icl": 0, "truncated_icl": 0, "base": 0}
    assert again == records
    assert json.loads((workdir / RESULTS_FILE).read_text())["records"] == json.loads(before)["records"]

    # An interrupted sweep: only the long-length cells of d2l and base are missing.
    partial = json.loads(before)
    partial["records"] = [r for r in partial["records"] if not (r["hi"] == 600 and r["method"] in ("d2l", "base"))]
    (tmp_path / RESULTS_FILE).write_text(json.dumps(partial))
    methods, calls = counting(tiny_d2l)
    resumed = sweep.run_sweep(tiny_d2l, SETTINGS, tmp_path, methods=methods, progress=False)
    assert calls == {"d2l": 2, "icl": 0, "truncated_icl": 0, "base": 2}
    assert set(by_cell(resumed)) == set(by_cell(records)) and len(resumed) == 16
    redone = by_cell(resumed)
    for depth in (0, 9):  # greedy decoding of the same records gives the same replies
        assert redone["d2l", 600, depth]["replies"] == by_cell(records)["d2l", 600, depth]["replies"]

    with pytest.raises(ValueError, match="another run"):
        sweep.run_sweep(tiny_d2l, SETTINGS, workdir, identity={"checkpoint": "other"}, methods=methods, progress=False)


def test_plots_are_written(swept):
    workdir, records, _ = swept
    paths = plots.write_plots(records, workdir, window=512, title="tiny")
    names = sorted(p.name for p in paths)
    assert names == sorted([f"niah_heatmap_{m}.png" for m in METHODS] + ["niah_accuracy_by_length.png"])
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_accuracy_is_exact_match_of_the_first_number(tiny_d2l, tmp_path):
    settings = sweep.SweepSettings(bins=(SHORT,), depths=(3,), methods=("d2l", "base"), samples_per_cell=3)
    methods = {
        "d2l": lambda recs: {"replies": [f"The number is {r['response']}." for r in recs]},
        "base": lambda recs: {"replies": ["12345 and then 0000"] * len(recs)},
    }
    records = sweep.run_sweep(tiny_d2l, settings, tmp_path, methods=methods, progress=False)
    cells = by_cell(records)
    assert cells["d2l", 64, 3]["accuracy"] == 1.0 and cells["d2l", 64, 3]["correct"] == 3
    expected = sum(r == "0000" for r in cells["base", 64, 3]["responses"]) / 3
    assert cells["base", 64, 3]["accuracy"] == expected


def test_settings_are_checked():
    with pytest.raises(ValueError, match="methods"):
        sweep.SweepSettings(bins=(SHORT,), methods=("d2l", "rag"))
    with pytest.raises(ValueError, match="depths"):
        sweep.SweepSettings(bins=(SHORT,), depths=(10,))
    with pytest.raises(ValueError, match="lo < hi"):
        sweep.SweepSettings(bins=((64, 8),))
    with pytest.raises(ValueError, match="unknown sweep settings"):
        sweep.SweepSettings.from_dict({"bins": (SHORT,), "sample_per_cell": 2})
    with pytest.raises(ValueError, match="efficiency_methods"):
        sweep.SweepSettings(bins=(SHORT,), efficiency_methods=("rag",))
    with pytest.raises(ValueError, match="cd_steps must be >= 1"):
        sweep.SweepSettings(bins=(SHORT,), cd_steps=0)


@pytest.mark.parametrize("dense_above_rank", [None, 0], ids=["concatenated", "factorised"])
def test_long_internalization_equals_one_pass(tiny_d2l, dense_above_rank):
    roomy = d2l_jax.D2L(tiny_d2l.base, TINY_HYPER.replace(max_chunks=16), tiny_d2l.params, tiny_d2l.execution)
    one_pass = roomy.internalize(DOC, scaler=0.7, bias_scaler=1.3)
    assert one_pass.num_chunks > TINY_HYPER.max_chunks
    tiny_d2l.reset()
    [by_default] = tiny_d2l.adapters([DOC], scaler=0.7, bias_scaler=1.3)  # too long for one pass: segments
    assert tiny_d2l.adapter is None  # the current adapter is not touched
    chunks, tokens = tiny_d2l.document_chunks(DOC)
    base = tiny_d2l.base
    long = segmented_adapter(
        tiny_d2l.config, tiny_d2l.execution, base.config, base.params, tiny_d2l.params, chunks, tokens, 0.7, 1.3,
        segment_chunks=3, dense_above_rank=dense_above_rank,
    )
    d_in, d_out = TINY_BASE.projection_shapes()["down_proj"]
    expected_rank = one_pass.rank if dense_above_rank is None else min(d_in, d_out)
    assert long.rank == expected_rank and long.A["down_proj"].shape[2] >= expected_rank
    ids = base.chat_ids(student_messages("Where is the vault?"))
    for adapter in (long, by_default):
        assert (adapter.num_chunks, adapter.num_tokens) == (one_pass.num_chunks, one_pass.num_tokens)
        chex.assert_trees_all_close(delta_weights(adapter, "down_proj"), delta_weights(one_pass, "down_proj"), rtol=1e-4, atol=1e-6)
        chex.assert_trees_all_close(tiny_d2l.logits([ids], adapter=adapter), roomy.logits([ids], adapter=one_pass), rtol=1e-4, atol=1e-4)


def test_generate_ids_refuses_a_prompt_past_the_window(tiny_d2l):
    with pytest.raises(ValueError, match="context is 512"):
        tiny_d2l.base.generate_ids([[1] * 510], 6)
    with pytest.raises(ValueError, match="no prompts"):
        tiny_d2l.base.generate_ids([], 6)


def test_truncate_middle_keeps_both_ends():
    ids = list(range(20))
    assert truncate_middle(ids, window=12, max_new_tokens=2) == [0, 1, 2, 3, 4, 15, 16, 17, 18, 19]
    assert truncate_middle(ids, window=12, max_new_tokens=3) == [0, 1, 2, 3, 16, 17, 18, 19]
    assert truncate_middle(ids, window=22, max_new_tokens=2) == ids  # fits: unchanged
    # The reference's numbers: 8192 window, 256 new tokens -> the first and last 3968 tokens.
    cut = truncate_middle(list(range(10_000)), window=8192, max_new_tokens=256)
    assert cut[:3968] == list(range(3968)) and cut[3968:] == list(range(10_000 - 3968, 10_000))
    with pytest.raises(ValueError, match="no room"):
        truncate_middle(ids, window=4, max_new_tokens=4)


def test_kv_cache_bytes_by_hand(smollm2):
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, float32: 2 * 30 * 3 * 64 * 4 = 46,080 bytes per token.
    assert kv_cache_bytes(smollm2.config, 8192) == 46_080 * 8192
    assert kv_cache_bytes(TINY_BASE, 10) == 2 * 4 * 2 * 16 * 10 * 4


def test_efficiency_records(tiny_d2l, tmp_path):
    settings = sweep.SweepSettings(bins=(SHORT,), efficiency_bins=(SHORT, LONG), max_new_tokens=4, cd_steps=3)
    records = sweep.run_efficiency(tiny_d2l, settings, tmp_path, progress=False)
    cells = {(r["method"], r["hi"]): r for r in records}
    assert set(cells) == {(m, hi) for m in ("d2l", "cd", "icl") for hi in (64, 600)}
    for (method, hi), r in cells.items():
        assert r["kind"] == "efficiency" and r["lo"] <= r["context_tokens"] < r["hi"]
        if r["status"] == "ok" or method != "cd":
            assert r["kv_cache_bytes"] == kv_cache_bytes(TINY_BASE, r["prompt_tokens"] + 4)
    long_icl = cells["icl", 600]
    assert long_icl["status"].startswith("not run: exceeds window 512") and "answer_s" not in long_icl
    long_cd = cells["cd", 600]
    assert long_cd["status"].startswith("not run: exceeds window 512") and "teacher" in long_cd["status"]
    assert "update_s" not in long_cd and long_cd["cd_steps"] == 3
    for key in [("d2l", 64), ("d2l", 600), ("icl", 64), ("cd", 64)]:
        r = cells[key]
        assert r["status"] == "ok" and r["answer_s"] > 0 and r["answer_program_bytes"] > r["kv_cache_bytes"]
    rank_bytes = TINY_BASE.num_layers * sum(TINY_BASE.projection_shapes()["down_proj"]) * 4  # A and B of every layer
    for hi in (64, 600):
        d2l = cells["d2l", hi]
        assert d2l["internalize_s"] > 0 and d2l["answer_state_bytes"] == d2l["kv_cache_bytes"] + d2l["adapter_bytes"]
        # At the adapter's (bucketed) rank.
        assert d2l["adapter_bytes"] % rank_bytes == 0 and d2l["adapter_bytes"] // rank_bytes >= d2l["adapter_rank"]
    cd = cells["cd", 64]
    assert cd["cd_steps"] == 3 and cd["adapter_rank"] == 8 and cd["adapter_bytes"] == 8 * rank_bytes
    assert cd["update_s"] >= cd["train_s"] > 0 and cd["answer_state_bytes"] == cd["kv_cache_bytes"] + cd["adapter_bytes"]
    assert cd["prompt_tokens"] == cells["d2l", 64]["prompt_tokens"]  # both answer from the question alone
    # The D2L prompt holds only the question; the in-context one the whole document.
    assert cells["d2l", 600]["kv_cache_bytes"] < cells["icl", 600]["kv_cache_bytes"]
    again = sweep.run_efficiency(tiny_d2l, settings, tmp_path, progress=False)
    assert again == records  # resumed: nothing measured twice
    other_budget = dataclasses.replace(settings, cd_steps=2, efficiency_bins=(SHORT,))
    added = sweep.run_efficiency(tiny_d2l, other_budget, tmp_path, progress=False)[len(records) :]
    assert [(r["method"], r["cd_steps"]) for r in added] == [("cd", 2)]  # a new budget is a new cell
    paths = plots.write_plots(records, tmp_path, window=512)
    assert [p.name for p in paths] == ["efficiency_by_length.png"] and paths[0].stat().st_size > 1000
