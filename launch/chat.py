"""Talk to a document without it being in the prompt: D2L internalizes it, then answers questions.

    python -m launch.chat --checkpoint=DIR --doc=FILE [--scale=1.0 --max_new_tokens=128]

Every line is a question, answered greedily by the base model with the document's adapter and only the
question in its prompt (one turn; earlier questions are not in the prompt either). Commands:

    /doc FILE   internalize another document (replaces the current one)
    /scale X    scale the document's update (multiplies every chunk's A by X; the bias LoRA is left alone)
                and internalize it again; 0 leaves only the learned bias adapter
    /reset      forget the document: the base model answers alone
    /help       list the commands
    /quit       leave (end of input does too)
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TextIO

from absl import app, flags, logging

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir (or its checkpoints/ folder)", required=True)
_DOC = flags.DEFINE_string("doc", None, "text file to internalize at the start")
_SCALE = flags.DEFINE_float("scale", 1.0, "adapter scaler (multiplies every chunk's A)")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "longest reply in tokens")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (latest by default)")

HELP = """commands: /doc FILE, /scale X, /reset, /help, /quit; anything else is a question"""


class ChatSession:
    """A document internalized by a D2L, and questions answered with its adapter.

    Attributes:
      d2l: the hypernetwork and its base model.
      document, document_name: the current document's text and where it came from (None after reset).
      adapter: the current document's adapter at ``scale`` (None without a document).
      scale: multiplies every chunk's A when internalizing (the reference's per-context scaler).
      max_new_tokens: longest reply.
    """

    def __init__(self, d2l, max_new_tokens: int = 128, scale: float = 1.0):
        self.d2l = d2l
        self.max_new_tokens = max_new_tokens
        self.scale = _finite_scale(scale)
        self.document: str | None = None
        self.document_name: str | None = None
        self.adapter = None

    def _internalize(self) -> str:
        start = time.perf_counter()
        self.adapter = self.d2l.adapters([self.document], scaler=self.scale)[0]
        seconds = time.perf_counter() - start
        return (
            f"[internalized {self.document_name}: {self.adapter.num_tokens} tokens, {self.adapter.num_chunks} chunks, "
            f"adapter rank {self.adapter.rank}, scale {self.scale:g}, {seconds:.1f} s]"
        )

    def load_document(self, text: str, name: str) -> str:
        """Internalizes ``text`` as the current document; returns a status line. Raises ValueError for
        empty text."""
        if not text.strip():
            raise ValueError(f"{name} is empty")
        self.document, self.document_name = text, name
        return self._internalize()

    def set_scale(self, scale: float) -> str:
        """Changes the scaler and re-internalizes the current document with it. Raises ValueError for a
        scale that is not a finite number (nan or inf would turn the adapter into nan)."""
        self.scale = _finite_scale(scale)
        if self.document is None:
            return f"[scale {scale:g}; it applies to the next document]"
        return self._internalize()

    def reset(self) -> str:
        """Forgets the document and its adapter."""
        self.document = self.document_name = self.adapter = None
        return "[document forgotten: the base model answers alone]"

    def ask(self, question: str) -> str:
        """The greedy reply to ``question`` with the current adapter (or none) and no document in the prompt."""
        from d2l_jax.data.examples import student_messages

        lora = self.adapter.lora if self.adapter is not None else None
        [reply] = self.d2l.base.generate(student_messages(question), max_new_tokens=self.max_new_tokens, lora=lora)
        return reply

    def handle(self, line: str) -> tuple[str | None, bool]:
        """(what to print or None, whether to go on) for one input line. Bad commands and errors from
        the library (missing file, too long question) become messages; the session goes on."""
        line = line.strip()
        if not line:
            return None, True
        if not line.startswith("/"):
            try:
                return self.ask(line), True
            except ValueError as error:
                return f"[error: {error}]", True
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        if command == "/quit":
            return None, False
        if command == "/help":
            return HELP, True
        if command == "/reset":
            return self.reset(), True
        if command == "/scale":
            try:
                scale = float(argument)
            except ValueError:
                return f"[error: /scale needs a number, got {argument!r}]", True
            try:
                return self.set_scale(scale), True
            except ValueError as error:
                return f"[error: {error}; the scale stays {self.scale:g}]", True
        if command == "/doc":
            if not argument:
                return "[error: /doc needs a file name]", True
            path = Path(argument).expanduser()
            try:
                return self.load_document(path.read_text(), str(path)), True
            except (OSError, ValueError) as error:
                return f"[error: {error}]", True
        return f"[unknown command {command}; {HELP}]", True


def _finite_scale(scale: float) -> float:
    if not math.isfinite(scale):
        raise ValueError(f"the scale must be a finite number, got {scale!r}")
    return float(scale)


def chat_loop(session: ChatSession, input_stream: TextIO, output_stream: TextIO, prompt: str = "> ") -> None:
    """Reads lines from ``input_stream`` until ``/quit`` or its end, writing the replies to ``output_stream``."""
    while True:
        output_stream.write(prompt)
        output_stream.flush()
        line = input_stream.readline()
        if not line:
            output_stream.write("\n")
            return
        text, go_on = session.handle(line)
        if text is not None:
            output_stream.write(text + "\n")
            output_stream.flush()
        if not go_on:
            return


def main(argv):
    del argv
    from d2l_jax.api import D2L

    logging.set_verbosity(logging.WARNING)  # checkpoint-restore chatter would interleave with the dialogue
    d2l = D2L.load(_CHECKPOINT.value, step=_STEP.value)
    session = ChatSession(d2l, max_new_tokens=_MAX_NEW_TOKENS.value, scale=_SCALE.value)
    print(f"D2L on {d2l.base.name}; {HELP}")
    if _DOC.value:
        path = Path(_DOC.value)
        print(session.load_document(path.read_text(), str(path)))
    chat_loop(session, sys.stdin, sys.stdout)


if __name__ == "__main__":
    app.run(main)
