"""The user-facing Doc-to-LoRA object: internalize documents into adapters, then ask without them."""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from d2l_jax.data.chunking import chunk_document, document_affixes, tokenize_document
from d2l_jax.hypernet.config import HypernetConfig
from d2l_jax.hypernet.hypernet import document_adapters, init_hypernet, param_count
from d2l_jax.models.base_model import BaseModel
from d2l_jax.models.generate import bucket_length
from d2l_jax.models.lora import LoRA


@struct.dataclass
class Adapter:
    """One document's combined LoRA (a pytree of its arrays, so ``jax.block_until_ready(adapter)`` waits for it).

    Attributes:
      lora: ``A[1, L, R, d_in]`` and ``B[1, L, R, d_out]`` per target module; R >= rank is bucketed
        and the ranks beyond ``rank`` are zero.
      rank: the ranks in use, (num_chunks + 1) * r with the bias LoRA, num_chunks * r without.
      num_tokens: templated token count of the source document.
      num_chunks: chunks it was split into.
    """

    lora: LoRA
    rank: int = struct.field(pytree_node=False)
    num_tokens: int = struct.field(pytree_node=False)
    num_chunks: int = struct.field(pytree_node=False)

    @property
    def A(self):
        return self.lora.A

    @property
    def B(self):
        return self.lora.B


def stack_adapters(adapters: Sequence[Adapter]) -> LoRA:
    """One LoRA with a row per adapter (for a batch of prompts, one document each), zero-padded to the
    largest rank among them."""
    if not adapters:
        raise ValueError("no adapters given")
    rank = max(next(iter(a.A.values())).shape[2] for a in adapters)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, rank - x.shape[2]), (0, 0)))
    return jax.tree.map(lambda *xs: jnp.concatenate([pad(x) for x in xs]), *(a.lora for a in adapters))


_document_adapters = jax.jit(document_adapters, static_argnames=("config", "base"))


