"""The web demo: paste or upload a document, D2L internalizes it, then chat with it not in the prompt.

    python -m launch.demo --pretrained=smollm2-135m-niah [--port=7860 --host=127.0.0.1]
    python -m launch.demo --checkpoint=DIR [--step=N --doc=FILE --scale=1.0 --bias_scale=1.0 --system=TEXT]

The reference's demo on this project, built with Gradio on ``d2l_jax.session.ChatSession`` (the session
``launch.chat`` drives from a terminal): a context box (paste, or upload a text file; long documents are
chunked by the library), context-scaling and bias-scaler sliders, an editable system message, a multi-turn
chat answered with the internalized adapter, a reset button, and the internalization time and adapter size.
Each browser tab has its own session; all share one D2L and run one at a time. The flags are
``launch.chat``'s (``--doc`` fills the context box; ``--scale``, ``--bias_scale`` and ``--system`` set the
sliders and the system message) plus ``--host`` and ``--port``.

The page's functions are also an API (``gradio_client``): ``/load_file``, ``/internalize``, ``/set_scale``,
``/ask``, ``/clear`` and ``/reset``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags, logging

from launch import check_model_flags, load_d2l, run
from launch.chat import read_document, session_flags

# The model, document and session flags are launch.chat's (--pretrained, --checkpoint, --step, --doc, --scale,
# --bias_scale, --system, --max_new_tokens): importing it defines them, and a flag can be defined only once.
FLAGS = flags.FLAGS
_HOST = flags.DEFINE_string("host", "127.0.0.1", "address to serve on (0.0.0.0 for every interface)")
_PORT = flags.DEFINE_integer("port", 7860, "port to serve on")

SCALE_RANGE = (-2.0, 2.0)  # the reference demo's slider range, for both scalers
NO_DOCUMENT = "No document internalized: the base model answers alone."
INTRO = """# Doc-to-LoRA
Paste a document (or upload a text file) and press **Internalize**: the hypernetwork turns it into a LoRA
adapter in one forward pass. The chat on the right is then answered by the base model patched with that
adapter, and **the document is not in its prompt**: only the system message and the conversation are.
"""


def status_markdown(session) -> str:
    """What the page shows about the current document: its size, the adapter's and the time it took."""
    last = session.last
    if last is None:
        return NO_DOCUMENT
    from d2l_jax.session import format_bytes

    return (
        f"**Internalized** {last.name}: {last.num_tokens} tokens in {last.num_chunks} chunks, "
        f"in **{last.seconds:.2f} s**. Adapter: rank {last.rank}, **{format_bytes(last.num_bytes)}** "
        f"(scale {last.scale:g}, bias scale {last.bias_scale:g})."
    )


