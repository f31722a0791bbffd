"""Run as a script (needs libtpu): compiles the tiny config's train step for a v5e:2x2 slice and prints JSON."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no TPU is opened, libtpu may be shared

from d2l_jax import sharding  # noqa: E402
from d2l_jax.train import aot  # noqa: E402
from d2l_jax.data.sources import SourceConfig  # noqa: E402
from d2l_jax.models.base_model import BaseExecution  # noqa: E402
from d2l_jax.train.config import DataConfig, RunConfig, TrainConfig  # noqa: E402
from tests.train.conftest import BASE, HYPER  # noqa: E402

TOPOLOGY = "v5e:2x2"


def main():
    chip, devices = aot.topology_devices(TOPOLOGY)
    run = RunConfig(
        model="tiny",
        hypernet=HYPER,
        train=TrainConfig(loss="top_k_kl", teacher="offline", batch_size=4, grad_accum_steps=2, warmup_steps=0, steps=10),
        data=DataConfig(SourceConfig("niah", {"bins": ((32, 256),)}), chunks_per_context=2, max_student_len=12, max_labels=3),
        base_execution=BaseExecution(param_dtype="bfloat16", remat_policy="full"),
    )
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, devices)
    step = aot.compile_train_step(run, BASE, mesh)
    report = aot.compile_report(step, chip, TOPOLOGY, run.train.steps)
    # The Perceiver MLP kernel [blocks, latent, latent_mlp]: latent -> fsdp, latent_mlp -> tensor.
    kernel = step.state.params["perceiver"]["encoder"]["layers"]["mlp"]["gate_proj"]["kernel"]
    compiled_sharding = step.compiled.input_shardings[0][0].params["perceiver"]["encoder"]["layers"]["mlp"]["gate_proj"]["kernel"]
    spec = [part if part is None or isinstance(part, str) else list(part) for part in compiled_sharding.spec]
    print(json.dumps({
        "report": report,
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "kernel_shape": list(kernel.shape),
        "kernel_itemsize": kernel.dtype.itemsize,
        "kernel_spec": spec,
        "kernel_shard_shape": list(compiled_sharding.shard_shape(kernel.shape)),
        "entry_parameter_shapes": aot.entry_parameter_shapes(step.compiled.as_text()),
    }))

if __name__ == "__main__":
    main()
