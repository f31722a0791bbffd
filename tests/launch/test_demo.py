"""The web demo for real: a Gradio server on a loopback port, driven with gradio_client through
load file -> internalize -> ask (several turns, a system message, a scale) -> reset, on a tiny random D2L
whose replies are recomputed here with the D2L's own ``generate``."""

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")

import d2l_jax
from d2l_jax.hypernet.adapter import adapter_bytes
from d2l_jax.session import format_bytes
from launch import demo
from tests.conftest import random_base, randomized
from tests.launch.test_chat import (  # the same programs as test_chat: compiled once
    FIRST,
    QUESTION,
    TINY_BASE,
    TINY_HYPER,
)

MAX_NEW_TOKENS = 8
FOLLOW_UP = "And where is the vault?"
REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_d2l(smollm2):
    return randomized(d2l_jax.D2L.create(random_base(TINY_BASE, smollm2, seed=1), TINY_HYPER, seed=0))


@pytest.fixture(scope="module")
def url(tiny_d2l):
    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    blocks = demo.serve(tiny_d2l, "127.0.0.1", port, block=False, max_new_tokens=MAX_NEW_TOKENS)
    yield f"http://127.0.0.1:{port}/"
    blocks.close()


def client(url):
    return gradio_client.Client(url, verbose=False, download_files=False)


def last_reply(chat):
    """The text of the chat's last assistant turn (Gradio sends each turn's content as typed parts)."""
    assert chat and chat[-1]["role"] == "assistant", chat
    content = chat[-1]["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content if part["type"] == "text")


def expected(d2l, turns, adapter=None, system=""):
    """The D2L's own greedy reply to the conversation ``turns`` (user, assistant, ..., user), as the page
    shows it (Gradio strips a message's surrounding whitespace; the session keeps it, and so the prompt)."""
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": "system", "content": system}] + [{"role": r, "content": t} for r, t in zip(roles, turns)]
    if adapter is None:
        return d2l.base.generate([messages], max_new_tokens=MAX_NEW_TOKENS)[0].strip()
    return d2l.generate([messages], adapter=adapter, max_new_tokens=MAX_NEW_TOKENS)[0].strip()


def test_internalize_ask_reset(tiny_d2l, url, tmp_path):
    page = client(url)
    document = tmp_path / "vault.txt"
    document.write_text(FIRST)
    assert page.predict(gradio_client.handle_file(str(document)), api_name="/load_file") == FIRST

    status, chat = page.predict(FIRST, 1.0, 1.0, api_name="/internalize")
    adapter = tiny_d2l.adapters([FIRST])[0]
    assert adapter.num_chunks > TINY_HYPER.max_chunks  # long enough to be chunked and segmented
    assert f"{adapter.num_tokens} tokens in {adapter.num_chunks} chunks" in status and chat == []
    assert f"rank {adapter.rank}, **{format_bytes(adapter_bytes(adapter))}**" in status
    assert re.search(r"in \*\*\d+\.\d\d s\*\*", status)

    chat, question_box, _ = page.predict(QUESTION, "", 1.0, 1.0, api_name="/ask")
    with_adapter = last_reply(chat)
    assert with_adapter == expected(tiny_d2l, [QUESTION], adapter) and question_box == ""
    chat, _, _ = page.predict(FOLLOW_UP, "", 1.0, 1.0, api_name="/ask")  # the first turn is in the prompt
    first_prompt = [{"role": "system", "content": ""}, {"role": "user", "content": QUESTION}]
    first_turn = tiny_d2l.generate([first_prompt], adapter=adapter, max_new_tokens=MAX_NEW_TOKENS)[0]  # unstripped, as in the prompt
    assert len(chat) == 4 and last_reply(chat) == expected(tiny_d2l, [QUESTION, first_turn, FOLLOW_UP], adapter)

    assert page.predict(api_name="/clear") == []
    chat, _, _ = page.predict(QUESTION, "Answer with one word.", 1.0, 1.0, api_name="/ask")
    assert last_reply(chat) == expected(tiny_d2l, [QUESTION], adapter, system="Answer with one word.")

    status = page.predict(0.0, 0.5, api_name="/set_scale")  # internalizes again; the conversation goes on
    assert "(scale 0, bias scale 0.5)" in status
    page.predict(api_name="/clear")
    chat, _, _ = page.predict(QUESTION, "", 0.0, 0.5, api_name="/ask")
    scaled = tiny_d2l.adapters([FIRST], scaler=0.0, bias_scaler=0.5)[0]
    assert last_reply(chat) == expected(tiny_d2l, [QUESTION], scaled)

    status, chat, context = page.predict(api_name="/reset")
    assert status == demo.NO_DOCUMENT and chat == [] and context == ""
    chat, _, status = page.predict(QUESTION, "", 1.0, 1.0, api_name="/ask")
    without = last_reply(chat)
    assert without == expected(tiny_d2l, [QUESTION]) and status == demo.NO_DOCUMENT  # the base model alone
    assert without != with_adapter  # the adapter changed the reply
    assert tiny_d2l.adapter is None  # the sessions pass their adapters explicitly


def test_sessions_are_separate_and_errors_are_shown(tiny_d2l, url):
    first, second = client(url), client(url)
    first.predict(FIRST, 1.0, 1.0, api_name="/internalize")
    chat, _, status = second.predict(QUESTION, "", 1.0, 1.0, api_name="/ask")  # another tab: no document
    assert status == demo.NO_DOCUMENT and last_reply(chat) == expected(tiny_d2l, [QUESTION])
    with pytest.raises(gradio_client.exceptions.AppError, match="the context is empty"):
        first.predict(" \n", 1.0, 1.0, api_name="/internalize")
    with pytest.raises(gradio_client.exceptions.AppError, match="the question is empty"):
        first.predict("  ", "", 1.0, 1.0, api_name="/ask")
    chat, _, status = first.predict(QUESTION, "", 1.0, 1.0, api_name="/ask")  # the failed calls changed nothing
    assert status.startswith("**Internalized**") and last_reply(chat) == expected(tiny_d2l, [QUESTION], tiny_d2l.adapters([FIRST])[0])


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "give exactly one of --pretrained and --checkpoint"),
        (["--pretrained=smollm2-135m-niah", "--doc=/no/such/file.txt"], "--doc=/no/such/file.txt: No such file or directory"),
        (["--pretrained=smollm2-135m-niah", "--bias_scale=inf"], "--bias_scale must be a finite number, got inf"),
    ],
)
def test_launcher_errors_are_one_line(flags, message):
    command = [sys.executable, "-m", "launch.demo", *flags]
    result = subprocess.run(command, check=False, cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr == f"launch.demo: {message}\n", result.stderr
