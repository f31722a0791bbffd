"""Run as a script with 8 simulated CPU devices: loss, gradients and one step on each mesh given as a JSON argument."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.train import simulated_devices  # noqa: E402

simulated_devices.configure(8)

import functools  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from d2l_jax import sharding  # noqa: E402
from d2l_jax.models.decoder import Decoder  # noqa: E402
from d2l_jax.train.config import TrainConfig  # noqa: E402
from d2l_jax.train.step import Trainer, micro_batch_loss  # noqa: E402
from tests.train.conftest import BASE, HYPER, random_batch  # noqa: E402


def run(mesh_shape, base_params, batch):
    devices = jax.devices()[: 1 if mesh_shape == {"data": 1} else 8]
    train = TrainConfig(loss="top_k_kl", batch_size=8, warmup_steps=0, steps=10, learning_rate=1e-3)
    trainer = Trainer(HYPER, BASE, train, mesh=sharding.make_mesh(mesh_shape, devices))
    state = trainer.init_state()
    base = trainer.put_base_params(base_params)
    micro = jax.tree.map(lambda x: x[0], trainer.put_batch(batch))
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(micro_batch_loss, hyper=HYPER, base=BASE, train=train), has_aux=True))
    with sharding.mesh_rules(trainer.mesh):
        (loss, _), grads = grad_fn(state.params, base, micro)
    kernel = state.params["perceiver"]["encoder"]["layers"]["mlp"]["gate_proj"]["kernel"]  # [blocks, latent, latent_mlp]
    kernel_shapes = [list(kernel.shape), list(kernel.addressable_shards[0].data.shape)]
    state, metrics = trainer.step(state, base, trainer.put_batch(batch))
    return {
        "loss": float(loss),
        "grads": [np.asarray(g).tolist() for g in jax.tree.leaves(grads)],
        "step_loss": float(metrics["loss"]),
        "params": [np.asarray(p).tolist() for p in jax.tree.leaves(state.params)],
        "kernel_shape": kernel_shapes[0],
        "kernel_shard_shape": kernel_shapes[1],
        "embedding_shard_shape": list(base["embedding"].addressable_shards[0].data.shape),
    }


def main():
    """Runs the meshes given as JSON arguments, e.g. ``'{"data": 8}'``."""
    meshes = [json.loads(m) for m in sys.argv[1:]]
    tokens = jnp.zeros((1, 4), jnp.int32)
    base_params = nn.unbox(Decoder(BASE).init(jax.random.key(1), tokens, tokens, tokens + 1))["params"]
    batch = random_batch(seed=5, rows=8)
    print(json.dumps({json.dumps(m): run(m, base_params, batch) for m in meshes}))


if __name__ == "__main__":
    main()
