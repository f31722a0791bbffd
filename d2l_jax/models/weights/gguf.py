"""Reads a llama.cpp GGUF file (dequantized with the ``gguf`` package) into Hugging Face-named tensors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import gguf
import numpy as np

from d2l_jax.models.families import DecoderConfig, UnsupportedArchitectureError
from d2l_jax.models.weights.mapping import params_from_hf

# (GGUF name, Hugging Face name). "{i}" is the layer index.
LLAMA_GGUF_NAMES: tuple[tuple[str, str], ...] = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
)
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
GGUF_MAGIC = b"GGUF"
# Metadata keys (after "<architecture>.") a decoder config cannot do without.
REQUIRED_GGUF_KEYS = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count", "attention.layer_norm_rms_epsilon")
# What the gguf package raises on a header cut short or garbled (short reads index empty arrays, misread
# lengths and types fail conversions).
_HEADER_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError)


class _TruncatedTensor(Exception):
    def __init__(self, name: str, end: int, size: int):
        super().__init__(name, end, size)
        self.name, self.end, self.size = name, end, size


class _CheckedReader(gguf.GGUFReader):
    """A GGUFReader that names the tensor a truncated file cuts short; the package's own reader fails on
    a numpy reshape that names neither the file nor the tensor."""

    # Overrides a private method of gguf 0.x; should it be renamed, a truncated file still fails in the
    # reader, and open_gguf still names the file (without the tensor).
    def _build_tensors(self, start_offs: int, fields) -> None:
        size = len(self.data)
        for field in fields:  # parts: name length, name, dimension count, dimensions, type, offset
            dims, raw_type, offset = field.parts[3], field.parts[4], field.parts[5]
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
            end = int(start_offs) + int(offset[0]) + int(np.prod(dims, dtype=np.uint64)) * type_size // block
            if end > size:
                raise _TruncatedTensor(field.name, end, size)
        super()._build_tensors(start_offs, fields)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A reader of the GGUF file ``path`` (tensors are memory-mapped, not read).

    Raises FileNotFoundError when there is no such file, and ValueError naming the file when it is empty,
    is not a GGUF file, or is truncated or corrupt (naming the first tensor whose data lies past its end).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes), not a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}")
    try:
        return _CheckedReader(os.fspath(path))
    except _TruncatedTensor as e:
        raise ValueError(
            f"{path} is truncated or corrupt: tensor {e.name!r} ends at byte {e.end:,} but the file has {e.size:,} bytes"
        ) from e
    except _HEADER_ERRORS as e:
        raise ValueError(
            f"{path} is truncated or corrupt: its GGUF header cannot be read (the file has {size:,} bytes)"
        ) from e


def gguf_metadata(reader: gguf.GGUFReader) -> dict:
    """Scalar, string and small-array metadata fields (token tables are skipped)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "scores", "token_type", "merges"):
            continue
        out[key] = field.contents()
    return out


def config_from_gguf(meta: dict, tensor_names: set[str], dtype: str = "float32", source: str = "the GGUF file") -> DecoderConfig:
    """The DecoderConfig a GGUF file's metadata describes. Raises UnsupportedArchitectureError for an
    architecture or RoPE scaling this package does not implement, ValueError naming ``source`` and the
    keys when required metadata is missing."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    if "rope_freqs.weight" in tensor_names or meta.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise UnsupportedArchitectureError("GGUF files with RoPE scaling are not supported; load the HF directory instead")
    missing = [f"{arch}.{key}" for key in (*REQUIRED_GGUF_KEYS, "vocab_size") if f"{arch}.{key}" not in meta]
    if missing:
        raise ValueError(f"{source}: the GGUF metadata lacks {missing}")
    num_heads = int(meta[f"{arch}.attention.head_count"])
    hidden = int(meta[f"{arch}.embedding_length"])
    vocab = meta[f"{arch}.vocab_size"]
    return DecoderConfig(
        family="llama",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
        num_layers=int(meta[f"{arch}.block_count"]),
        num_heads=num_heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 8192)),
        tie_word_embeddings="output.weight" not in tensor_names,
        dtype=dtype,
    )


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head row interleave of Q/K projections (back to HF's half-split RoPE)."""
    head_dim = weight.shape[0] // num_heads
    w = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def _dequantized(tensor) -> np.ndarray:
    # GGUF lists dims innermost-first; the result is [rows, cols] = PyTorch's [out, in].
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def gguf_loaders(reader: gguf.GGUFReader, config: DecoderConfig) -> dict:
    """Hugging Face name -> loader of the dequantized tensor in PyTorch layout."""
    patterns = [
        (re.compile(re.escape(g).replace(re.escape("{i}"), r"(\d+)") + "$"), h) for g, h in LLAMA_GGUF_NAMES
    ]
    loaders = {}
    for tensor in reader.tensors:
        for pattern, hf_template in patterns:
            match = pattern.match(tensor.name)
            if match:
                break
        else:
            raise ValueError(f"unexpected GGUF tensor {tensor.name!r}")
        hf_name = hf_template.replace("{i}", match.group(1)) if match.groups() else hf_template
        heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}.get(hf_name.split(".")[-2])

        def load(tensor=tensor, heads=heads):
            weight = _dequantized(tensor)
            return unpermute_rope_rows(weight, heads) if heads else weight

        loaders[hf_name] = load
    return loaders


def load_gguf(path: str | os.PathLike, param_dtype="float32", compute_dtype: str = "float32"):
    """Returns (DecoderConfig, params, metadata) for a GGUF file; raises as :func:`open_gguf` does."""
    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    config = config_from_gguf(meta, {t.name for t in reader.tensors}, dtype=compute_dtype, source=os.fspath(path))
    return config, params_from_hf(config, gguf_loaders(reader, config), param_dtype), meta
