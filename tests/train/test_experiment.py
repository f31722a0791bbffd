"""Experiment files: execution sections, named variants, published architectures, the full-size recipes,
and the recorded runs' configs (older layouts included)."""

import dataclasses
import glob
import importlib.util
import json
import os

import flax.linen as nn
import jax
import pytest

from d2l_jax.hypernet.config import HypernetConfig, HypernetExecution
from d2l_jax.hypernet.hypernet import init_hypernet, param_count
from d2l_jax.models.base_model import BaseExecution, base_architecture
from d2l_jax.models.families import PUBLISHED_CONFIGS, published_config
from d2l_jax.train.config import RunConfig, parse_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NIAH_RESULTS = os.path.join(ROOT, "results", "niah_smollm2")


def experiment(name: str, variant: str | None = None) -> dict:
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config() if variant is None else module.get_config(variant)
    return json.loads(config.to_json())


def test_execution_sections_set_dtypes_remat_and_unrolling():
    run = parse_experiment(experiment("main_mistral7b"))
    assert run.base_execution == BaseExecution(param_dtype="bfloat16", dtype="bfloat16", remat_policy="full")
    base = run.base_execution.apply(base_architecture(run.model))
    assert (base.dtype, base.remat_policy, base.num_layers, base.hidden_size) == ("bfloat16", "full", 32, 4096)
    assert run.execution == HypernetExecution(dtype="bfloat16", iterative=True, chunk_group_size=1)
    run = parse_experiment(experiment("niah_smollm2"))
    assert run.base_execution == BaseExecution(param_dtype="bfloat16", scan_unroll=30) and run.base_execution.compute_dtype == "bfloat16"
    assert run.base_execution.apply(base_architecture(run.model)).scan_unroll == 30
    # Without the sections, everything runs as before: float32 weights and matmuls, no remat, loops.
    bare = parse_experiment({k: v for k, v in experiment("niah_smollm2").items() if k not in ("base_execution", "execution")})
    assert (bare.base_execution, bare.execution) == (BaseExecution(), HypernetExecution())
    assert BaseExecution().compute_dtype == "float32"
    with pytest.raises(ValueError, match="base_execution.scan_unroll must be >= 1"):
        BaseExecution(scan_unroll=0)
    with pytest.raises(ValueError, match="base_execution.remat_policy='sometimes'"):
        BaseExecution(remat_policy="sometimes")
    with pytest.raises(ValueError, match="base_execution.param_dtype='float16'"):
        BaseExecution(param_dtype="float16")
    with pytest.raises(ValueError, match="dtype='float16'"):
        HypernetExecution(dtype="float16")
    with pytest.raises(ValueError, match="chunk_group_size must be >= 1"):
        HypernetExecution(chunk_group_size=0)


@pytest.mark.parametrize(
    "name, model, rows_per_step, steps",
    [
        ("main_mistral7b", "mistral-7b-instruct-v0.2", 64, 80_000),
        ("main_smollm2", "smollm2-135m-instruct", 64, 80_000),
        ("main_gemma2", "gemma-2-2b-it", 64, 80_000),
        ("niah_mistral7b", "mistral-7b-instruct-v0.2", 128, 5000),
        ("niah_smollm2_full", "smollm2-135m-instruct", 128, 5000),
    ],
)
def test_full_size_recipes_keep_the_reference_batch(name, model, rows_per_step, steps):
    run = parse_experiment(experiment(name))
    assert run.model == model and run.train.steps == steps
    assert run.train.batch_size * run.train.grad_accum_steps == rows_per_step
    assert run.base_execution.param_dtype == "bfloat16" and run.execution.dtype == "bfloat16"
    assert not any(getattr(run.hypernet, f) != getattr(HypernetConfig(), f) for f in ("adapted_layers", "per_rank_head", "shared_a"))
    context_slots = run.data.chunks_per_context * run.hypernet.max_chunk_len
    if name.startswith("main"):  # one 4096-token context and a 4096-token student row per reference row
        assert (context_slots, run.data.max_student_len, run.train.loss, run.train.teacher) == (4096, 4096, "top_k_kl", "offline")
        assert run.data.source.name == "records" and run.evaluator is None
    else:  # two rows of 2 x 256 context slots per reference row of 1024
        assert (2 * context_slots, run.train.loss, run.train.l1_coef) == (1024, "ce", 2.0)
        assert run.evaluator.name == "niah" and dict(run.evaluator.options) == {"bin": (32, 256), "contexts": 100}


