"""The reference's main experiment (stage 1) with a 7B Llama-architecture target: Mistral-7B-Instruct-v0.2.

See ``experiments/reference.py`` for how the reference's packed rows map onto this trainer's batches.
``model`` is the published architecture (enough for ``launch.compile_tpu``); to train, point it at the
weights: ``--config.model=/path/to/Mistral-7B-Instruct-v0.2`` (a Hugging Face directory).
"""

from experiments.reference import main_experiment


def get_config():
    return main_experiment("mistral-7b-instruct-v0.2")