class D2L:
    """A hypernetwork bound to its frozen base model.

    ``internalize`` turns documents into adapters; ``generate`` and ``logits`` run the base model with
    an adapter (the given one, else the last internalized one, else none) and no document in the prompt.
    """

    def __init__(self, base: BaseModel, config: HypernetConfig, params: Any):
        config.check_base(base.config)
        self.base = base
        self.config = config
        self.params = params
        self.adapter: Adapter | None = None
        self._affixes = None

    @classmethod
    def create(cls, base: BaseModel, config: HypernetConfig | None = None, seed: int = 0) -> "D2L":
        """A freshly initialised hypernetwork (its adapters leave the base model unchanged)."""
        config = config or HypernetConfig()
        params = nn.unbox(init_hypernet(config, base.config, jax.random.key(seed)))
        return cls(base, config, params)

    @classmethod
    def load(cls, checkpoint_dir, step: int | None = None, base: BaseModel | None = None) -> "D2L":
        """A trained hypernetwork from a training workdir (or its ``checkpoints`` folder), at ``step``
        (latest by default), with its base model (loaded by the name the run recorded unless given).

        Raises FileNotFoundError without checkpoints, CheckpointMismatchError when ``base`` is not the
        model it was trained on, CheckpointCorruptError when the files cannot be read.
        """
        from d2l_jax.models.base_model import load_base_model
        from d2l_jax.train.checkpoint import Checkpointer, base_identity
        from d2l_jax.train.loop import RunConfig

        checkpoints = Checkpointer.of_run(checkpoint_dir)
        try:
            run = RunConfig.from_json(checkpoints.read_json("config", step))
            base = base or load_base_model(run.model)
            abstract = jax.eval_shape(lambda: nn.unbox(init_hypernet(run.hypernet, base.config, jax.random.key(0))))
            params = checkpoints.restore_params(abstract, base_identity(run.model, base.config, base.params), step)
        finally:
            checkpoints.close()
        return cls(base, run.hypernet, params)

    def param_count(self) -> int:
        return param_count(self.params)

    @property
    def affixes(self) -> tuple[list[int], list[int]]:
        if self._affixes is None:
            self._affixes = document_affixes(self.base._require_tokenizer())
        return self._affixes

    def document_chunks(self, document: str) -> tuple[list[list[int]], int]:
        """(chunks of templated token ids, total templated tokens). Raises for bad or too long input."""
        ids = tokenize_document(self.base._require_tokenizer(), document, self.affixes)
        chunks = chunk_document(ids, self.affixes, self.config.max_chunk_len)
        if len(chunks) > self.config.max_chunks:
            raise ValueError(
                f"the document has {len(ids)} tokens = {len(chunks)} chunks of <= {self.config.max_chunk_len}; "
                f"the configured maximum is max_chunks={self.config.max_chunks}"
            )
        return chunks, len(ids)

    def internalize(
        self, document: str | Sequence[str], scaler: float = 1.0, bias_scaler: float = 1.0
    ) -> Adapter | list[Adapter]:
        """Turns a document (or several, batched) into adapters; the last becomes the current adapter.

        ``scaler`` multiplies the chunk adapters' A (a linear scale of the update); ``bias_scaler`` both
        factors of the bias LoRA.
        """
        if isinstance(document, str):
            documents = [document]
        elif isinstance(document, (list, tuple)):
            documents = list(document)
        else:
            raise TypeError(f"document must be a str or a list of str, got {type(document).__name__}")
        if not documents:
            raise ValueError("no documents given")
        split = [self.document_chunks(d) for d in documents]
        chunks = [c for doc_chunks, _ in split for c in doc_chunks]
        batch = _chunk_batch(chunks, self.config.chunk_group_size)
        owners = np.concatenate([np.full(len(c), g) for g, (c, _) in enumerate(split)])
        slots = np.concatenate([np.arange(len(c)) for c, _ in split])
        pad = batch["tokens"].shape[0] * batch["tokens"].shape[1] - len(chunks)
        num_chunks = np.array([len(c) for c, _ in split], np.int32)
        lora = _document_adapters(
            self.config,
            self.base.config,
            self.base.params,
            self.params,
            batch["tokens"],
            batch["mask"],
            np.pad(owners, (0, pad), constant_values=len(documents)).astype(np.int32),
            np.pad(slots, (0, pad)).astype(np.int32),
            num_chunks,
            np.full(len(documents), scaler, np.float32),
            np.float32(bias_scaler),
        )
        adapters = []
        for g, ((_, tokens), n) in enumerate(zip(split, num_chunks.tolist())):
            rank = (n + self.config.use_bias) * self.config.lora_rank
            # Ranks past `rank` are zero; keep a bucketed prefix so inference does not pay for them.
            kept = min(bucket_length(rank, minimum=self.config.lora_rank), next(iter(lora.A.values())).shape[2])
            adapters.append(Adapter(jax.tree.map(lambda x: x[g : g + 1, :, :kept], lora), rank, tokens, n))
        self.adapter = adapters[-1]
        return adapters[0] if isinstance(document, str) else adapters

    def reset(self) -> None:
        """Forgets the current adapter: generate and logits behave as the base model again."""
        self.adapter = None

    def _lora(self, adapter: Adapter | None) -> LoRA | None:
        adapter = adapter or self.adapter
        return adapter.lora if adapter is not None else None

    def generate(self, prompts_or_messages, adapter: Adapter | None = None, max_new_tokens: int = 128, **kwargs) -> list[str]:
        """``BaseModel.generate`` with the given or current adapter (one adapter shared by all prompts)."""
        return self.base.generate(prompts_or_messages, max_new_tokens=max_new_tokens, lora=self._lora(adapter), **kwargs)

    def logits(self, input_ids, attention_mask=None, adapter: Adapter | None = None):
        """``BaseModel.logits`` with the given or current adapter, broadcast over the batch."""
        lora = self._lora(adapter)
        if lora is not None:
            rows = np.asarray(input_ids).shape[0]
            lora = jax.tree.map(lambda x: np.broadcast_to(x, (rows, *x.shape[1:])), lora)
        return self.base.logits(input_ids, attention_mask, lora=lora)


def _chunk_batch(chunks: list[list[int]], group_size: int) -> dict[str, np.ndarray]:
    """Right-pads chunks to a bucketed length and splits them into equal groups of at most
    ``group_size`` (``[groups, size, length]``; padding chunks fill the last group)."""
    length = bucket_length(max(len(c) for c in chunks))
    groups = math.ceil(len(chunks) / group_size)
    size = math.ceil(len(chunks) / groups)
    tokens = np.zeros((groups * size, length), np.int32)
    mask = np.zeros((groups * size, length), np.int32)
    for i, c in enumerate(chunks):
        tokens[i, : len(c)] = c
        mask[i, : len(c)] = 1
    return {"tokens": tokens.reshape(groups, size, length), "mask": mask.reshape(groups, size, length)}