def test_the_gemma2_recipe_is_the_published_hypernetwork():
    """The reference's main configuration on gemma-2-2b-it (reference-facts 9.1): per-layer activations of
    all 26 layers, 8 latents x 9 blocks at width 512, rank-8 down_proj on every layer, 315,237,792 parameters
    (shapes only, nothing allocated)."""
    run = parse_experiment(experiment("main_gemma2"))
    hyper, base = run.hypernet, base_architecture(run.model)
    assert base == published_config("gemma-2-2b-it") and base.num_layers == 26
    assert (hyper.encoder_type, hyper.latent_size, hyper.n_latent_queries, hyper.num_blocks) == ("per_layer_activations", 512, 8, 9)
    assert (hyper.lora_rank, hyper.target_modules, hyper.adapted_layers, hyper.num_pre_head_layers) == (8, ("down_proj",), 0, 1)
    shapes = jax.eval_shape(lambda: init_hypernet(hyper, base, jax.random.key(0)))
    assert param_count(shapes) == 315_237_792
    head = nn.unbox(shapes)["head"]
    assert (head["head"].shape, head["bias_A_down_proj"].shape, head["bias_B_down_proj"].shape) == ((26, 512, 11520), (26, 8, 9216), (26, 8, 2304))


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


def test_the_cpu_preset_is_the_niah_recipe():
    assert parse_experiment(experiment("niah_smollm2")).hypernet == HypernetConfig.niah_cpu()
    with pytest.raises(ValueError, match="unknown variant 'longest'"):
        experiment("niah_smollm2", "longest")


@pytest.mark.parametrize(
    "variant, recorded",
    [
        ("short", "run_perceiver_lr_scale_0.1"),
        ("long", "run_long_chunks256"),
        ("long1024", "run_long_chunks1024"),
        ("long32k", "run_long_32k"),
    ],
)
def test_each_variant_is_the_run_it_recorded(variant, recorded):
    """The stage chain, now one file with named variants, still describes the runs of results/niah_smollm2/
    (their config.json, written before the execution configs and named sources, is read as today's layout)."""
    run = parse_experiment(experiment("niah_smollm2", variant))
    with open(os.path.join(NIAH_RESULTS, recorded, "config.json")) as f:
        saved = RunConfig.from_json(json.load(f))
    assert run.hypernet == saved.hypernet and run.data == saved.data and run.evaluator == saved.evaluator
    assert run.execution.dtype == saved.execution.dtype == "bfloat16"
    differing = {f.name for f in dataclasses.fields(run.train) if getattr(run.train, f.name) != getattr(saved.train, f.name)}
    assert differing <= {"steps"}  # a recorded run may have been cut short by changing its cosine's length
    assert run.eval_every == saved.eval_every and run.checkpoint_every == saved.checkpoint_every


@pytest.mark.parametrize("variant", ["long", "long1024", "long32k"])
def test_long_context_variants_fit_their_documents_and_start_from_the_short_run(variant):
    short = parse_experiment(experiment("niah_smollm2"))
    long = parse_experiment(experiment("niah_smollm2", variant))
    longest = max(hi for _, hi in long.data.source.options["bins"])
    assert long.data.chunks_per_context * long.hypernet.max_chunk_len >= longest + 32  # room for the chat affixes
    assert long.hypernet.max_chunks >= long.data.chunks_per_context
    assert long.data.chunks_per_context * long.train.batch_size % long.train.encoder_chunk_rows == 0
    base = base_architecture(long.model)
    shapes = lambda hyper: jax.tree.map(lambda x: x.shape, jax.eval_shape(lambda: init_hypernet(hyper, base, jax.random.key(0))))
    assert shapes(long.hypernet) == shapes(short.hypernet)  # init_from the short-context run can load it


def test_every_recorded_run_config_reads_and_round_trips():
    paths = glob.glob(os.path.join(ROOT, "results", "**", "config.json"), recursive=True)
    assert len(paths) >= 10
    for path in paths:
        with open(path) as f:
            run = RunConfig.from_json(json.load(f))
        assert RunConfig.from_json(run.to_json()) == run, path


def test_questions_per_context_need_a_source_that_groups_them():
    settings = experiment("niah_smollm2")
    settings["data"]["queries_per_context"] = 2
    with pytest.raises(ValueError, match=r"data.queries_per_context=2 needs sources that group a context's questions \(qa\), not \['niah'\]"):
        parse_experiment(settings)
    settings = experiment("qa_smollm2")
    settings["data"]["queries_per_context"] = 4
    assert parse_experiment(settings).batch_shapes().queries_per_context == 4
