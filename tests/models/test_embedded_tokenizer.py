"""The embedded model's tokenizer shipped in the package: the same as transformers' conversion of the GGUF
file, and loaded without torch (transformers reads a GGUF file's tokenizer only with torch installed)."""

from __future__ import annotations

import os
import subprocess
import sys

from transformers import PreTrainedTokenizerFast

from d2l_jax.models.base_model import EMBEDDED_TOKENIZERS, embedded_model_path, gguf_tokenizer
from d2l_jax.models.weights.gguf import gguf_metadata, open_gguf

SMOLLM2 = "smollm2-135m-instruct"
TEXTS = [
    "The five Departments of State did the work of the modern Ministry of Defence.",
    "  two leading spaces, a tab\there,\nnewlines\n\n\nand trailing spaces   ",
    "Numbers 4721, 3.14159, -0.5e10 and 1,000,000; dates 1946-1964.",
    "Ünïcödé: naïve café, Straße, 東京, Москва, 😀 emoji, ½ fraction",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # code",
    "Special tokens in text: <|im_start|>user\nhi<|im_end|><|endoftext|>",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the needle? The number is 4721."},
    {"role": "assistant", "content": "4721"},
    {"role": "user", "content": "Again?"},
]


def test_the_shipped_tokenizer_is_the_conversion_of_the_gguf_file():
    """Should a new transformers convert differently, ``base_model.save_embedded_tokenizer`` rewrites it."""
    path = embedded_model_path(SMOLLM2)
    converted = gguf_tokenizer(path, gguf_metadata(open_gguf(path)))
    shipped = PreTrainedTokenizerFast.from_pretrained(EMBEDDED_TOKENIZERS / SMOLLM2)
    assert shipped.get_vocab() == converted.get_vocab()
    assert shipped.all_special_tokens == converted.all_special_tokens
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(shipped, name) == getattr(converted, name), name
        assert getattr(shipped, f"{name}_id") == getattr(converted, f"{name}_id"), name
    for text in TEXTS:
        ids = converted(text)["input_ids"]
        assert shipped(text)["input_ids"] == ids, text
        assert shipped.decode(ids) == converted.decode(ids) == text
        assert shipped.decode(ids, skip_special_tokens=True) == converted.decode(ids, skip_special_tokens=True)
    for prompt in (False, True):
        rendered = converted.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=prompt)
        assert shipped.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=prompt) == rendered
        assert shipped(rendered, add_special_tokens=False)["input_ids"] == converted(rendered, add_special_tokens=False)["input_ids"]


def test_the_embedded_model_loads_and_chats_without_torch_while_other_gguf_files_name_what_they_need():
    script = f"""
import sys
sys.modules["torch"] = None  # as if torch were not installed
from d2l_jax.models.base_model import embedded_model_path, gguf_tokenizer, load_base_model
model = load_base_model({SMOLLM2!r})
print(model.tokenizer.decode(model.chat_ids([{{"role": "user", "content": "hi"}}])))
try:
    gguf_tokenizer(embedded_model_path({SMOLLM2!r}), {{}})
except ImportError as error:
    print("ImportError:", error)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ | {"JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "<|im_start|>user\nhi<|im_end|>" in result.stdout
    assert "ImportError: transformers reads the tokenizer of a GGUF file" in result.stdout and "pip install torch" in result.stdout
