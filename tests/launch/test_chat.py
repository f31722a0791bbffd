"""The chat loop: questions, /scale, /reset, /doc and /quit on a tiny random D2L, from scripted input."""

import io
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import d2l_jax
from d2l_jax.data.examples import student_messages
from d2l_jax.models.base_model import BaseModel
from d2l_jax.models.decoder import Decoder
from d2l_jax.models.families import DecoderConfig
from d2l_jax.session import ChatSession
from launch.chat import chat_loop, handle

TINY_BASE = DecoderConfig(
    vocab_size=49152, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512
)
TINY_HYPER = d2l_jax.HypernetConfig(
    encoder_type="early_exit", latent_size=32, n_latent_queries=4, num_blocks=1, num_heads=4, head_dim=8, num_kv_heads=2,
    lora_rank=2, max_chunk_len=64, max_chunks=2,
)
FIRST = "The vault code is 4817 and the vault is in Lisbon, near the river. " * 6
SECOND = "Marie planted tulips in March. They bloomed red and yellow in late April."
QUESTION = "What is the vault code?"
REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_d2l(smollm2):
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = nn.unbox(Decoder(TINY_BASE).init(jax.random.key(1), tokens, tokens, tokens + 1))["params"]
    base = BaseModel("tiny", TINY_BASE, params, smollm2.tokenizer, smollm2.stop_token_ids)
    d2l = d2l_jax.D2L.create(base, TINY_HYPER, seed=0)
    key = jax.random.key(0)
    for name in list(d2l.params["head"]):  # non-zero B, as after training
        if name.startswith(("scaler_B", "bias_B")):
            key, sub = jax.random.split(key)
            d2l.params["head"][name] = jax.random.normal(sub, d2l.params["head"][name].shape)
    return d2l


