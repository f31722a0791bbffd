"""The reference's main experiment (stage 1) on SmolLM2-135M-Instruct, for comparison with the 7B target.

See ``experiments/reference.py`` for how the reference's packed rows map onto this trainer's batches.
"""

from experiments.reference import main_experiment


def get_config():
    return main_experiment("smollm2-135m-instruct")
