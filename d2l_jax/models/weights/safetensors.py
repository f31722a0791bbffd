"""Reads a local Hugging Face model directory (``config.json`` + ``*.safetensors``, sharded or not)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from d2l_jax.models.families import DecoderConfig, config_from_hf
from d2l_jax.models.weights.mapping import params_from_hf


def read_hf_config(directory: str | os.PathLike, dtype: str = "float32") -> DecoderConfig:
    """The DecoderConfig of a Hugging Face model directory's ``config.json``.

    Raises FileNotFoundError without the file, ValueError naming it when it is not JSON or lacks a
    required field, UnsupportedArchitectureError for an architecture this package does not implement.
    """
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; expected a Hugging Face model directory")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return config_from_hf(hf, dtype=dtype, source=str(path))


def safetensors_loaders(directory: str | os.PathLike) -> dict:
    """name -> loader for every tensor in the directory's safetensors files (index or glob).

    Raises FileNotFoundError when there are none (or the index names a missing one), ValueError naming the
    file when the index or a safetensors file cannot be read (truncated or corrupt).
    """
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index (JSON with a weight_map): {type(e).__name__}: {e}") from e
        absent = [f for f in files if not (directory / f).is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names files that are not in {directory}: {absent}")
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    loaders = {}
    for file in files:
        try:
            handle = safe_open(directory / file, framework="flax")  # "flax" also reads bfloat16
        except SafetensorError as e:
            raise ValueError(f"{directory / file} is truncated or corrupt: {e}") from e
        for name in handle.keys():
            loaders[name] = lambda handle=handle, name=name: np.asarray(handle.get_tensor(name))
    return loaders


def load_hf_directory(directory: str | os.PathLike, param_dtype="float32", compute_dtype: str = "float32"):
    """Returns (DecoderConfig, params) for a Hugging Face model directory."""
    config = read_hf_config(directory, dtype=compute_dtype)
    return config, params_from_hf(config, safetensors_loaders(directory), param_dtype)
