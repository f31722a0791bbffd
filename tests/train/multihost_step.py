"""Run as a script: a few train steps of the tiny config on 8 CPU devices, as one process or as one of
several processes on loopback (gloo collectives), each feeding its own rows as a host does in training.

    python multihost_step.py --processes=1 --out=single.json
    python multihost_step.py --processes=2 --process_id=0 --port=PORT --checkpoint=DIR --out=p0.json   (and process 1)

Writes JSON: the per-step losses and the final hypernetwork parameters' checksums; with ``--checkpoint``
every process takes part in saving the final state there (Orbax), and with ``--restore`` the final state
is compared with the one restored from that directory (after ``--wait_for`` appears).
"""

import argparse
import json
import os
import sys
import time

DEVICES = 8
STEPS = 3

parser = argparse.ArgumentParser()
parser.add_argument("--processes", type=int, default=1)
parser.add_argument("--process_id", type=int, default=0)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--checkpoint", default=None)
parser.add_argument("--restore", default=None)
parser.add_argument("--wait_for", default=None, help="before restoring, wait until this file exists")
parser.add_argument("--out", required=True)
args = parser.parse_args()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.train import simulated_devices  # noqa: E402

simulated_devices.configure(DEVICES // args.processes)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", DEVICES // args.processes)
if args.processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.processes, process_id=args.process_id
    )

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from d2l_jax import sharding  # noqa: E402
from d2l_jax.models.decoder import Decoder  # noqa: E402
from d2l_jax.train.checkpoint import Checkpointer  # noqa: E402
from d2l_jax.train.config import TrainConfig  # noqa: E402
from d2l_jax.train.step import Trainer  # noqa: E402
from tests.train.conftest import BASE, HYPER, random_batch  # noqa: E402

IDENTITY = {"name": "tiny", "architecture": {}, "fingerprint": 0.0}
REPLICATED = None  # the mesh's replicated sharding, set in main


def checksums(params) -> list[float]:
    """Per-leaf sums of the (replicated) hypernetwork parameters, gathered where every process can read them."""
    sums = jax.jit(lambda p: jnp.stack([jnp.sum(x) for x in jax.tree.leaves(p)]), out_shardings=REPLICATED)(params)
    return [float(s) for s in np.asarray(sums)]


def covered(batch_sharding, size: int) -> list[int]:
    """Indices along the batch axis that this process's devices hold (in order)."""
    slices = batch_sharding.addressable_devices_indices_map((1, size)).values()
    return sorted({i for index in slices for i in range(*index[1].indices(size))})


def process_part(batch: dict, batch_sharding) -> dict:
    """This process's rows of a global batch, laid out as its own data pipeline would collate them: its
    contexts' chunk rows, with ``chunk_document`` counting its own rows (padding chunks = its row count)."""
    if jax.process_count() == 1:
        return batch
    rows = covered(batch_sharding, batch["tokens"].shape[1])
    chunks = covered(batch_sharding, batch["ctx_tokens"].shape[1])
    part = {k: v[:, chunks] if k.startswith(("ctx_", "chunk_")) else v[:, rows] for k, v in batch.items()}
    local_row = {g: i for i, g in enumerate(rows)}
    assert all(int(g) in local_row or g == batch["tokens"].shape[1] for g in part["chunk_document"].ravel())
    part["chunk_document"] = np.vectorize(lambda g: local_row.get(int(g), len(rows)))(part["chunk_document"]).astype(np.int32)
    return part


def main():
    assert jax.device_count() == DEVICES and jax.process_count() == args.processes
    train = TrainConfig(loss="top_k_kl", batch_size=8, warmup_steps=0, steps=10, learning_rate=1e-2)
    # FSDP over all 8 devices: every process holds (and checkpoints) its own shards of the parameters.
    trainer = Trainer(HYPER, BASE, train, mesh=sharding.make_mesh({"fsdp": 8}))
    global REPLICATED
    REPLICATED = trainer.replicated
    tokens = jnp.zeros((1, 4), jnp.int32)
    # The same host values on every process (as each host loads the same weights), placed on the global mesh.
    base_params = jax.device_get(nn.unbox(Decoder(BASE).init(jax.random.key(1), tokens, tokens, tokens + 1))["params"])
    base = trainer.put_base_params(base_params)
    state = trainer.init_state()
    losses = []
    for step in range(STEPS):
        batch = random_batch(seed=10 + step, micro_batches=train.grad_accum_steps, rows=train.batch_size)
        state, metrics = trainer.step(state, base, trainer.put_batch(process_part(batch, trainer.batch_sharding)))
        losses.append(float(metrics["loss"]))
    out = {"losses": losses, "checksums": checksums(state.params), "process_count": jax.process_count()}
    if args.checkpoint:
        checkpoints = Checkpointer(args.checkpoint, async_save=False)
        checkpoints.save(STEPS, state, {"steps": STEPS}, IDENTITY, force=True)
        checkpoints.wait()
        checkpoints.close()
    if args.restore:
        for _ in range(6000):  # the writers finish their save before writing their output file
            if args.wait_for is None or os.path.exists(args.wait_for):
                break
            time.sleep(0.1)
        restored, step = Checkpointer(args.restore).restore(trainer.abstract_state(), IDENTITY)
        out["restored_step"] = step
        out["restored_checksums"] = checksums(restored.params)
        difference = jax.jit(
            lambda a, b: jnp.max(jnp.stack([jnp.max(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])),
            out_shardings=REPLICATED,
        )
        out["restored_max_abs_difference"] = float(np.asarray(difference(restored.params, state.params)))
    with open(args.out + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(args.out + ".tmp", args.out)  # complete when it appears


if __name__ == "__main__":
    main()
