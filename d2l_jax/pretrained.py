"""Trained hypernetworks as files: the repository's named ones (``pretrained/<name>/``) and any directory
written by ``D2L.save_pretrained``.

A pretrained directory holds two files:

  model.safetensors   the hypernetwork's variables (parameters and statistics), float32 (or float16 to
                      halve the file), keys are the pytree paths joined by "/" (``perceiver/encoder/latents_q``)
  config.json         {"format", "model" (the base model's name), "base_identity" (its architecture and
                      weight fingerprint), "hypernet", "execution", "base_execution", "sha256" (of
                      model.safetensors), "description"}

Each file is written to a temporary name and renamed into place, weights first: a reader never sees a
half-written file, and the checksum catches weights that do not belong to the config beside them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from d2l_jax.train.checkpoint import CheckpointCorruptError

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
FORMAT = "d2l-jax-pretrained-1"
WEIGHTS_DTYPES = ("float32", "float16")


def available() -> list[str]:
    """Names of the pretrained hypernetworks shipped in the repository's ``pretrained/`` folder."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The directory of a shipped name or of a path written by ``save_pretrained``.

    Raises ValueError naming the shipped hypernetworks when ``name_or_path`` is neither.
    """
    path = Path(name_or_path)
    if (path / CONFIG_FILE).is_file():
        return path
    if isinstance(name_or_path, str) and (PRETRAINED_DIR / name_or_path / CONFIG_FILE).is_file():
        return PRETRAINED_DIR / name_or_path
    raise ValueError(
        f"no pretrained hypernetwork {str(name_or_path)!r}: not a shipped name (available: {', '.join(available()) or 'none'}) "
        f"and not a directory holding {CONFIG_FILE} and {WEIGHTS_FILE}"
    )


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a pretrained directory; CheckpointCorruptError when it is not one."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointCorruptError(f"{path}: cannot be read as JSON ({error})") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointCorruptError(f"{path}: not a d2l-jax pretrained config (expected format {FORMAT!r})")
    return config


def _key(path) -> str:
    return "/".join(str(k.key) for k in path)


def _leaves(tree) -> dict[str, Any]:
    return {_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace_atomically(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        temporary.chmod(0o644)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save(directory: str | os.PathLike, variables, config: dict[str, Any], weights_dtype: str = "float32") -> Path:
    """Writes ``variables`` (as ``weights_dtype``, one of :data:`WEIGHTS_DTYPES`; loading casts them back)
    and ``config`` (plus ``format`` and the weights' ``sha256``) into ``directory`` (created if needed);
    returns it. Raises ValueError for another dtype, or float16 for a variable beyond float16's range."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype={weights_dtype!r}; expected one of {WEIGHTS_DTYPES}")
    arrays = {k: np.asarray(jax.device_get(v), np.float32) for k, v in _leaves(variables).items()}
    if weights_dtype == "float16":
        too_large = [k for k, v in arrays.items() if np.abs(v).max(initial=0.0) > np.finfo(np.float16).max]
        if too_large:
            raise ValueError(f"weights_dtype='float16': {too_large[:5]} hold values beyond float16's range; save as float32")
        arrays = {k: v.astype(np.float16) for k, v in arrays.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    _replace_atomically(weights, lambda p: save_file(arrays, str(p)))
    config = {"format": FORMAT, **config, "sha256": _sha256(weights)}
    _replace_atomically(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=1) + "\n"))
    return directory


def _stored(directory: str | os.PathLike, config: dict[str, Any]) -> tuple[Path, dict[str, np.ndarray]]:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointCorruptError(f"{path} is missing")
    if _sha256(path) != config.get("sha256"):
        raise CheckpointCorruptError(f"{path} does not match the sha256 in {CONFIG_FILE} (corrupt or replaced)")
    try:
        return path, load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointCorruptError(f"{path} cannot be read ({error})") from error


def load_variables(directory: str | os.PathLike, config: dict[str, Any], abstract) -> Any:
    """The variables stored in ``directory``, shaped as ``abstract`` (a pytree of ShapeDtypeStructs).

    Raises CheckpointCorruptError when the weights file is missing, does not match ``config``'s checksum,
    cannot be parsed, or lacks, adds or reshapes a variable.
    """
    path, stored = _stored(directory, config)
    expected = _leaves(abstract)
    if stored.keys() != expected.keys():
        missing, extra = sorted(expected.keys() - stored.keys()), sorted(stored.keys() - expected.keys())
        raise CheckpointCorruptError(f"{path}: variables missing {missing[:5]}, unexpected {extra[:5]} for its config")
    for key, leaf in expected.items():
        if stored[key].shape != leaf.shape:
            raise CheckpointCorruptError(f"{path}: {key} has shape {stored[key].shape}, its config gives {leaf.shape}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    return jax.tree_util.tree_unflatten(treedef, [stored[_key(path)].astype(leaf.dtype) for path, leaf in leaves])


def load_matching(directory: str | os.PathLike, config: dict[str, Any], fallback) -> tuple[Any, list[str]]:
    """``fallback`` (a pytree of arrays) with every variable stored in ``directory`` under the same name and
    shape put in its place, and the names of those variables (the rest keep ``fallback``'s values).

    Raises CheckpointCorruptError as ``load_variables`` does for the file itself.
    """
    _, stored = _stored(directory, config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(fallback)
    taken = [_key(p) for p, leaf in leaves if _key(p) in stored and stored[_key(p)].shape == leaf.shape]
    values = [stored[_key(p)].astype(leaf.dtype) if _key(p) in taken else leaf for p, leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, values), taken
