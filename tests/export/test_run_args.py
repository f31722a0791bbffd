"""The reference run's ``args.yaml`` (one directory above ``checkpoint-<step>/pytorch_model.bin``) fills the
fields its ``pytorch_model.bin`` lacks: ``max_ctx_chunk_len`` -> ``max_chunk_len``, ``max_ctx_chunk_num`` ->
``max_chunks``; explicit keyword arguments win, and a malformed file is named in the error."""

from __future__ import annotations

import pytest

import d2l_jax
from d2l_jax.export import ReferenceFormatError
from d2l_jax.export.reference import (
    OpaqueValue,
    config_changes_from_run_args,
    read_run_args,
    run_args_path,
)
from tests.conftest import randomized
from tests.export.test_reference import TINY, _params_equal, tiny_base  # noqa: F401 (fixture)

# As the reference's train.py writes it (yaml.dump of its argument data classes): str enums carry Python
# tags, which must be read without importing anything; the os.system entry proves nothing runs.
ARGS_YAML = """\
exp_setup: !!python/object/apply:ctx_to_lora.configs.ExperimentSetup
- hyper_lora
lr_scheduler_type: !!python/object/apply:transformers.trainer_utils.SchedulerType
- cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr: 1.0e-07
model_name_or_path: {model}
max_ctx_len: -1
max_ctx_chunk_len: 512
min_ctx_chunk_len: 25
max_ctx_chunk_num: 8
num_chunk_probs:
  '1': 0.5
  '2': 0.125
target_modules:
- down_proj
trap: !!python/object/apply:os.system
- touch {marker}
"""


@pytest.fixture
def run(tiny_base, tmp_path):  # noqa: F811
    """(the checkpoint file in ``run/checkpoint-5/``, the hypernetwork written there)."""
    d2l = randomized(d2l_jax.D2L.create(tiny_base, TINY, seed=2))
    folder = tmp_path / "run" / "checkpoint-5"
    folder.mkdir(parents=True)
    return d2l.save_reference_checkpoint(folder), d2l


def _write_args(run_path, text):
    path = run_path.parent.parent / "args.yaml"
    path.write_text(text)
    return path


def test_args_yaml_fills_the_chunking_fields_and_runs_nothing(run, tiny_base, tmp_path):  # noqa: F811
    path, d2l = run
    marker = tmp_path / "ran"
    args_file = _write_args(path, ARGS_YAML.format(model=tiny_base.name, marker=marker))
    assert run_args_path(path) == args_file
    back = d2l_jax.D2L.from_reference_checkpoint(path, tiny_base)
    assert (back.config.max_chunk_len, back.config.max_chunks) == (512, 8)
    assert back.config == d2l.config.replace(max_chunk_len=512, max_chunks=8)
    _params_equal(d2l.params, back.params)
    args = read_run_args(args_file)
    assert args["exp_setup"] == OpaqueValue("python/object/apply:ctx_to_lora.configs.ExperimentSetup", ["hyper_lora"])
    assert not marker.exists()


def test_explicit_keyword_arguments_win(run, tiny_base, tmp_path):  # noqa: F811
    path, _ = run
    _write_args(path, ARGS_YAML.format(model=tiny_base.name, marker=tmp_path / "ran"))
    back = d2l_jax.D2L.from_reference_checkpoint(path, tiny_base, max_chunk_len=300)
    assert (back.config.max_chunk_len, back.config.max_chunks) == (300, 8)


def test_without_args_yaml_or_outside_a_checkpoint_folder_the_defaults_stay(run, tiny_base, tmp_path):  # noqa: F811
    path, d2l = run
    assert run_args_path(path) is None
    assert d2l_jax.D2L.from_reference_checkpoint(path, tiny_base).config == d2l.config
    # A file not in a checkpoint-<step> folder has no run directory: a stray args.yaml above it is not read,
    # unless named with run_args.
    loose = d2l.save_reference_checkpoint(tmp_path / "loose")
    (tmp_path / "args.yaml").write_text("max_ctx_chunk_len: 256\n")
    assert run_args_path(loose) is None
    assert d2l_jax.D2L.from_reference_checkpoint(loose, tiny_base).config == d2l.config
    named = d2l_jax.D2L.from_reference_checkpoint(loose, tiny_base, run_args=tmp_path / "args.yaml")
    assert named.config == d2l.config.replace(max_chunk_len=256)


def test_a_chunk_length_of_zero_or_less_is_the_context_limit(tiny_base):  # noqa: F811
    base = tiny_base.config
    assert config_changes_from_run_args({"max_ctx_chunk_len": -1, "max_ctx_len": -1}, base) == {"max_chunk_len": base.max_position_embeddings}
    assert config_changes_from_run_args({"max_ctx_chunk_len": -1, "max_ctx_len": 2048}, base) == {"max_chunk_len": 2048}
    assert config_changes_from_run_args({"max_ctx_chunk_len": 1024, "max_ctx_chunk_num": None}, base) == {"max_chunk_len": 1024}
    assert config_changes_from_run_args({"learning_rate": 4e-5}, base) == {}


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_ctx_chunk_len: [512\n", "not a readable args.yaml"),
        ("- max_ctx_chunk_len\n- 512\n", "must be a mapping of argument names"),
        ("max_ctx_chunk_len: big\n", "max_ctx_chunk_len='big' must be an integer"),
        ("max_ctx_chunk_num: 2.5\n", "max_ctx_chunk_num=2.5 must be an integer"),
        ("model_name_or_path: google/gemma-2-2b-it\nmax_ctx_chunk_len: 512\n", "belongs to another run"),
    ],
    ids=["not_yaml", "not_a_mapping", "not_an_integer", "float", "other_base"],
)
def test_a_malformed_args_yaml_is_named(run, tiny_base, text, message):  # noqa: F811
    path, _ = run
    args_file = _write_args(path, text)
    with pytest.raises(ReferenceFormatError, match=message) as error:
        d2l_jax.D2L.from_reference_checkpoint(path, tiny_base)
    assert str(args_file) in str(error.value)
