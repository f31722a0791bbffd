"""The reference's NIAH experiment at full size on SmolLM2-135M-Instruct, for comparison with the 7B target
(``experiments/niah_smollm2.py`` is the CPU-sized variant that was trained here).

See ``experiments/reference.py`` for how the reference's packed rows map onto this trainer's batches.
"""

from experiments.reference import niah_experiment


def get_config():
    return niah_experiment("smollm2-135m-instruct")
