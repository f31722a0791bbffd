"""Reads a local Hugging Face model directory (``config.json`` + ``*.safetensors``, sharded or not)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open

from d2l_jax.models.families import DecoderConfig, config_from_hf
from d2l_jax.models.weights.mapping import params_from_hf


def read_hf_config(directory: str | os.PathLike, dtype: str = "float32") -> DecoderConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; expected a Hugging Face model directory")
    return config_from_hf(json.loads(path.read_text()), dtype=dtype)


def safetensors_loaders(directory: str | os.PathLike) -> dict:
    """name -> loader for every tensor in the directory's safetensors files (index or glob)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    loaders = {}
    for file in files:
        handle = safe_open(directory / file, framework="flax")  # "flax" also reads bfloat16
        for name in handle.keys():
            loaders[name] = lambda handle=handle, name=name: np.asarray(handle.get_tensor(name))
    return loaders


def load_hf_directory(directory: str | os.PathLike, param_dtype="float32", compute_dtype: str = "float32"):
    """Returns (DecoderConfig, params) for a Hugging Face model directory."""
    config = read_hf_config(directory, dtype=compute_dtype)
    return config, params_from_hf(config, safetensors_loaders(directory), param_dtype)
