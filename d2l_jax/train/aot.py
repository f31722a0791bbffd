"""Ahead-of-time compilation of the meta-training step for a TPU topology, on a machine without a TPU.

With ``libtpu`` installed, ``jax.experimental.topologies`` describes a TPU slice as compile-only devices.
The Trainer's own jitted step (same function, shardings and donation as in training) is lowered with
``jax.ShapeDtypeStruct`` arguments on a mesh of those devices and compiled by the TPU compiler: no
weights are loaded and nothing is allocated. The compiled program reports its per-device memory and
cost, which is what :func:`compile_report` collects.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax

from d2l_jax.hypernet.hypernet import param_count
from d2l_jax.models.families import DecoderConfig
from d2l_jax.train.config import RunConfig
from d2l_jax.train.flops import train_step_flops
from d2l_jax.train.step import Trainer, abstract_batch

MFU_FOR_ESTIMATES = 0.4


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures of a TPU generation (bf16 peak, HBM capacity and bandwidth)."""

    generation: str
    peak_bf16_flops: float  # FLOP/s per chip
    hbm_bytes: float
    hbm_bytes_per_second: float
    source: str
    dims: int  # 2 for 2D-torus generations (AxB), 3 for 3D (AxBxC)
    chip_config: str | None = None  # libtpu chip configuration: one JAX device per chip


CHIPS = {
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOP/s (bf16), 32 GiB HBM2 at 1200 GB/s. Two TensorCores
    # per chip, used as one "megacore" device, as JAX does on v4 VMs.
    "v4": Chip("v4", 275e12, 32 * 2**30, 1200e9, "https://cloud.google.com/tpu/docs/v4", 3, "megacore"),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s (bf16), 16 GB HBM2 at 819 GB/s.
    "v5e": Chip("v5e", 197e12, 16e9, 819e9, "https://cloud.google.com/tpu/docs/v5e", 2),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s (bf16), 95 GB HBM2e at 2765 GB/s.
    "v5p": Chip("v5p", 459e12, 95e9, 2765e9, "https://cloud.google.com/tpu/docs/v5p", 3),
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOP/s (bf16), 32 GB HBM at 1638 GB/s.
    "v6e": Chip("v6e", 918e12, 32e9, 1638e9, "https://cloud.google.com/tpu/docs/v6e", 2),
}
TOPOLOGY_EXAMPLES = ("v5e:2x2", "v5e:2x4", "v5e:4x4", "v5p:2x2x1", "v5p:2x2x2", "v4:2x2x1", "v4:2x2x2", "v6e:2x2", "v6e:4x4")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# TPU compile errors when the program does not fit, e.g. "Used 20.31G of 15.75G hbm. Exceeded hbm capacity
# by 4.56G." or "the total memory required for HLO temporaries (15.91G) exceeds available HBM (15.75G)".
_HBM_EXCEEDED = (
    re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"),
    re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class UnknownTopologyError(ValueError):
    """The topology name is not ``<generation>:<AxB[xC]>`` for a known TPU generation."""


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
    """``"v5e:4x4"`` -> (its Chip, (4, 4)). Raises UnknownTopologyError listing accepted names."""
    accepted = f"accepted generations: {sorted(CHIPS)}; examples: {', '.join(TOPOLOGY_EXAMPLES)}"
    match = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", name.strip())
    if not match or match.group(1) not in CHIPS:
        raise UnknownTopologyError(f"unknown TPU topology {name!r}; {accepted}")
    chip = CHIPS[match.group(1)]
    dims = tuple(int(d) for d in match.group(2).split("x"))
    if len(dims) != chip.dims or min(dims) < 1:
        raise UnknownTopologyError(f"{chip.generation} slices are {'x'.join(['N'] * chip.dims)} chips, got {name!r}; {accepted}")
    return chip, dims


def topology_devices(name: str) -> tuple[Chip, list]:
    """The compile-only devices of a TPU slice (one per chip). Needs ``libtpu`` (``pip install 'jax[tpu]'``)."""
    chip, _ = parse_topology(name)
    from jax.experimental import topologies

    options = {"chip_config_name": chip.chip_config} if chip.chip_config else {}
    try:
        description = topologies.get_topology_desc(platform="tpu", topology_name=name, **options)
    except Exception as e:  # libtpu missing, or a shape it rejects
        raise UnknownTopologyError(
            f"the TPU compiler rejected topology {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
            f"examples of accepted names: {', '.join(TOPOLOGY_EXAMPLES)}; libtpu must be installed: pip install 'jax[tpu]'"
        ) from e
    return chip, list(description.devices)


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard, unpadded)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _total_bytes(tree) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How many times each collective appears in a compiled HLO module (static count: an op inside a
    loop body is counted once; asynchronous ops are counted by their ``-start``)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for op in re.findall(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo_text):
        counts[op] += 1
    return counts


def entry_parameter_shapes(hlo_text: str) -> list[str]:
    """The per-device shapes of the compiled program's parameters (``"f32[2,16,64]"``), from its ENTRY line."""
    entry = next((line for line in hlo_text.splitlines() if line.startswith("ENTRY")), "")
    signature = entry[entry.find("(") + 1 : entry.rfind("->")]
    return re.findall(r"\w+\[[\d,]*\]", signature)


def hbm_exceeded_bytes(message: str) -> tuple[float, float] | None:
    """(required, available) bytes from the TPU compiler's out-of-memory message, or None."""
    match = next((m for m in (p.search(message) for p in _HBM_EXCEEDED) if m), None)
    if not match:
        return None
    used, used_unit, cap, cap_unit = match.groups()
    return float(used) * _UNITS[used_unit], float(cap) * _UNITS[cap_unit]


