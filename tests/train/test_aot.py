"""Ahead-of-time compilation of the real train step for a TPU slice (no TPU: compile-only devices from libtpu)."""

import collections
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from d2l_jax.train import aot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu: pip install -e '.[tpu]'")


def run_script(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def compiled():
    out = run_script(os.path.join(ROOT, "tests", "train", "aot_step.py"))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_libtpu
def test_sharded_parameter_holds_its_share_on_each_device(compiled):
    assert compiled["device_kind"] == "TPU v5 lite"
    assert compiled["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    # Perceiver MLP kernel [blocks, latent, latent_mlp]: latent -> fsdp, latent_mlp -> tensor.
    assert compiled["kernel_spec"] == [None, "fsdp", "tensor"]
    shards = math.prod(compiled["mesh"][axis] for axis in ("fsdp", "tensor"))
    total = math.prod(compiled["kernel_shape"]) * compiled["kernel_itemsize"]
    per_device = math.prod(compiled["kernel_shard_shape"]) * compiled["kernel_itemsize"]
    assert per_device == total // shards
    # The compiled per-device program takes the shard, never the whole kernel: gate and up projections,
    # each as parameter, Adam mu and Adam nu.
    entry = collections.Counter(compiled["entry_parameter_shapes"])
    assert entry["f32[{}]".format(",".join(map(str, compiled["kernel_shard_shape"])))] == 6
    assert entry["f32[{}]".format(",".join(map(str, compiled["kernel_shape"])))] == 0


@needs_libtpu
def test_report_has_memory_flops_and_collectives(compiled):
    report = compiled["report"]
    memory, inputs, totals = report["memory_per_device_bytes"], report["inputs_per_device_bytes"], report["inputs_total_bytes"]
    # The compiler's per-device arguments are the shards (plus TPU layout padding), not the global arrays.
    assert sum(inputs.values()) <= memory["arguments"] < sum(totals.values())
    assert inputs["hypernet_params"] < totals["hypernet_params"] and inputs["base_params"] < totals["base_params"]
    assert memory["aliased"] > 0  # the donated state is updated in place
    assert memory["total"] == memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
    assert report["fits"] and memory["total"] < report["chip"]["hbm_bytes"]
    assert report["base"] == {"param_dtype": "bfloat16", "compute_dtype": "bfloat16", "remat_policy": "full", "params": report["base"]["params"]}
    assert report["flops_per_step"]["analytic"] > 0 and report["flops_per_step"]["compiled_per_device"] > 0
    assert set(report["collectives"]) == set(aot.COLLECTIVES)
    assert report["collectives"]["all-gather"] > 0  # FSDP gathers parameters before use
    estimate = report["estimate"]
    assert estimate["step_seconds_at_peak"] == pytest.approx(report["flops_per_step"]["analytic"] / (4 * 197e12))


def test_unknown_topologies_are_rejected_with_the_accepted_names():
    for name in ("v9z:2x2", "v5e-16", "v5e:2x2x2", "v5p:2x2"):
        with pytest.raises(aot.UnknownTopologyError, match="v5e:4x4"):
            aot.parse_topology(name)
    chip, dims = aot.parse_topology("v5p:2x2x1")
    assert (chip.generation, dims, chip.hbm_bytes) == ("v5p", (2, 2, 1), 95e9)


def test_command_line_names_the_accepted_topologies():
    out = run_script("-m", "launch.compile_tpu", "--config=experiments/main_smollm2.py", "--topology=v5x:2x2", timeout=300)
    assert out.returncode != 0
    assert "unknown TPU topology 'v5x:2x2'" in out.stderr and "v5p:2x2x1" in out.stderr


def test_count_collectives_and_hbm_message():
    hlo = (
        "  %a = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={}\n"
        "  %b = (f32[4]{0}, f32[8]{0}) all-gather-start(f32[4]{0} %y)\n"
        "  %c = f32[8]{0} all-gather-done(%b)\n"
        "  %d = f32[4]{0} collective-permute(f32[4]{0} %z)\n"
    )
    assert aot.count_collectives(hlo) == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 0, "all-to-all": 0, "collective-permute": 1}
    used, capacity = aot.hbm_exceeded_bytes("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.5G of 15.75G hbm.")
    assert (used, capacity) == (20.5 * 2**30, 15.75 * 2**30)
    message = "RESOURCE_EXHAUSTED: the total memory required for HLO temporaries (15.91G) exceeds available HBM (15.75G)."
    assert aot.hbm_exceeded_bytes(message) == (15.91 * 2**30, 15.75 * 2**30)
    assert aot.hbm_exceeded_bytes("INTERNAL: something else") is None
