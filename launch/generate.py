r"""Replies to a prompt with a base model (optionally with a document placed before the prompt).

  python -m launch.generate --model=smollm2-135m-instruct \
      --prompt="The vault code is 4817. What is the vault code?"
"""

from pathlib import Path

from absl import app, flags

import d2l_jax
from launch import run

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Embedded model name, .gguf file or HF directory.")
_PROMPT = flags.DEFINE_string("prompt", None, "The user message.", required=True)
_DOCUMENT = flags.DEFINE_string("document", None, "Optional text file whose contents precede the prompt.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Maximum number of generated tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 for greedy decoding.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with temperature > 0).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")


def read_document(path: str) -> str:
    """The text of the document file ``path``, stripped. Raises ValueError for an empty path or a file that
    is empty or only whitespace (it would silently leave the prompt without its document), and
    FileNotFoundError when there is no such file."""
    if not path:
        raise ValueError("--document= names no file; give a text file or leave the flag out")
    text = Path(path).read_text()
    if not text.strip():
        raise ValueError(f"--document={path} is empty" + (" (only whitespace)" if text else ""))
    return text.strip()


def main(argv):
    del argv
    prompt = _PROMPT.value
    if _DOCUMENT.value is not None:
        try:
            prompt = read_document(_DOCUMENT.value) + "\n\n" + prompt
        except (OSError, ValueError) as error:
            raise app.UsageError(str(error)) from error
    model = d2l_jax.load_base_model(_MODEL.value, dtype=_DTYPE.value)
    [reply] = model.generate(
        prompt, max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value, seed=_SEED.value
    )
    print(reply)


if __name__ == "__main__":
    run(main)
