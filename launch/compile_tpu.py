"""Compiles the meta-training step for a TPU slice on this machine, no TPU needed (needs ``jax[tpu]``).

    python -m launch.compile_tpu --config=experiments/main_mistral7b.py --topology=v5p:2x2x1 \\
        [--mesh=fsdp:4] [--out=report.json] [--config.train.grad_accum_steps=16 ...]

The step is the Trainer's own (same function, logical-axis shardings and donation as training), lowered
with abstract parameters, optimizer state and batch (no weights loaded, nothing allocated) and compiled
by the TPU compiler for the topology. Prints and writes (``--out``) per-device memory against the chip's
HBM, FLOPs per step (compiled cost analysis and the analytic count), the collectives in the compiled
program and the estimated step time at the chip's peak. Train with the same mesh:
``--config.train.mesh="(('fsdp', 4),)"``.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from launch import run

# Compile-only use opens no TPU, so it may share libtpu with other processes (libtpu otherwise takes a
# machine-wide lock on load); set before anything in this process loads it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (ml_collections)", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:2x2, v5e:4x4, v5p:2x2x1, v4:2x2x2", required=True)
_MESH = flags.DEFINE_string("mesh", None, "mesh axis sizes, e.g. data:4,fsdp:4,tensor:1 (default: the config's train.mesh)")
_OUT = flags.DEFINE_string("out", None, "write the JSON report here")


def parse_mesh(text: str) -> dict[str, int]:
    """``"data:4,fsdp:4"`` -> ``{"data": 4, "fsdp": 4}``. Raises ValueError on a malformed entry."""
    shape = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition(":")
        if not size.isdigit():
            raise ValueError(f"--mesh entry {part!r} is not AXIS:SIZE (e.g. fsdp:4)")
        shape[name.strip()] = int(size)
    return shape


def summary(report: dict) -> str:
    memory = report["memory_per_device_bytes"]
    gb = lambda x: f"{x / 1e9:.2f} GB" if x is not None else "?"
    flops = report["flops_per_step"]
    estimate = report["estimate"]
    lines = [
        f"{report['config']} on {report['topology']} ({report['devices']} chips), mesh {report['mesh']}",
        f"  per device: {gb(memory.get('total'))} of {gb(report['chip']['hbm_bytes'])} HBM -> {'fits' if report['fits'] else 'DOES NOT FIT'}",
    ]
    if "arguments" in memory:
        lines.append(
            f"    arguments {gb(memory['arguments'])}, outputs {gb(memory['outputs'])}, aliased {gb(memory['aliased'])}, "
            f"temporaries {gb(memory['temporaries'])}"
        )
        lines.append(f"  FLOPs per step: analytic {flops['analytic'] / 1e12:.1f} TFLOP; compiled (one device, loop bodies once) {flops['compiled_per_device'] / 1e12:.2f} TFLOP")
        lines.append(f"  collectives: {report['collectives']}")
    else:
        lines.append(f"  FLOPs per step: analytic {flops['analytic'] / 1e12:.1f} TFLOP")
    lines.append(
        f"  step at peak {estimate['step_seconds_at_peak']:.2f} s, at 40% MFU {estimate['step_seconds_at_40pct_mfu']:.2f} s; "
        f"{estimate['steps']} steps at 40% MFU: {estimate['hours_for_steps_at_40pct_mfu']:.1f} h"
    )
    return "\n".join(lines)


def main(argv):
    del argv
    from d2l_jax import sharding
    from d2l_jax.models.base_model import base_architecture
    from d2l_jax.train import aot
    from d2l_jax.train.config import parse_experiment

    experiment = parse_experiment(json.loads(_CONFIG.value.to_json()))
    try:
        chip, devices = aot.topology_devices(_TOPOLOGY.value)
        mesh = sharding.make_mesh(parse_mesh(_MESH.value) if _MESH.value else dict(experiment.train.mesh), devices)
    except ValueError as e:  # unknown topology, malformed mesh, or a mesh that does not match the slice
        sys.exit(str(e))
    step = aot.compile_train_step(experiment, base_architecture(experiment.model), mesh)
    report = {
        "config": config_flags.get_config_filename(flags.FLAGS["config"]),
        "overrides": {k: str(v) for k, v in config_flags.get_override_values(flags.FLAGS["config"]).items()},
        "model": experiment.model,
    }
    report.update(aot.compile_report(step, chip, _TOPOLOGY.value, experiment.train.steps))
    print(summary(report))
    text = json.dumps(report, indent=2)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    run(main)
