"""One document's adapter as a PEFT LoRA directory, for serving with transformers or vLLM, and back.

This project applies ``y = x W + alpha * (x A^T) B`` with ``A [R, d_in]`` and ``B [R, d_out]`` per layer and
``alpha = 2 r^1.5`` fixed by the generating rank ``r``. PEFT applies ``y = x W^T + (lora_alpha / R) *
lora_B (lora_A x)`` with ``lora_A.weight [R, d_in]`` and ``lora_B.weight [d_out, R]``. So ``lora_A = A``,
``lora_B = B^T`` and ``lora_alpha = alpha * R``: the arrays are written unchanged and PEFT's scaling is
this project's ``alpha``. The ranks an adapter keeps beyond ``adapter.rank`` are zero and not written;
layers whose A and B are zero for every module (below ``adapted_layers``) are left out through PEFT's
``layers_to_transform``.

The directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (keys
``base_model.model.model.layers.{l}.{mlp|self_attn}.{module}.lora_{A|B}.weight``, float32). The
safetensors metadata also records what :func:`load_peft_adapter` needs to give back the identical Adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from d2l_jax.hypernet.adapter import Adapter
from d2l_jax.models.lora import LoRA

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_METADATA_KEY = "d2l_jax"
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _module_path(layer: int, module: str) -> str:
    group = "self_attn" if module in _ATTENTION else "mlp"
    return f"base_model.model.model.layers.{layer}.{group}.{module}"


def save_peft(adapter: Adapter, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Writes ``adapter`` (``A[1, L, R, d_in]``, ``B[1, L, R, d_out]`` per module) as a PEFT LoRA directory.

    Per module the first ``min(adapter.rank, R)`` ranks are written (the rest are zero by construction).
    ``base_model_name_or_path`` goes into ``adapter_config.json`` (PEFT only records it). Returns the
    directory (created if needed).

    Raises ValueError for an adapter of more than one batch row or without modules, or with ranks past
    ``adapter.rank`` that are not zero (it would change the function).
    """
    lora = adapter.lora
    modules = tuple(sorted(lora.A))
    if not modules:
        raise ValueError("the adapter has no target modules")
    arrays_a = {m: np.asarray(jax.device_get(lora.A[m]), np.float32) for m in modules}
    arrays_b = {m: np.asarray(jax.device_get(lora.B[m]), np.float32) for m in modules}
    for m in modules:
        if arrays_a[m].ndim != 4 or arrays_a[m].shape[0] != 1:
            raise ValueError(f"adapter {m}: expected A of shape [1, L, R, d_in] (one document), got {arrays_a[m].shape}")
    num_layers = arrays_a[modules[0]].shape[1]
    ranks = {m: min(adapter.rank, arrays_a[m].shape[2]) for m in modules}
    for m in modules:
        if np.any(arrays_a[m][:, :, ranks[m] :]) and np.any(arrays_b[m][:, :, ranks[m] :]):
            raise ValueError(f"adapter {m}: ranks past adapter.rank={adapter.rank} are not zero")
    used = [l for l in range(num_layers) if any(np.any(arrays_a[m][0, l]) or np.any(arrays_b[m][0, l]) for m in modules)]
    layers = used or list(range(num_layers))  # PEFT refuses an adapter that targets nothing

    tensors = {}
    for l in layers:
        for m in modules:
            tensors[f"{_module_path(l, m)}.lora_A.weight"] = np.ascontiguousarray(arrays_a[m][0, l, : ranks[m]])
            tensors[f"{_module_path(l, m)}.lora_B.weight"] = np.ascontiguousarray(arrays_b[m][0, l, : ranks[m]].T)
    rank = max(ranks.values())
    differing = {m: r for m, r in ranks.items() if r != rank}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": float(lora.alpha) * rank,
        "rank_pattern": differing,
        "alpha_pattern": {m: float(lora.alpha) * r for m, r in differing.items()},
        "target_modules": list(modules),
        "layers_to_transform": None if len(layers) == num_layers else layers,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    record = {
        "alpha": float(lora.alpha),
        "rank": adapter.rank,
        "num_tokens": adapter.num_tokens,
        "num_chunks": adapter.num_chunks,
        "num_layers": num_layers,
        "widths": {m: int(arrays_a[m].shape[2]) for m in modules},
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", _METADATA_KEY: json.dumps(record)})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_peft_adapter(directory: str | Path) -> Adapter:
    """The Adapter a :func:`save_peft` directory holds, identical to the one written (left-out layers and
    ranks come back as zeros, at the widths the adapter had).

    Raises FileNotFoundError when a file is missing, ValueError for a directory not written by
    :func:`save_peft` (no d2l-jax metadata) or whose tensors do not match its config.
    """
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing")
    config = json.loads((directory / CONFIG_FILE).read_text())
    with safe_open(str(directory / WEIGHTS_FILE), "np") as f:
        metadata = f.metadata() or {}
        if _METADATA_KEY not in metadata:
            raise ValueError(f"{directory / WEIGHTS_FILE} was not written by d2l-jax (no {_METADATA_KEY!r} metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    record = json.loads(metadata[_METADATA_KEY])
    num_layers, modules = record["num_layers"], sorted(record["widths"])
    if sorted(config.get("target_modules") or []) != modules:
        raise ValueError(f"{directory}: target_modules {config.get('target_modules')} disagree with the weights' modules {modules}")
    layers = config.get("layers_to_transform") or list(range(num_layers))
    lora_a, lora_b = {}, {}
    for m in modules:
        width = record["widths"][m]
        a_rows, b_rows = [], []
        for l in range(num_layers):
            if l in layers:
                key = _module_path(l, m)
                try:
                    a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"].T
                except KeyError as error:
                    raise ValueError(f"{directory / WEIGHTS_FILE} lacks {error.args[0]}") from None
                a_rows.append(np.pad(a, ((0, width - a.shape[0]), (0, 0))))
                b_rows.append(np.pad(b, ((0, width - b.shape[0]), (0, 0))))
            else:
                a_rows.append(None)
                b_rows.append(None)
        d_in = next(x for x in a_rows if x is not None).shape[1]
        d_out = next(x for x in b_rows if x is not None).shape[1]
        zero = lambda d: np.zeros((width, d), np.float32)
        lora_a[m] = jnp.asarray(np.stack([x if x is not None else zero(d_in) for x in a_rows])[None])
        lora_b[m] = jnp.asarray(np.stack([x if x is not None else zero(d_out) for x in b_rows])[None])
    return Adapter(LoRA(A=lora_a, B=lora_b, alpha=record["alpha"]), record["rank"], record["num_tokens"], record["num_chunks"])
