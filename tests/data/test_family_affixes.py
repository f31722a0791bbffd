"""Document affixes per model family: the prefix and suffix that ``document_affixes`` derives from a chat
template render to the reference's chunk affixes (``CTX_AFFIXES`` of its data/definitions.py, reference-facts
sections 5 and 7.1), and every chunk of a split document is a complete user turn.

No hub access: each family's tokenizer is a byte-level BPE without merges (every text round-trips exactly)
with the family's special tokens, and the chat template is set as a string. The "reference" templates
render as the reference's chat_templates/*.jinja do after its ``get_tokenizer`` removes every 4-space run
and newline of the file; the "stock" ones as the models' own Hugging Face templates.
"""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from d2l_jax.data.chunking import chunk_document, document_affixes, tokenize_document

# The reference's CTX_AFFIXES as text (the ids it lists, decoded by each model's tokenizer).
GEMMA2 = ("<bos><start_of_turn>user\n\n\n", "<end_of_turn>\n<start_of_turn>model\n")  # [2,106,1645,110] / [107,108,106,2516,108]
QWEN3 = ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
MISTRAL = ("<s> [INST] \n\n", " [/INST]")  # [1,733,16289,28793,28705,13,13] / [733,28748,16289,28793]

# Gemma-2, the reference's template: an optional system message joins the first user turn as
# system + "\n\n" + content (content trimmed), the assistant turn is "model", generation prompt "model\n".
GEMMA2_REFERENCE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set turns = messages %}{%- endif %}"
    "{%- for m in turns %}{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{%- if m['role'] == 'user' and loop.first and system is defined %}"
    "{{ '<start_of_turn>' + role + '\\n' + system + '\\n\\n' + m['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- else %}{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
)
# Gemma-2, Google's own template: no system role at all (it raises).
GEMMA2_STOCK = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# Qwen3-4B-Instruct-2507 (the reference's template and the stock one agree here): ChatML, a system turn
# even when empty, generation prompt "<|im_start|>assistant\n".
QWEN3_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _mistral(closing: str) -> str:
    """Mistral-7B-Instruct-v0.2: bos, then " [INST] " + system + "\\n\\n" + content + ``closing``; no
    generation prompt (the [/INST] closes the user turn). The reference's file closes with " [/INST] ",
    the stock template with " [/INST]"."""
    return (
        "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
        "{%- else %}{%- set turns = messages %}{%- endif %}{{- bos_token }}"
        "{%- for m in turns %}{%- if m['role'] == 'user' %}"
        "{%- if loop.first and system is defined %}{{- ' [INST] ' + system + '\\n\\n' + m['content'] + '" + closing + "' }}"
        "{%- else %}{{- ' [INST] ' + m['content'] + '" + closing + "' }}{%- endif %}"
        "{%- else %}{{- m['content'] + eos_token }}{%- endif %}{%- endfor %}"
    )


def _tokenizer(template: str, bos: str | None, eos: str, specials: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE without merges (one token per byte, exact round trip) with the family's special
    tokens as single tokens and ``template`` as its chat template."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    model = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=model, bos_token=bos, eos_token=eos, additional_special_tokens=specials)
    tok.chat_template = template
    return tok


FAMILIES = {
    "gemma2-reference": (lambda: _tokenizer(GEMMA2_REFERENCE, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]), GEMMA2),
    "gemma2-stock": (lambda: _tokenizer(GEMMA2_STOCK, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]), GEMMA2),
    "qwen3": (lambda: _tokenizer(QWEN3_TEMPLATE, None, "<|im_end|>", ["<|im_start|>"]), QWEN3),
    "mistral-stock": (lambda: _tokenizer(_mistral(" [/INST]"), "<s>", "</s>", []), MISTRAL),
    # The reference's own Mistral file ends the user turn with one more space than its CTX_AFFIXES ids
    # (whose comment writes " [/INST] "): the whole-context tokens it trains on end with that space.
    "mistral-reference": (lambda: _tokenizer(_mistral(" [/INST] "), "<s>", "</s>", []), (MISTRAL[0], MISTRAL[1] + " ")),
}


def _text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_affixes_render_to_the_reference_text(family):
    make, (prefix, suffix) = FAMILIES[family]
    tok = make()
    derived_prefix, derived_suffix = document_affixes(tok)
    assert (_text(tok, derived_prefix), _text(tok, derived_suffix)) == (prefix, suffix)
    # Special tokens stay single tokens: the ids are the model's own for them, not their spelling.
    for special in tok.all_special_tokens:
        if special in prefix + suffix:
            assert tok.convert_tokens_to_ids(special) in derived_prefix + derived_suffix


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_document_is_the_reference_context_and_each_chunk_a_user_turn(family):
    make, (prefix, suffix) = FAMILIES[family]
    tok = make()
    affixes = document_affixes(tok)
    document = " ".join(f"word{i}" for i in range(60))
    ids = tokenize_document(tok, f"  {document}\n", affixes)
    assert _text(tok, ids) == prefix + document + suffix  # the reference strips the context
    chunks = chunk_document(ids, affixes, max_chunk_len=150)
    assert len(chunks) > 2 and all(len(c) <= 150 for c in chunks)
    texts = [_text(tok, c) for c in chunks]
    assert all(t.startswith(prefix) and t.endswith(suffix) for t in texts)
    assert "".join(t[len(prefix) : len(t) - len(suffix)] for t in texts) == document


def test_the_folded_system_separator_is_only_for_templates_without_a_system_role():
    """A template that accepts a system turn renders it itself (no extra separator); one that places the
    user message other than verbatim is refused."""
    tok = _tokenizer(QWEN3_TEMPLATE, None, "<|im_end|>", ["<|im_start|>"])
    prefix, _ = document_affixes(tok)
    assert not _text(tok, prefix).endswith("\n\n")
    tok.chat_template = "{% for m in messages %}{{ m['content'] | lower }}{% endfor %}"
    with pytest.raises(ValueError, match="does not place the user message verbatim"):
        document_affixes(tok)