def build_demo(
    d2l, document: str = "", max_new_tokens: int = 128, scale: float = 1.0, bias_scale: float = 1.0, system_message: str = ""
):
    """The demo page (a ``gradio.Blocks``) for ``d2l``: ``document`` in the context box, the sliders at
    ``scale`` and ``bias_scale``, and ``system_message`` in its box; replies of at most ``max_new_tokens``.

    Each browser session gets its own ``ChatSession`` on first use; the model's events share one queue
    (one at a time), so sessions never run the model concurrently. Library errors (an empty document or
    question, a conversation longer than the model's context) are shown as Gradio errors.
    """
    import gradio as gr

    from d2l_jax.session import ChatSession

    def session_of(state: ChatSession | None) -> ChatSession:
        return state if state is not None else ChatSession(d2l, max_new_tokens, scale, bias_scale, system_message)

    def failing(error: Exception):
        return gr.Error(str(error), print_exception=False)

    def load_file(path: str | None) -> str:
        if not path:
            return ""
        try:
            return Path(path).read_text()
        except UnicodeDecodeError:
            raise gr.Error(f"{Path(path).name} is not a UTF-8 text file", print_exception=False) from None

    def internalize(context: str, scale: float, bias_scale: float, state):
        session = session_of(state)
        try:
            session.internalize(context or "", "the context", scale, bias_scale)
        except (TypeError, ValueError) as error:
            raise failing(error) from None
        return status_markdown(session), session.history, session

    def set_scale(scale: float, bias_scale: float, state):
        session = session_of(state)
        try:
            session.set_scale(scale, bias_scale)
        except ValueError as error:
            raise failing(error) from None
        return status_markdown(session), session

    def ask(question: str, system_message: str, scale: float, bias_scale: float, state):
        session = session_of(state)
        session.system_message = system_message or ""
        try:
            session.set_scale(scale, bias_scale)
            session.ask(question or "")
        except ValueError as error:
            raise failing(error) from None
        return session.history, "", status_markdown(session), session

    def clear(state):
        session = session_of(state)
        session.clear_history()
        return session.history, session

    def reset(state):
        session = session_of(state)
        session.reset()
        return status_markdown(session), session.history, "", session

    model = {"concurrency_id": "model", "concurrency_limit": 1}
    with gr.Blocks(title="Doc-to-LoRA") as demo:
        state = gr.State(None)  # the ChatSession, created on first use (a State's initial value is deep-copied)
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                context = gr.Textbox(
                    value=document, label="Context", info="internalized by the hypernetwork, never put in the prompt",
                    lines=12, max_lines=20,
                )
                upload = gr.File(label="or upload a text file", file_types=[".txt", ".md"], type="filepath", height=90)
                scale_slider = gr.Slider(
                    *SCALE_RANGE, value=scale, step=0.01, label="Context scaling", info="multiplies every chunk's A"
                )
                bias_slider = gr.Slider(
                    *SCALE_RANGE, value=bias_scale, step=0.01, label="Bias scaler",
                    info="multiplies the learned bias LoRA (independent of the context)",
                )
                with gr.Row():
                    internalize_button = gr.Button("Internalize", variant="primary")
                    reset_button = gr.Button("Reset")
                status = gr.Markdown(NO_DOCUMENT, label="Status")
            with gr.Column(scale=2):
                system_box = gr.Textbox(
                    value=system_message, label="System message", info="sent to the base model with the conversation", lines=1
                )
                chatbot = gr.Chatbot(
                    label="Conversation", height=420, placeholder="Answered with the adapter; the document is not in the prompt."
                )
                with gr.Row():
                    question = gr.Textbox(label="Your message", placeholder="Ask about the document", scale=4)
                    send_button = gr.Button("Send", variant="primary", scale=1)
                clear_button = gr.Button("Clear conversation", size="sm")

        upload.upload(load_file, [upload], [context], api_name="load_file")
        internalize_button.click(
            internalize, [context, scale_slider, bias_slider, state], [status, chatbot, state], api_name="internalize", **model
        )
        for slider in (scale_slider, bias_slider):
            api_name = "set_scale" if slider is scale_slider else False
            slider.release(set_scale, [scale_slider, bias_slider, state], [status, state], api_name=api_name, **model)
        ask_inputs, ask_outputs = [question, system_box, scale_slider, bias_slider, state], [chatbot, question, status, state]
        send_button.click(ask, ask_inputs, ask_outputs, api_name="ask", **model)
        question.submit(ask, ask_inputs, ask_outputs, api_name=False, **model)
        clear_button.click(clear, [state], [chatbot, state], api_name="clear")
        reset_button.click(reset, [state], [status, chatbot, context, state], api_name="reset", **model)
    return demo


def serve(d2l, host: str = "127.0.0.1", port: int = 7860, block: bool = True, **page):
    """Builds the demo for ``d2l`` (``page``: ``build_demo``'s keyword arguments) and serves it at
    ``http://host:port``; returns the Blocks, already serving, when ``block`` is False, else serves until
    interrupted. Raises OSError when the port is taken."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    demo = build_demo(d2l, **page)
    demo.queue()
    demo.launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block, share=False, ssr_mode=False, show_error=True
    )
    return demo


def main(argv):
    """Loads the D2L named by the flags and serves the demo."""
    try:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        check_model_flags(FLAGS.pretrained, FLAGS.checkpoint, FLAGS.step)
        if not 0 < _PORT.value < 65536:
            raise app.UsageError(f"--port must be in 1..65535, got {_PORT.value}")
        document = read_document(FLAGS.doc, "doc") if FLAGS.doc else ""
        session_args = session_flags(FLAGS.scale, FLAGS.bias_scale, FLAGS.max_new_tokens, FLAGS.system)
        logging.set_verbosity(logging.WARNING)
        print("loading the D2L ...", file=sys.stderr, flush=True)
        d2l = load_d2l(FLAGS.pretrained, FLAGS.checkpoint, FLAGS.step)
    except app.UsageError as error:
        sys.exit(f"launch.demo: {error}")
    print(f"D2L on {d2l.base.name}: serving on http://{_HOST.value}:{_PORT.value} (the first internalization also compiles)", flush=True)
    try:
        serve(d2l, _HOST.value, _PORT.value, document=document, **session_args)
    except OSError as error:
        sys.exit(f"launch.demo: cannot serve on {_HOST.value}:{_PORT.value}: {error}")


if __name__ == "__main__":
    run(main)
