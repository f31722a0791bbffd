"""The reference's main experiment (stage 1) on its own main base model, gemma-2-2b-it.

This is the configuration of the published checkpoints (reference-facts sections 6.3 and 9.1): per-layer
activations of all 26 layers, a Perceiver of 8 latents x 9 blocks at width 512, rank-8 ``down_proj``
adapters on every layer (a hypernetwork of 315,237,792 parameters), top-16 KL to offline teacher
log-probabilities, L1 0.1, 80k steps. See ``experiments/reference.py`` for how the reference's packed rows
map onto this trainer's batches. ``model`` is the published architecture (enough for
``launch.compile_tpu``); to train, point it at the weights: ``--config.model=/path/to/gemma-2-2b-it``
(a Hugging Face directory).
"""

from experiments.reference import main_experiment


def get_config():
    return main_experiment("gemma-2-2b-it")
