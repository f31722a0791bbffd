"""Sharded train steps on 8 simulated CPU devices equal the single-device step."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from d2l_jax import sharding

SCRIPT = os.path.join(os.path.dirname(__file__), "sharded_step.py")
MESHES = [{"data": 1}, {"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 4, "tensor": 2}]


@pytest.fixture(scope="module")
def results():
    """Every mesh in one process (one simulated-device thread pool beside the other tests, not four)."""
    out = subprocess.run([sys.executable, SCRIPT, *map(json.dumps, MESHES)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    merged = json.loads(out.stdout.strip().splitlines()[-1])
    return {tuple(sorted(json.loads(k).items())): v for k, v in merged.items()}


def relative_error(x, y):
    x, y = np.asarray(x), np.asarray(y)
    return np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)


@pytest.mark.parametrize("mesh", [(("data", 8),), (("data", 2), ("fsdp", 2), ("tensor", 2)), (("fsdp", 4), ("tensor", 2))])
def test_sharded_loss_gradients_and_update_equal_one_device(results, mesh):
    single, sharded = results[(("data", 1),)], results[tuple(sorted(mesh))]
    assert relative_error(sharded["loss"], single["loss"]) <= 1e-5
    for g_sharded, g_single in zip(sharded["grads"], single["grads"], strict=True):
        assert relative_error(g_sharded, g_single) <= 1e-5
    assert relative_error(sharded["step_loss"], single["step_loss"]) <= 1e-5
    for p_sharded, p_single in zip(sharded["params"], single["params"], strict=True):
        assert relative_error(p_sharded, p_single) <= 1e-5


def test_parameters_are_sharded_as_the_rules_say(results):
    # gate_proj kernel [blocks, latent, latent_mlp]: latent -> fsdp, latent_mlp -> tensor.
    blocks, latent, latent_mlp = results[(("data", 8),)]["kernel_shape"]
    assert results[(("data", 8),)]["kernel_shard_shape"] == [blocks, latent, latent_mlp]
    assert results[(("data", 2), ("fsdp", 2), ("tensor", 2))]["kernel_shard_shape"] == [blocks, latent // 2, latent_mlp // 2]
    assert results[(("fsdp", 4), ("tensor", 2))]["kernel_shard_shape"] == [blocks, latent // 4, latent_mlp // 2]
    # Base embedding [vocab, embed]: vocab -> tensor, embed -> fsdp.
    assert results[(("fsdp", 4), ("tensor", 2))]["embedding_shard_shape"] == [256 // 2, 64 // 4]


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="needs 8 devices"):
        sharding.make_mesh({"data": 8}, jax.devices()[:1])
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 1})
