"""The embedded SmolLM2-135M-Instruct: same model as transformers reads from the GGUF, usable for chat."""

import chex
import jax
import numpy as np
import torch

from d2l_jax.models import generate as gen
from tests.conftest import torch_logits

DOCUMENT = "The secret code of the vault is 4817. The vault is in Lisbon."


def chat_prompt(model, tokens: int) -> list[int]:
    words = []
    while True:
        ids = model.chat_ids([{"role": "user", "content": "Tell me about " + " ".join(words)}])
        if len(ids) >= tokens:
            assert len(ids) == tokens, "adjust the filler so the prompt lands on the length"
            return ids
        words.append("sea")  # one token per word


def test_logits_match_transformers(smollm2, smollm2_torch):
    ids = chat_prompt(smollm2, 64)
    chex.assert_trees_all_close(np.asarray(smollm2.logits([ids])), torch_logits(smollm2_torch, [ids]), atol=2e-3, rtol=0)


def test_greedy_continuation_matches_transformers(smollm2, smollm2_torch):
    ids = chat_prompt(smollm2, 64)
    tokens, mask = gen.left_pad([ids], 64, 1, pad_id=2)
    ours = gen.generate_tokens(
        smollm2.config, smollm2.params, tokens, mask, None, jax.random.key(0), np.array([-5], np.int32),
        np.float32(0), np.float32(1), np.int32(32), buffer=32,
    )
    with torch.no_grad():
        theirs = smollm2_torch.generate(
            torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=2
        )[0, 64:]
    assert np.asarray(ours)[0].tolist() == theirs.tolist()


def test_tokenizer_special_tokens_are_fixed(smollm2):
    tok = smollm2.tokenizer
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.pad_token_id == 2
    assert tok("hello")["input_ids"] == [28120]  # no BOS prepended
    assert 2 in smollm2.stop_token_ids
    ids = smollm2.chat_ids([{"role": "user", "content": "hi"}])
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_answers_from_document_in_prompt_and_stops_at_end_of_turn(smollm2):
    replies = smollm2.generate(
        [f"{DOCUMENT}\nWhat is the secret code of the vault?", "What is the capital of France?"], max_new_tokens=48
    )
    assert "4817" in replies[0]
    assert "Paris" in replies[1]
    assert all("<|im_end|>" not in r and "<|im_start|>" not in r for r in replies)
