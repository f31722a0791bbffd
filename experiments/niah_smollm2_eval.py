"""NIAH evaluation of the SmolLM2 D2L: from the trained lengths to 4x SmolLM2's 8192-token window.

    python -m launch.evaluate --config=experiments/niah_smollm2_eval.py --checkpoint=DIR --workdir=OUT

Bins are ``(lo, hi)`` document-token ranges (the document alone, without chat tokens). The first is the
training bin of ``experiments/niah_smollm2.py``; the 8128 bin is the longest whose in-context prompt
(chat tokens + question, about 40 tokens) and reply still fit the 8192 window; 16k and 32k are 2x and 4x
the window, where only D2L (chunked internalization), truncated in-context and the base model run.
Override on the command line, e.g. ``--config.sweep.samples_per_cell=1`` or
``--config.sweep.methods="('d2l', 'base')"``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.sweep = dict(
        bins=((32, 256), (896, 1024), (3584, 4096), (7168, 8128), (14336, 16384), (28672, 32768)),
        depths=tuple(range(10)),
        methods=("d2l", "icl", "truncated_icl", "base"),
        # Few documents per cell, the full grid: 10 depths x 2 = 20 documents per length and method.
        samples_per_cell=2,
        seed=0,
        split="test",
        max_new_tokens=16,
        batch_size=8,
        icl_batch_tokens=8192,
        # One document per bin for latency and memory: D2L, context distillation at the reference's
        # 300-step budget (its teacher needs the document in its prompt: up to the window) and in-context.
        efficiency_bins=((448, 512), (896, 1024), (1792, 2048), (3584, 4096), (7168, 8128), (14336, 16384), (28672, 32768)),
        efficiency_methods=("d2l", "cd", "icl"),
        cd_steps=300,
    )
    # Checkpoint's chunk length when None; a number evaluates the same hypernetwork with other chunks.
    config.max_chunk_len = ml_collections.config_dict.placeholder(int)
    config.step = ml_collections.config_dict.placeholder(int)  # latest checkpoint when None
    # How the base model is stored and multiplied (an experiment's ``base_execution`` fields; an empty
    # ``dtype`` multiplies in ``param_dtype``). The NIAH runs trained with bfloat16.
    config.base_execution = dict(param_dtype="float32", dtype="")
    # How the hypernetwork runs (``HypernetExecution`` fields); an empty dtype or a 0 keeps how the run
    # trained it, e.g. ``--config.execution.dtype=float32`` runs a bfloat16-trained hypernetwork in float32.
    config.execution = dict(dtype="", scan_unroll=0, chunk_group_size=0)
    config.efficiency = True
    config.efficiency_repeats = 1
    config.program_memory = True  # compile the answer programs once more for XLA's memory figures
    return config
