"""The user-facing Doc-to-LoRA object: internalize documents into adapters, then ask without them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from d2l_jax import pretrained
from d2l_jax.data.chunking import chunk_document, document_affixes, tokenize_document
from d2l_jax.export.reference import (
    hub_name,
    read_reference_checkpoint,
    write_reference_checkpoint,
)
from d2l_jax.hypernet.adapter import (
    Adapter,
    batched_adapters,
    segmented_adapter,
    stack_adapters,
)
from d2l_jax.hypernet.config import HypernetConfig, HypernetExecution
from d2l_jax.hypernet.hypernet import abstract_hypernet, init_hypernet, matmul_weights_in, param_count
from d2l_jax.models.base_model import BaseExecution, BaseModel
from d2l_jax.models.layout import split_layers
from d2l_jax.models.lora import LoRA
from d2l_jax.train.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    base_identity,
    check_base,
)
from d2l_jax.train.config import RunConfig

__all__ = ["D2L", "Adapter", "stack_adapters"]


class D2L:
    """A hypernetwork bound to its frozen base model.

    ``adapters`` turns documents of any length into adapters and changes nothing; ``internalize`` does the
    same and keeps the last as the current adapter, which ``generate`` and ``logits`` then use (the given
    adapter, else the current one, else none) with no document in the prompt.

    ``execution`` says how the hypernetwork runs (compute dtype, loop unrolling, chunk grouping); any
    checkpoint runs under any execution.
    """

    def __init__(self, base: BaseModel, config: HypernetConfig, params: Any, execution: HypernetExecution | None = None):
        config.check_base(base.config)
        self.base = base
        self.config = config
        self.execution = execution or HypernetExecution()
        self.params = params
        self.adapter: Adapter | None = None
        self._affixes = None
        self._weights: tuple[Any, HypernetExecution, Any] | None = None  # (params, execution, their inference form)

    def _inference_params(self):
        """The variables with their matmul weights in the execution's compute dtype and the layers of fully
        unrolled loops held apart (``d2l_jax.models.layout``), prepared once per (params, execution)
        rather than inside every call."""
        if self._weights is None or self._weights[0] is not self.params or self._weights[1] != self.execution:
            weights = split_layers(matmul_weights_in(self.params, self.execution.dtype), self.execution.scan_unroll)
            self._weights = (self.params, self.execution, weights)
        return self._weights[2]

    @classmethod
    def create(
        cls, base: BaseModel, config: HypernetConfig | None = None, seed: int = 0, execution: HypernetExecution | None = None
    ) -> "D2L":
        """A freshly initialised hypernetwork (its adapters leave the base model unchanged)."""
        config = config or HypernetConfig()
        params = nn.unbox(init_hypernet(config, base.config, jax.random.key(seed)))
        return cls(base, config, params, execution)

    @classmethod
    def load(
        cls,
        checkpoint_dir: str | Path,
        step: int | None = None,
        base: BaseModel | None = None,
        execution: HypernetExecution | None = None,
        base_execution: BaseExecution | None = None,
    ) -> "D2L":
        """A trained hypernetwork from a training workdir (or its ``checkpoints`` folder), at ``step``
        (latest by default).

        ``execution`` (default: the run's) says how the hypernetwork runs. The base model is ``base`` or,
        by default, the model the run recorded, loaded as ``base_execution`` says (default: as the run ran it).

        Raises FileNotFoundError without checkpoints, CheckpointMismatchError when ``base`` is not the
        model it was trained on, CheckpointCorruptError when the files cannot be read.
        """
        checkpoints = Checkpointer.of_run(checkpoint_dir)
        try:
            run = RunConfig.from_json(checkpoints.read_json("config", step))
            base = base or (base_execution or run.base_execution).load(run.model)
            abstract = abstract_hypernet(run.hypernet, base.config)
            params = checkpoints.restore_params(abstract, base_identity(run.model, base.config, base.params), step)
        finally:
            checkpoints.close()
        return cls(base, run.hypernet, params, execution or run.execution)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        base: BaseModel | None = None,
        execution: HypernetExecution | None = None,
        base_execution: BaseExecution | None = None,
    ) -> "D2L":
        """A pretrained hypernetwork: a name shipped in the repository (``d2l_jax.pretrained.available()``,
        e.g. ``"smollm2-135m-qa"``) or a directory written by :meth:`save_pretrained`, offline.

        The base model is ``base`` or, by default, the one it was trained on, loaded as ``base_execution``
        says (default: as it was saved). ``execution`` defaults to the saved one.

        Raises ValueError listing the shipped names for an unknown name, CheckpointMismatchError when
        ``base`` is not the model it was trained on, CheckpointCorruptError for unreadable or altered files.
        """
        directory = pretrained.resolve(name_or_path)
        saved = pretrained.read_config(directory)
        try:
            hyper = HypernetConfig.from_dict(saved["hypernet"])[0]
            execution = execution or HypernetExecution(**saved["execution"])
            base_execution = base_execution or BaseExecution(**saved["base_execution"])
            model, identity = saved["model"], saved["base_identity"]
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointCorruptError(f"{directory / pretrained.CONFIG_FILE}: bad or missing field ({error!r})") from error
        base = base or base_execution.load(model)
        check_base(identity, base_identity(model, base.config, base.params), directory)
        abstract = abstract_hypernet(hyper, base.config)
        return cls(base, hyper, pretrained.load_variables(directory, saved, abstract), execution)

    def save_pretrained(
        self, directory: str | Path, description: str = "", base_execution: BaseExecution | None = None, weights_dtype: str = "float32"
    ) -> Path:
        """Writes this hypernetwork for :meth:`from_pretrained` (``d2l_jax.pretrained`` gives the layout):
        the weights (float32, or ``weights_dtype="float16"`` for half the file, each weight rounded to
        float16), the configs, the base model's name and identity, and ``description`` (what it was trained
        on). ``base_execution`` is how ``from_pretrained`` loads the base by default."""
        config = {
            "model": self.base.name,
            "base_identity": base_identity(self.base.name, self.base.config, self.base.params),
            "hypernet": dataclasses.asdict(self.config),
            "execution": dataclasses.asdict(self.execution),
            "base_execution": dataclasses.asdict(base_execution or BaseExecution()),
            "description": description,
        }
        return pretrained.save(directory, self.params, json.loads(json.dumps(config)), weights_dtype)

    @classmethod
    def from_reference_checkpoint(
        cls, path: str | Path, base: BaseModel, execution: HypernetExecution | None = None, base_name: str | None = None, **config_changes: Any
    ) -> "D2L":
        """A hypernetwork from the reference implementation's ``pytorch_model.bin`` (SakanaAI/doc-to-lora), on ``base``.

        The pickle is read by a restricted unpickler (tensors and the reference's config data classes only;
        nothing it names is imported or run). ``base_name`` (default ``base.name``) must match the checkpoint's
        ``base_model_name_or_path`` by last path component. ``config_changes`` set fields the checkpoint lacks
        (``max_chunk_len``, ``max_chunks``). See ``d2l_jax.export.reference.read_reference_checkpoint`` for the
        key table and the errors (UnsafeCheckpointError, CheckpointMismatchError, ReferenceFormatError).
        """
        config, params = read_reference_checkpoint(path, base.config, base_name or base.name, **config_changes)
        return cls(base, config, params, execution)

    def save_reference_checkpoint(self, path: str | Path, base_name: str | None = None) -> Path:
        """Writes this hypernetwork as the reference implementation's ``pytorch_model.bin`` (``path`` or
        ``path/pytorch_model.bin`` for a directory), recording ``base_name`` (default: the base model's Hugging
        Face id where known, else its name). Raises ReferenceFormatError naming the field for a configuration
        the reference cannot express (``HypernetConfig.ADDITIONS``, a non-reference Perceiver attention).
        Needs torch and peft. Returns the file written."""
        return write_reference_checkpoint(path, self.config, self.base.config, self.params, base_name or hub_name(self.base.name))

    def param_count(self) -> int:
        return param_count(self.params)

    @property
    def affixes(self) -> tuple[list[int], list[int]]:
        if self._affixes is None:
            self._affixes = document_affixes(self.base._require_tokenizer())
        return self._affixes

    def document_chunks(self, document: str) -> tuple[list[list[int]], int]:
        """(chunks of templated token ids, total templated tokens). Raises TypeError / ValueError for
        non-text or empty documents."""
        ids = tokenize_document(self.base._require_tokenizer(), document, self.affixes)
        return chunk_document(ids, self.affixes, self.config.max_chunk_len), len(ids)

    def adapters(self, documents: Sequence[str], scaler: float = 1.0, bias_scaler: float = 1.0) -> list[Adapter]:
        """One adapter per document, of any length; the current adapter is left as it is.

        Documents of at most ``max_chunks`` chunks are encoded together in one pass; longer ones segment by
        segment (``hypernet.adapter.segmented_adapter``). ``scaler`` multiplies the chunk adapters' A (a
        linear scale of the update); ``bias_scaler`` both factors of the bias LoRA.
        """
        if isinstance(documents, str) or not isinstance(documents, (list, tuple)):
            raise TypeError(f"documents must be a list of str, got {type(documents).__name__}")
        if not documents:
            raise ValueError("no documents given")
        split = [self.document_chunks(d) for d in documents]
        args = (self.config, self.execution, self.base.config, self.base.params, self._inference_params())
        fitting = [i for i, (chunks, _) in enumerate(split) if len(chunks) <= self.config.max_chunks]
        adapters: dict[int, Adapter] = {}
        if fitting:
            adapters.update(zip(fitting, batched_adapters(*args, [split[i] for i in fitting], scaler, bias_scaler)))
        for i, (chunks, tokens) in enumerate(split):
            if i not in adapters:
                adapters[i] = segmented_adapter(*args, chunks, tokens, scaler, bias_scaler)
        return [adapters[i] for i in range(len(documents))]

    def internalize(
        self, document: str | Sequence[str], scaler: float = 1.0, bias_scaler: float = 1.0
    ) -> Adapter | list[Adapter]:
        """``adapters`` for a document (or several, batched); the last becomes the current adapter."""
        if not isinstance(document, (str, list, tuple)):
            raise TypeError(f"document must be a str or a list of str, got {type(document).__name__}")
        adapters = self.adapters([document] if isinstance(document, str) else document, scaler, bias_scaler)
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
