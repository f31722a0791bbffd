"""Pretrained hypernetworks: save/load round trip, the shipped names, and clear errors for bad files."""

import json

import chex
import jax
import numpy as np
import pytest

import d2l_jax
from d2l_jax import pretrained
from d2l_jax.train.checkpoint import CheckpointCorruptError, CheckpointMismatchError
from tests.conftest import random_base, randomized
from tests.hypernet.test_hypernet import TINY_BASE, TINY_EXECUTION, TINY_HYPER

DOCUMENT = "The vault code is 4817 and the vault is in Lisbon, near the river."


def largest_b(lora) -> float:
    return max(float(np.abs(np.asarray(b)).max()) for b in lora.B.values())


@pytest.fixture(scope="module")
def tiny_base(smollm2):
    return random_base(TINY_BASE, smollm2, seed=1)


@pytest.fixture(scope="module")
def d2l(tiny_base):
    return randomized(d2l_jax.D2L.create(tiny_base, TINY_HYPER, seed=0, execution=TINY_EXECUTION), seed=4)


@pytest.fixture
def saved(d2l, tmp_path):
    return d2l.save_pretrained(tmp_path / "tiny-d2l", description="a test hypernetwork")


def test_round_trip_gives_the_same_variables_and_adapter(d2l, saved, tiny_base):
    loaded = d2l_jax.D2L.from_pretrained(saved, base=tiny_base)
    assert loaded.config == d2l.config and loaded.execution == d2l.execution
    chex.assert_trees_all_equal(loaded.params, d2l.params)
    expected, actual = d2l.adapters([DOCUMENT])[0].lora, loaded.adapters([DOCUMENT])[0].lora
    chex.assert_trees_all_equal(actual, expected)
    assert largest_b(expected) > 0  # the adapter is not trivially zero
    config = json.loads((saved / pretrained.CONFIG_FILE).read_text())
    assert config["description"] == "a test hypernetwork" and config["model"] == "tiny"


def test_an_unknown_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match=r"no pretrained hypernetwork 'no-such-model'.*available: ") as error:
        d2l_jax.D2L.from_pretrained("no-such-model")
    for name in pretrained.available():
        assert name in str(error.value)


def test_altered_weights_are_refused(saved, tiny_base):
    weights = saved / pretrained.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=r"model\.safetensors does not match the sha256"):
        d2l_jax.D2L.from_pretrained(saved, base=tiny_base)


def test_a_truncated_config_is_refused(saved, tiny_base):
    config = saved / pretrained.CONFIG_FILE
    config.write_text(config.read_text()[:100])
    with pytest.raises(CheckpointCorruptError, match=r"config\.json: cannot be read as JSON"):
        d2l_jax.D2L.from_pretrained(saved, base=tiny_base)


def test_weights_of_another_shape_are_refused(d2l, saved, tiny_base, tmp_path):
    other = d2l_jax.D2L.create(tiny_base, TINY_HYPER.replace(lora_rank=4), execution=TINY_EXECUTION)
    other.save_pretrained(tmp_path / "other")
    (saved / pretrained.WEIGHTS_FILE).write_bytes((tmp_path / "other" / pretrained.WEIGHTS_FILE).read_bytes())
    config = json.loads((saved / pretrained.CONFIG_FILE).read_text())
    config["sha256"] = json.loads((tmp_path / "other" / pretrained.CONFIG_FILE).read_text())["sha256"]
    (saved / pretrained.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointCorruptError, match=r"has shape .* its config gives"):
        d2l_jax.D2L.from_pretrained(saved, base=tiny_base)


def test_another_base_model_is_refused(saved, smollm2):
    other = random_base(TINY_BASE, smollm2, seed=2)
    with pytest.raises(CheckpointMismatchError, match="was trained on base model 'tiny'"):
        d2l_jax.D2L.from_pretrained(saved, base=other)


@pytest.mark.parametrize("name", pretrained.available())
def test_shipped_hypernetworks_load_and_write_the_document(name, smollm2):
    d2l = d2l_jax.D2L.from_pretrained(name, base=smollm2)
    config = pretrained.read_config(pretrained.PRETRAINED_DIR / name)
    assert config["model"] == smollm2.name and config["description"]
    assert (pretrained.PRETRAINED_DIR / name / pretrained.WEIGHTS_FILE).stat().st_size <= 60e6
    adapter = d2l.internalize(DOCUMENT)
    assert np.isfinite(largest_b(adapter.lora)) and largest_b(adapter.lora) > 0


def test_an_identity_written_before_an_architecture_field_existed_still_matches(d2l, saved, tiny_base):
    config = json.loads((saved / pretrained.CONFIG_FILE).read_text())
    del config["base_identity"]["architecture"]["mlp_activation"]  # a field with its default value
    (saved / pretrained.CONFIG_FILE).write_text(json.dumps(config))
    chex.assert_trees_all_equal(d2l_jax.D2L.from_pretrained(saved, base=tiny_base).params, d2l.params)


def test_float16_weights_load_as_the_rounded_variables(d2l, tiny_base, tmp_path):
    saved = d2l.save_pretrained(tmp_path / "half", weights_dtype="float16")
    full = d2l.save_pretrained(tmp_path / "full")
    assert (saved / pretrained.WEIGHTS_FILE).stat().st_size < 0.6 * (full / pretrained.WEIGHTS_FILE).stat().st_size
    loaded = d2l_jax.D2L.from_pretrained(saved, base=tiny_base)
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), d2l.params)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, loaded.params), rounded)
    with pytest.raises(ValueError, match=r"weights_dtype='bfloat16'; expected one of \('float32', 'float16'\)"):
        d2l.save_pretrained(tmp_path / "other", weights_dtype="bfloat16")
    huge = d2l_jax.D2L(d2l.base, d2l.config, jax.tree.map(lambda x: x * 1e6, d2l.params), d2l.execution)
    with pytest.raises(ValueError, match=r"beyond float16's range; save as float32"):
        huge.save_pretrained(tmp_path / "huge", weights_dtype="float16")
    assert not (tmp_path / "huge").exists() or not any((tmp_path / "huge").iterdir())
