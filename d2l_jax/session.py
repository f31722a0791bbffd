"""A conversation about one internalized document: what ``launch.chat`` and ``launch.demo`` (and a notebook)
drive, so a terminal, a web page and Python code behave the same way.

    session = ChatSession(D2L.from_pretrained("smollm2-135m-niah"))
    print(session.internalize(Path("docs/examples/haystack.txt").read_text(), name="haystack").summary())
    session.ask("What is the special magic number?")   # the document is not in the prompt
    session.set_scale(0.5)                              # the same document, a weaker update
    session.reset()                                     # the base model alone again

The session owns its adapter and passes it explicitly to every generation: the D2L's own current adapter
(``D2L.internalize``) is neither read nor changed, so several sessions may share one D2L.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax

from d2l_jax.api import D2L, Adapter
from d2l_jax.hypernet.adapter import adapter_bytes

__all__ = ["ChatSession", "Internalization", "finite_scale"]

Messages = list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Internalization:
    """What one internalization produced and cost.

    name: where the document came from (a file name, "pasted text").
    num_tokens: templated tokens of the document; num_chunks: chunks it was split into.
    rank: LoRA ranks in use (``Adapter.rank``); num_bytes: bytes of the adapter's A and B arrays.
    scale, bias_scale: the scalers it was generated with.
    seconds: wall time of the hypernetwork, tokenization included (the first call also compiles).
    """

    name: str
    num_tokens: int
    num_chunks: int
    rank: int
    num_bytes: int
    scale: float
    bias_scale: float
    seconds: float

    def summary(self) -> str:
        """One line, e.g. ``internalized haystack: 1318 tokens, 22 chunks, adapter rank 184 (1.1 MiB), ...``."""
        return (
            f"internalized {self.name}: {self.num_tokens} tokens, {self.num_chunks} chunks, adapter rank {self.rank} "
            f"({format_bytes(self.num_bytes)}), scale {self.scale:g}, bias scale {self.bias_scale:g}, {self.seconds:.1f} s"
        )


def format_bytes(num_bytes: int) -> str:
    """``num_bytes`` in B, KiB or MiB, e.g. ``"1.5 MiB"``."""
    if num_bytes < 1024:
        return f"{num_bytes} B"
    if num_bytes < 1024**2:
        return f"{num_bytes / 1024:.1f} KiB"
    return f"{num_bytes / 1024**2:.1f} MiB"


def finite_scale(value: float, what: str = "scale") -> float:
    """``value`` as a float. Raises ValueError naming ``what`` when it is not a finite number (nan or inf
    would turn every adapter entry into nan)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"the {what} must be a finite number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"the {what} must be a finite number, got {value!r}")
    return number


