"""Reads a llama.cpp GGUF file (dequantized with the ``gguf`` package) into Hugging Face-named tensors."""

from __future__ import annotations

import os
import re

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


def gguf_metadata(reader: gguf.GGUFReader) -> dict:
    """Scalar, string and small-array metadata fields (token tables are skipped)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "scores", "token_type", "merges"):
            continue
        out[key] = field.contents()
    return out


def config_from_gguf(meta: dict, tensor_names: set[str], dtype: str = "float32") -> DecoderConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    if "rope_freqs.weight" in tensor_names or meta.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise UnsupportedArchitectureError("GGUF files with RoPE scaling are not supported; load the HF directory instead")
    num_heads = int(meta[f"{arch}.attention.head_count"])
    hidden = int(meta[f"{arch}.embedding_length"])
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        raise ValueError("GGUF metadata lacks the vocabulary size")
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
    """Returns (DecoderConfig, params, metadata) for a GGUF file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    reader = gguf.GGUFReader(os.fspath(path))
    meta = gguf_metadata(reader)
    config = config_from_gguf(meta, {t.name for t in reader.tensors}, dtype=compute_dtype)
    return config, params_from_hf(config, gguf_loaders(reader, config), param_dtype), meta
