"""Experiment files: the optional ``base`` section, published architectures, and the full-size recipes."""

import dataclasses
import importlib.util
import json
import os

import pytest

from d2l_jax.models.families import PUBLISHED_CONFIGS, published_config
from d2l_jax.train.experiment import BaseExecution, base_architecture, parse_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def experiment(name: str) -> dict:
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return json.loads(module.get_config().to_json())


def test_base_section_sets_weights_dtype_compute_dtype_and_remat():
    run, execution = parse_experiment(experiment("main_mistral7b"))
    assert execution == BaseExecution(param_dtype="bfloat16", dtype="bfloat16", remat_policy="full")
    base = execution.apply(base_architecture(run.model))
    assert (base.dtype, base.remat_policy, base.num_layers, base.hidden_size) == ("bfloat16", "full", 32, 4096)
    run, execution = parse_experiment(experiment("niah_smollm2"))
    assert execution == BaseExecution(param_dtype="bfloat16", scan_unroll=30) and execution.compute_dtype == "bfloat16"
    assert execution.apply(base_architecture(run.model)).scan_unroll == 30
    # Without the section, the base model runs as before: float32 weights and matmuls, no remat, loops.
    assert parse_experiment({k: v for k, v in experiment("niah_smollm2").items() if k != "base"})[1] == BaseExecution()
    assert BaseExecution().compute_dtype == "float32"
    with pytest.raises(ValueError, match="base.scan_unroll must be >= 1"):
        BaseExecution(scan_unroll=0)
    with pytest.raises(ValueError, match="base.remat_policy='sometimes'"):
        BaseExecution(remat_policy="sometimes")
    with pytest.raises(ValueError, match="base.param_dtype='float16'"):
        BaseExecution(param_dtype="float16")


@pytest.mark.parametrize(
    "name, model, rows_per_step, steps",
    [
        ("main_mistral7b", "mistral-7b-instruct-v0.2", 64, 80_000),
        ("main_smollm2", "smollm2-135m-instruct", 64, 80_000),
        ("niah_mistral7b", "mistral-7b-instruct-v0.2", 128, 5000),
        ("niah_smollm2_full", "smollm2-135m-instruct", 128, 5000),
    ],
)
def test_full_size_recipes_keep_the_reference_batch(name, model, rows_per_step, steps):
    run, execution = parse_experiment(experiment(name))
    assert run.model == model and run.train.steps == steps
    assert run.train.batch_size * run.train.grad_accum_steps == rows_per_step
    assert execution.param_dtype == "bfloat16" and run.hypernet.dtype == "bfloat16"
    context_slots = run.data.chunks_per_context * run.hypernet.max_chunk_len
    if name.startswith("main"):  # one 4096-token context and a 4096-token student row per reference row
        assert (context_slots, run.data.max_student_len, run.train.loss, run.train.teacher) == (4096, 4096, "top_k_kl", "offline")
    else:  # two rows of 2 x 256 context slots per reference row of 1024
        assert (2 * context_slots, run.train.loss, run.train.l1_coef) == (1024, "ce", 2.0)


def test_published_smollm2_shapes_match_the_embedded_gguf():
    from d2l_jax.models.base_model import EmbeddedModelMissingError, embedded_model_path

    try:
        path = embedded_model_path("smollm2-135m-instruct")
    except EmbeddedModelMissingError:
        pytest.skip("the embedded model's wheel is not installed")
    published, from_file = published_config("smollm2-135m-instruct"), base_architecture(path)
    fields = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if k != "rms_norm_eps"}
    assert fields(published) == fields(from_file)
    assert published.rms_norm_eps == pytest.approx(from_file.rms_norm_eps)


def test_unknown_model_names_are_listed():
    with pytest.raises(ValueError, match="mistral-7b-instruct-v0.2"):
        published_config("llama-70b")
    with pytest.raises(ValueError, match="cannot describe base model 'no-such-model'"):
        base_architecture("no-such-model")
    assert set(PUBLISHED_CONFIGS) >= {"mistral-7b-instruct-v0.2", "smollm2-135m-instruct"}


@pytest.mark.parametrize("name", ["niah_smollm2_long", "niah_smollm2_long1024", "niah_smollm2_long32k"])
def test_long_context_recipes_fit_their_documents_and_start_from_the_niah_run(name):
    import jax

    from d2l_jax.hypernet.hypernet import init_hypernet

    short, _ = parse_experiment(experiment("niah_smollm2"))
    long, _ = parse_experiment(experiment(name))
    longest = max(hi for _, hi in long.data.niah_bins)
    assert long.data.chunks_per_context * long.hypernet.max_chunk_len >= longest + 32  # room for the chat affixes
    assert long.hypernet.max_chunks >= long.data.chunks_per_context
    assert long.data.chunks_per_context * long.train.batch_size % long.train.chunk_group_size == 0
    base = base_architecture(long.model)
    shapes = lambda hyper: jax.tree.map(lambda x: x.shape, jax.eval_shape(lambda: init_hypernet(hyper, base, jax.random.key(0))))
    assert shapes(long.hypernet) == shapes(short.hypernet)  # init_from the short-context run can load it