@dataclasses.dataclass
class CompiledStep:
    trainer: Trainer
    state: Any
    base_params: Any
    batch: dict
    compiled: Any | None
    compile_seconds: float
    error: str | None = None


def compile_train_step(run: RunConfig, base: DecoderConfig, mesh: jax.sharding.Mesh) -> CompiledStep:
    """Lowers and compiles the Trainer's step for ``mesh`` (of compile-only devices) from abstract arguments,
    with the base model and hypernetwork executed as ``run`` says.

    A program the compiler rejects for memory comes back with ``compiled=None`` and the compiler's message
    in ``error``; other compile errors are raised.
    """
    trainer = Trainer(run.hypernet, run.base_execution.apply(base), run.train, mesh=mesh, execution=run.execution)
    state = trainer.abstract_state()
    base_params = trainer.abstract_base_params(run.base_execution.param_dtype)
    batch = abstract_batch(run, trainer.batch_sharding)
    start = time.perf_counter()
    try:
        compiled = trainer.compile(state, base_params, batch)
        error = None
    except Exception as e:
        if hbm_exceeded_bytes(str(e)) is None and "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled, error = None, str(e)
    return CompiledStep(trainer, state, base_params, batch, compiled, time.perf_counter() - start, error)


def compile_report(step: CompiledStep, chip: Chip, topology: str, steps: int) -> dict[str, Any]:
    """The JSON-able report of a compiled step: per-device memory against the chip's HBM, FLOPs, collectives,
    and step-time estimates at the chip's peak (``steps`` optimizer steps for the run-time line)."""
    trainer, run_shapes = step.trainer, step.batch
    mesh = trainer.mesh
    devices = mesh.devices.size
    micro, rows = run_shapes["tokens"].shape[:2]
    inputs = {
        "hypernet_params": _per_device_bytes(step.state.params),
        "optimizer_state": _per_device_bytes(step.state.opt_state),
        "base_params": _per_device_bytes(step.base_params),
        "batch": _per_device_bytes(step.batch),
    }
    analytic = train_step_flops(trainer.hyper, trainer.base, trainer.train, step.batch)
    at_peak = analytic / (devices * chip.peak_bf16_flops)
    report: dict[str, Any] = {
        "topology": topology,
        "chip": {
            "generation": chip.generation,
            "peak_bf16_flops": chip.peak_bf16_flops,
            "hbm_bytes": chip.hbm_bytes,
            "hbm_bytes_per_second": chip.hbm_bytes_per_second,
            "source": chip.source,
        },
        "devices": devices,
        "mesh": dict(mesh.shape),
        "base": {
            "param_dtype": str(jax.tree.leaves(step.base_params)[0].dtype),
            "compute_dtype": trainer.base.dtype,
            "remat_policy": trainer.base.remat_policy,
            "params": sum(math.prod(x.shape) for x in jax.tree.leaves(step.base_params)),
        },
        "hypernet": {"compute_dtype": trainer.execution.dtype, "iterative": trainer.execution.iterative, "params": param_count(step.state.params)},
        "batch": {
            "micro_batches": micro,
            "rows_per_micro_batch": rows,
            "rows_per_batch_shard": rows // (mesh.shape["data"] * mesh.shape["fsdp"]),
            "context_tokens_per_row": math.prod(run_shapes["ctx_tokens"].shape[1:]) // rows,
            "student_tokens_per_row": run_shapes["tokens"].shape[-1],
            "labels_per_row": run_shapes["labels"].shape[-1],
        },
        "inputs_per_device_bytes": inputs,
        "inputs_total_bytes": {
            "hypernet_params": _total_bytes(step.state.params),
            "optimizer_state": _total_bytes(step.state.opt_state),
            "base_params": _total_bytes(step.base_params),
            "batch": _total_bytes(step.batch),
        },
        "compile_seconds": round(step.compile_seconds, 1),
        "flops_per_step": {
            "analytic": analytic,
            "analytic_note": "d2l_jax.train.flops over the padded shapes, all devices together",
        },
        "estimate": {
            "step_seconds_at_peak": at_peak,
            f"step_seconds_at_{int(MFU_FOR_ESTIMATES * 100)}pct_mfu": at_peak / MFU_FOR_ESTIMATES,
            "steps": steps,
            f"hours_for_steps_at_{int(MFU_FOR_ESTIMATES * 100)}pct_mfu": steps * at_peak / MFU_FOR_ESTIMATES / 3600,
        },
    }
    if step.compiled is None:
        used = hbm_exceeded_bytes(step.error or "")
        report["memory_per_device_bytes"] = {
            "total": used[0] if used else None,
            "compiler_available": used[1] if used else None,
            "total_note": "what the compiler's out-of-memory message says it needed (may count temporaries only)",
        }
        report["fits"] = False
        report["error"] = (step.error or "")[:2000]
        return report
    memory = step.compiled.memory_analysis()
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + memory.temp_size_in_bytes
    report["memory_per_device_bytes"] = {
        "arguments": memory.argument_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "aliased": memory.alias_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "generated_code": memory.generated_code_size_in_bytes,
        "total": total,
        "total_note": "arguments + outputs - aliased (donated state) + temporaries",
    }
    report["fits"] = bool(total + memory.generated_code_size_in_bytes <= chip.hbm_bytes)
    cost = step.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    report["flops_per_step"].update(
        compiled_per_device=float(cost.get("flops", float("nan"))),
        compiled_note="XLA cost analysis of one device's program; loop bodies (scanned layers, micro-batches) count once",
    )
    report["collectives"] = count_collectives(step.compiled.as_text())
    return report
