"""The reference's NIAH experiment for Mistral-7B-Instruct-v0.2 at full size.

See ``experiments/reference.py`` for how the reference's packed rows map onto this trainer's batches.
``model`` is the published architecture (enough for ``launch.compile_tpu``); to train, point it at the
weights: ``--config.model=/path/to/Mistral-7B-Instruct-v0.2`` (a Hugging Face directory).
"""

from experiments.reference import niah_experiment


def get_config():
    return niah_experiment("mistral-7b-instruct-v0.2")
