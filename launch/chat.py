"""Talk to a document without it being in the prompt: D2L internalizes it, then answers questions.

    python -m launch.chat --pretrained=smollm2-135m-niah --doc=docs/examples/haystack.txt
    python -m launch.chat --checkpoint=DIR --doc=FILE [--scale=1.0 --bias_scale=1.0 --max_new_tokens=128]

Every line is a question, answered greedily by the base model with the document's adapter; the prompt holds
the system message and the conversation so far, never the document (``d2l_jax.session.ChatSession``, which
``launch.demo`` shares). Commands:

    /doc FILE      internalize another document (replaces the current one; a new conversation starts)
    /scale X       scale the document's update (multiplies every chunk's A by X; the bias LoRA is left alone)
                   and internalize it again; 0 leaves only the learned bias adapter
    /bias X        scale the learned bias LoRA (both factors) and internalize again
    /system TEXT   set the system message (empty without TEXT)
    /clear         forget the conversation, keep the document
    /reset         forget the document and the conversation: the base model answers alone
    /help          list the commands
    /quit          leave (end of input does too)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from absl import app, flags, logging

from launch import check_model_flags, load_d2l, run

if TYPE_CHECKING:  # the library loads in main, after the flags are checked
    from d2l_jax.session import ChatSession

_PRETRAINED = flags.DEFINE_string("pretrained", None, "pretrained name or directory (instead of --checkpoint)")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir (or its checkpoints/ folder)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (latest by default; with --checkpoint)")
_DOC = flags.DEFINE_string("doc", None, "text file to internalize at the start")
_SCALE = flags.DEFINE_float("scale", 1.0, "adapter scaler (multiplies every chunk's A)")
_BIAS_SCALE = flags.DEFINE_float("bias_scale", 1.0, "bias LoRA scaler (multiplies both of its factors)")
_SYSTEM = flags.DEFINE_string("system", "", "system message of every prompt")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "longest reply in tokens")

HELP = "commands: /doc FILE, /scale X, /bias X, /system TEXT, /clear, /reset, /help, /quit; anything else is a question"


def status(session: ChatSession) -> str:
    """The bracketed line printed after an internalization (or a scale change without a document)."""
    if session.last is None:
        return f"[scale {session.scale:g}, bias scale {session.bias_scale:g}; they apply to the next document]"
    return f"[{session.last.summary()}]"


def _parse_scale(session: ChatSession, command: str, argument: str, keyword: str) -> str:
    current = session.scale if keyword == "scale" else session.bias_scale
    try:
        value = float(argument)
    except ValueError:
        return f"[error: {command} needs a number, got {argument!r}]"
    try:
        session.set_scale(**{keyword: value})
    except ValueError as error:
        return f"[error: {error}; the {keyword.replace('_', ' ')} stays {current:g}]"
    return status(session)


def handle(session: ChatSession, line: str) -> tuple[str | None, bool]:
    """(what to print or None, whether to go on) for one input line. Bad commands and errors from the
    library (missing file, empty document, a conversation too long for the model) become messages; the
    session goes on."""
    line = line.strip()
    if not line:
        return None, True
    if not line.startswith("/"):
        try:
            return session.ask(line), True
        except ValueError as error:
            return f"[error: {error}]", True
    command, _, argument = line.partition(" ")
    argument = argument.strip()
    if command == "/quit":
        return None, False
    if command == "/help":
        return HELP, True
    if command == "/reset":
        session.reset()
        return "[document forgotten, and the conversation: the base model answers alone]", True
    if command == "/clear":
        session.clear_history()
        return "[conversation forgotten; the document stays internalized]", True
    if command == "/system":
        session.system_message = argument
        return f"[system message: {argument!r}]", True
    if command in ("/scale", "/bias"):
        return _parse_scale(session, command, argument, "scale" if command == "/scale" else "bias_scale"), True
    if command == "/doc":
        if not argument:
            return "[error: /doc needs a file name]", True
        path = Path(argument).expanduser()
        try:
            session.internalize(path.read_text(), str(path))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            return f"[error: {error}]", True
        return status(session), True
    return f"[unknown command {command}; {HELP}]", True


def chat_loop(session: ChatSession, input_stream: TextIO, output_stream: TextIO, prompt: str = "> ") -> None:
    """Reads lines from ``input_stream`` until ``/quit`` or its end, writing the replies to ``output_stream``."""
    while True:
        output_stream.write(prompt)
        output_stream.flush()
        line = input_stream.readline()
        if not line:
            output_stream.write("\n")
            return
        text, go_on = handle(session, line)
        if text is not None:
            output_stream.write(text + "\n")
            output_stream.flush()
        if not go_on:
            return


def read_document(path: str, flag: str) -> str:
    """The text of ``path``; app.UsageError naming ``flag`` when it is missing, unreadable or not text."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise app.UsageError(f"--{flag}={path}: {getattr(error, 'strerror', None) or error}") from None


def session_flags(scale: float, bias_scale: float, max_new_tokens: int, system_message: str) -> dict:
    """``ChatSession`` keyword arguments from flags, checked before anything loads (the library is slow to
    import); app.UsageError for a scale that is not finite or a max_new_tokens below 1."""
    for flag, value in (("scale", scale), ("bias_scale", bias_scale)):
        if not math.isfinite(value):
            raise app.UsageError(f"--{flag} must be a finite number, got {value}")
    if max_new_tokens < 1:
        raise app.UsageError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    return {"max_new_tokens": max_new_tokens, "scale": scale, "bias_scale": bias_scale, "system_message": system_message}


def main(argv):
    """Loads the D2L, internalizes ``--doc`` and chats on standard input and output."""
    try:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        check_model_flags(_PRETRAINED.value, _CHECKPOINT.value, _STEP.value)
        text = read_document(_DOC.value, "doc") if _DOC.value else None
        session_args = session_flags(_SCALE.value, _BIAS_SCALE.value, _MAX_NEW_TOKENS.value, _SYSTEM.value)
        logging.set_verbosity(logging.WARNING)  # checkpoint-restore chatter would interleave with the dialogue
        print("loading the D2L ...", file=sys.stderr, flush=True)
        d2l = load_d2l(_PRETRAINED.value, _CHECKPOINT.value, _STEP.value)
        from d2l_jax.session import ChatSession

        session = ChatSession(d2l, **session_args)
        print(f"D2L on {d2l.base.name}; {HELP}")
        if text is not None:
            print(f"internalizing {_DOC.value} (the first document also compiles) ...", file=sys.stderr, flush=True)
            try:
                session.internalize(text, _DOC.value)
            except ValueError as error:
                raise app.UsageError(f"--doc={_DOC.value}: {error}") from None
            print(status(session))
    except app.UsageError as error:
        sys.exit(f"launch.chat: {error}")  # one line, exit status 1
    chat_loop(session, sys.stdin, sys.stdout)


if __name__ == "__main__":
    run(main)