class ChatSession:
    """A D2L, the document it has internalized, and a multi-turn conversation answered with its adapter.

    Every question is answered greedily by the base model patched with the current document's adapter,
    with the system message and the conversation so far in the prompt and never the document.

    Attributes:
      d2l: the hypernetwork and its base model (shared, never modified).
      document, document_name: the current document's text and where it came from (None without one).
      adapter: the current document's adapter at ``scale`` and ``bias_scale`` (None without a document).
      last: what the last internalization produced and cost (None without a document).
      scale: multiplies every chunk's A (the reference's per-context scaler; 0 leaves the bias LoRA alone).
      bias_scale: multiplies both factors of the learned bias LoRA.
      system_message: the system turn of every prompt ("" is the format the hypernetworks were trained with).
      history: the conversation as chat messages (user and assistant turns, oldest first).
      max_new_tokens: longest reply in tokens.
    """

    def __init__(
        self,
        d2l: D2L,
        max_new_tokens: int = 128,
        scale: float = 1.0,
        bias_scale: float = 1.0,
        system_message: str = "",
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.d2l = d2l
        self.max_new_tokens = max_new_tokens
        self.scale = finite_scale(scale)
        self.bias_scale = finite_scale(bias_scale, "bias scale")
        self.system_message = system_message
        self.document: str | None = None
        self.document_name: str | None = None
        self.adapter: Adapter | None = None
        self.last: Internalization | None = None
        self.history: Messages = []

    def internalize(
        self, document: str, name: str = "document", scale: float | None = None, bias_scale: float | None = None
    ) -> Internalization:
        """Makes ``document`` the current one: generates its adapter (documents longer than the
        hypernetwork's ``max_chunks`` chunks are encoded segment by segment) and starts a new conversation.
        ``scale`` and ``bias_scale`` replace the session's scalers (None keeps them).

        Raises TypeError for non-text, ValueError naming ``name`` for an empty document and for a scaler
        that is not a finite number; the session is then left as it was.
        """
        if not isinstance(document, str):
            raise TypeError(f"{name} must be text, got {type(document).__name__}")
        if not document.strip():
            raise ValueError(f"{name} is empty" + (" (only whitespace)" if document else ""))
        scale = self.scale if scale is None else finite_scale(scale)
        bias_scale = self.bias_scale if bias_scale is None else finite_scale(bias_scale, "bias scale")
        result = self._generate_adapter(document, name, scale, bias_scale)
        self.document, self.document_name = document, name
        self.scale, self.bias_scale = scale, bias_scale
        self.history = []
        return result

    def _generate_adapter(self, document: str, name: str, scale: float, bias_scale: float) -> Internalization:
        start = time.perf_counter()
        adapter = jax.block_until_ready(self.d2l.adapters([document], scaler=scale, bias_scaler=bias_scale)[0])
        seconds = time.perf_counter() - start
        self.adapter = adapter
        self.last = Internalization(
            name=name,
            num_tokens=adapter.num_tokens,
            num_chunks=adapter.num_chunks,
            rank=adapter.rank,
            num_bytes=adapter_bytes(adapter),
            scale=scale,
            bias_scale=bias_scale,
            seconds=seconds,
        )
        return self.last

    def set_scale(self, scale: float | None = None, bias_scale: float | None = None) -> Internalization | None:
        """Changes the scalers (None keeps one) and, with a document, internalizes it again with them; the
        conversation goes on. Returns the new internalization, or None without a document.

        Raises ValueError for a value that is not a finite number; nothing changes then.
        """
        scale = self.scale if scale is None else finite_scale(scale)
        bias_scale = self.bias_scale if bias_scale is None else finite_scale(bias_scale, "bias scale")
        if self.document is not None and (scale, bias_scale) != (self.last.scale, self.last.bias_scale):
            self._generate_adapter(self.document, self.document_name, scale, bias_scale)
        self.scale, self.bias_scale = scale, bias_scale
        return self.last if self.document is not None else None

    def messages(self, question: str) -> Messages:
        """The prompt for ``question``: the system turn, the conversation so far, then the question."""
        return [{"role": "system", "content": self.system_message}, *self.history, {"role": "user", "content": question.strip()}]

    def ask(self, question: str) -> str:
        """The greedy reply to ``question`` with the current adapter (or none), the conversation so far and
        no document in the prompt; both turns join the conversation.

        Raises ValueError for an empty question, or when the conversation plus ``max_new_tokens`` no longer
        fits the base model's context (``clear_history`` or ``reset`` then).
        """
        if not question.strip():
            raise ValueError("the question is empty")
        lora = self.adapter.lora if self.adapter is not None else None
        try:
            [reply] = self.d2l.base.generate([self.messages(question)], max_new_tokens=self.max_new_tokens, lora=lora)
        except ValueError as error:
            if not self.history:
                raise
            raise ValueError(f"{error}; the conversation so far is in the prompt: clear it or reset the session") from None
        self.history += [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": reply}]
        return reply

    def clear_history(self) -> None:
        """Forgets the conversation; the document stays internalized."""
        self.history = []

    def reset(self) -> None:
        """Forgets the document, its adapter and the conversation: the base model answers alone. The
        scalers and the system message stay."""
        self.document = self.document_name = self.adapter = self.last = None
        self.history = []