@pytest.fixture
def docs(tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text(FIRST)
    second.write_text(SECOND)
    return first, second


def base_reply(d2l, question, lora=None):
    return d2l.base.generate(student_messages(question), max_new_tokens=8, lora=lora)[0]


def test_commands_change_the_session(tiny_d2l, docs):
    first, second = docs
    session = ChatSession(tiny_d2l, max_new_tokens=8)
    text, go_on = handle(session, f"/doc {first}")
    assert go_on and text.startswith(f"[internalized {first}")
    chunks, tokens = tiny_d2l.document_chunks(FIRST)
    assert len(chunks) > TINY_HYPER.max_chunks  # a document longer than one pass of the hypernetwork
    assert (session.adapter.num_tokens, session.adapter.num_chunks) == (tokens, len(chunks))
    unscaled = np.asarray(session.adapter.A["down_proj"])
    reply, _ = handle(session, QUESTION)
    assert reply == base_reply(tiny_d2l, QUESTION, session.adapter.lora)

    text, go_on = handle(session, "/scale 2.5")
    assert go_on and "scale 2.5" in text and session.scale == 2.5
    chunk_ranks = len(chunks) * TINY_HYPER.lora_rank
    scaled = np.asarray(session.adapter.A["down_proj"])
    np.testing.assert_allclose(scaled[:, :, :chunk_ranks], 2.5 * unscaled[:, :, :chunk_ranks], rtol=1e-6)
    np.testing.assert_array_equal(scaled[:, :, chunk_ranks:], unscaled[:, :, chunk_ranks:])  # bias LoRA and padding
    text, _ = handle(session, "/scale abc")
    assert text.startswith("[error: /scale needs a number") and session.scale == 2.5

    text, go_on = handle(session, "/reset")
    assert go_on and session.adapter is None and session.document is None
    reply, _ = handle(session, QUESTION)
    assert reply == base_reply(tiny_d2l, QUESTION)  # the base model alone

    handle(session, f"/doc {second}")
    assert session.document == SECOND and session.document_name == str(second)
    assert session.adapter.num_tokens == tiny_d2l.document_chunks(SECOND)[1]
    assert session.scale == 2.5  # the scaler carries over to the next document
    assert tiny_d2l.adapter is None  # the session passes its adapter explicitly; the D2L's stays unset

    text, go_on = handle(session, "/doc /no/such/file.txt")
    assert go_on and text.startswith("[error:") and session.document == SECOND
    text, go_on = handle(session, "/quit")
    assert text is None and not go_on


def test_loop_reads_until_quit(tiny_d2l, docs):
    first, second = docs
    script = "\n".join([f"/doc {first}", QUESTION, "/bogus", "", "/reset", QUESTION, f"/doc {second}", "/quit", "never read"]) + "\n"
    out = io.StringIO()
    session = ChatSession(tiny_d2l, max_new_tokens=8)
    chat_loop(session, io.StringIO(script), out)
    lines = out.getvalue().split("> ")
    assert lines[0] == ""
    answers = lines[1:]
    assert len(answers) == 8  # one prompt per line read, through /quit
    assert answers[0].startswith(f"[internalized {first}")
    assert answers[2].startswith("[unknown command /bogus")
    assert answers[3] == ""  # an empty line prints nothing
    assert answers[4].startswith("[document forgotten")
    assert answers[5] == base_reply(tiny_d2l, QUESTION) + "\n"
    assert answers[6].startswith(f"[internalized {second}") and answers[7] == ""
    assert "never read" not in out.getvalue() and session.document == SECOND


def test_loop_stops_at_end_of_input(tiny_d2l):
    out = io.StringIO()
    chat_loop(ChatSession(tiny_d2l, max_new_tokens=4), io.StringIO("/help\n"), out)
    assert out.getvalue().startswith("> commands: /doc FILE") and out.getvalue().endswith("> \n")


@pytest.mark.parametrize("argument", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_scale_must_be_a_finite_number(tiny_d2l, docs, argument):
    first, _ = docs
    session = ChatSession(tiny_d2l, max_new_tokens=4)
    handle(session, f"/doc {first}")
    adapter = session.adapter
    text, go_on = handle(session, f"/scale {argument}")
    assert go_on and text.startswith("[error: the scale must be a finite number, got ") and text.endswith("; the scale stays 1]")
    assert session.scale == 1.0 and session.adapter is adapter  # nothing re-internalized
    with pytest.raises(ValueError, match="the scale must be a finite number, got nan"):
        ChatSession(tiny_d2l, scale=float("nan"))


@pytest.mark.parametrize("content, message", [("", "is empty"), (" \n\t\n", r"is empty \(only whitespace\)")])
def test_generate_refuses_an_empty_document(tmp_path, content, message):
    # A subprocess: launch.generate and launch.chat define flags of the same name.
    document = tmp_path / "document.txt"
    document.write_text(content)
    command = [sys.executable, "-m", "launch.generate", "--prompt=What is the vault code?", f"--document={document}"]
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and re.search(rf"--document={re.escape(str(document))} {message}", result.stderr), result.stderr


def test_conversation_system_message_bias_scale_and_clear(tiny_d2l, docs):
    first, _ = docs
    session = ChatSession(tiny_d2l, max_new_tokens=8)
    handle(session, f"/doc {first}")
    lora = session.adapter.lora
    reply, _ = handle(session, QUESTION)
    follow_up = "And where is it?"
    second, _ = handle(session, follow_up)  # the first turn is in the prompt, the document is not
    conversation = student_messages(QUESTION) + [{"role": "assistant", "content": reply}, {"role": "user", "content": follow_up}]
    assert second == tiny_d2l.base.generate([conversation], max_new_tokens=8, lora=lora)[0]
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2

    text, _ = handle(session, "/clear")
    assert text.startswith("[conversation forgotten") and session.history == [] and session.adapter.lora is lora
    text, _ = handle(session, "/system Answer with one word.")
    assert session.system_message == "Answer with one word."
    reply, _ = handle(session, QUESTION)
    prompt = [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": QUESTION}]
    assert reply == tiny_d2l.base.generate([prompt], max_new_tokens=8, lora=lora)[0]

    text, _ = handle(session, "/bias 0")
    assert "bias scale 0" in text and session.bias_scale == 0.0 and len(session.history) == 2  # the conversation goes on
    chunk_ranks = session.adapter.num_chunks * TINY_HYPER.lora_rank
    np.testing.assert_array_equal(np.asarray(session.adapter.A["down_proj"])[:, :, chunk_ranks:], 0.0)  # no bias LoRA
    text, _ = handle(session, "/bias inf")
    assert text == "[error: the bias scale must be a finite number, got inf; the bias scale stays 0]"
    text, _ = handle(session, "/doc " + str(first))
    assert session.history == [] and "bias scale 0" in text  # a new document starts a new conversation


def test_chat_launcher_errors_are_one_line():
    for flags, message in [
        (["--checkpoint=/no/such/run"], "--checkpoint=/no/such/run: no such directory"),
        (["--pretrained=smollm2-135m-niah", "--checkpoint=/tmp"], "give exactly one of --pretrained and --checkpoint"),
        (["--pretrained=no-such-name"], "--pretrained=no-such-name: no pretrained hypernetwork 'no-such-name'"),
    ]:
        command = [sys.executable, "-m", "launch.chat", *flags]
        result = subprocess.run(command, check=False, cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
        lines = [line for line in result.stderr.splitlines() if line != "loading the D2L ..."]
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"launch.chat: {message}"), result.stderr
