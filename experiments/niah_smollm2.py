"""NIAH meta-training of a CPU-sized D2L on the embedded SmolLM2-135M-Instruct, in four stages.

    python -m launch.train --config=experiments/niah_smollm2.py --workdir=runs/niah
    python -m launch.train --config=experiments/niah_smollm2.py:long --workdir=runs/long --config.init_from=runs/niah
    python -m launch.train --config=experiments/niah_smollm2.py:long1024 --workdir=runs/long1024 --config.init_from=runs/long
    python -m launch.train --config=experiments/niah_smollm2.py:long32k --workdir=runs/long32k --config.init_from=runs/long1024

``short`` (the default) starts from the reference's NIAH recipe (early-exit context encoder, CE on the answer
digits and the end-of-turn token, contexts of 32-256 tokens) with the changes each field's comment names;
each later stage fine-tunes the one before it on longer documents. What every run measured is in
``docs/niah_experiments.md`` and ``results/niah_smollm2/``. Override any field on the command line, e.g.
``--config.train.learning_rate=1e-4``.
"""

import dataclasses

import ml_collections

from d2l_jax.hypernet.config import HypernetConfig

VARIANTS = ("short", "long", "long1024", "long32k")


def niah(*bins):
    return dict(name="niah", options=dict(bins=bins))


def get_config(variant: str = "short") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of niah_smollm2; known: {VARIANTS}")
    config = ml_collections.ConfigDict()
    config.model = "smollm2-135m-instruct"
    # 64-token chunks (the needle's chunk is then mostly needle), adapters on the last 4 layers, one head per
    # rank, B from the document and A shared by documents, centred head inputs: the preset that trains here.
    config.hypernet = dataclasses.asdict(HypernetConfig.niah_cpu())
    # bfloat16 matmuls in the hypernetwork (float32 parameters and optimizer) and a bfloat16 base model with
    # every one of its 30 layers unrolled: 0.77 s a step here instead of 1.7 s in float32 (AMX).
    config.execution = dict(dtype="bfloat16", scan_unroll=1, iterative=False, chunk_group_size=4)
    config.base_execution = dict(param_dtype="bfloat16", scan_unroll=30)
    config.train = dict(
        loss="ce",
        teacher="online",
        l1_coef=0.0,
        learning_rate=1e-3,
        warmup_steps=10,
        steps=4500,  # the cosine's length; validation reached 100% at step 1,500
        batch_size=8,
        grad_accum_steps=1,
        # The encoder runs 8 chunk rows at a time and skips the rows that are padding only.
        encoder_chunk_rows=8,
        # The Perceiver learns at a tenth of the head's rate: at the full rate its attention settles on the
        # needle's first and last digits and its latents lose the middle two.
        perceiver_lr_scale=0.1,
        freeze_head_input_mean=False,
        seed=1,
        mesh=(),  # e.g. (("data", 2),) on two devices; data takes the devices left over by default
    )
    config.data = dict(
        # Short contexts (1-3 blocks) beside the reference's 32-256 tokens give the hypernetwork an early signal.
        source=niah((8, 64), (32, 256)),
        # A curriculum: short contexts alone first, where the hypernetwork learns to read the number.
        warmup_source=niah((8, 64)),
        warmup_steps=300,
        chunk_probs=(),
        min_chunk_len=25,
        chunks_per_context=5,
        max_student_len=36,
        max_labels=8,
        max_teacher_len=0,
    )
    config.evaluator = dict(name="niah", options=dict(bin=(32, 256), contexts=48))
    config.eval_every = 500
    config.checkpoint_every = 500
    config.log_every = 10
    config.time_limit_minutes = 60.0
    config.init_from = ""  # the previous stage's workdir, for the long stages

    if variant in ("long", "long1024", "long32k"):
        # Documents of up to 4,096 tokens in 16 chunks of 256 tokens: the adapters of many noise chunks must
        # not drown the needle's.
        config.hypernet.update(max_chunk_len=256, max_chunks=17)
        config.train.update(learning_rate=5e-4, steps=900)
        config.data.update(source=niah((32, 256), (256, 1024), (1024, 4096)), warmup_steps=0, chunks_per_context=17)
        config.data.warmup_source = None
        config.evaluator.options.update(bin=(3584, 4096), contexts=24)
        config.update(eval_every=150, checkpoint_every=150, time_limit_minutes=50.0)
    if variant in ("long1024", "long32k"):
        # 1,024-token chunks, documents of up to 16k tokens: a 32k document then has as many chunks as the
        # ~8k documents the 256-token chunks read.
        config.hypernet.update(max_chunk_len=1024)
        config.train.update(batch_size=6, encoder_chunk_rows=6, learning_rate=3e-4, steps=300)  # 6 divides 6 x 17 chunk rows
        config.data.update(source=niah((256, 1024), (1024, 4096), (4096, 16384)))
        config.evaluator.options.update(bin=(14336, 16384), contexts=12)
        config.update(eval_every=100, checkpoint_every=100, time_limit_minutes=35.0)
    if variant == "long32k":
        # Documents of 4k-32k tokens (4x the window), up to 33 chunks. The head stays centred on the stored
        # mean: centred on these batches' means (few needle chunks) the previous stage's checkpoint lost
        # 2.4-3.5 instead of 0.00-0.04 and fell to 0/8 validation documents.
        config.hypernet.update(max_chunks=33)
        config.train.update(batch_size=3, encoder_chunk_rows=9, learning_rate=2e-4, steps=170, freeze_head_input_mean=True)
        config.data.update(source=niah((4096, 16384), (16384, 32768)), chunks_per_context=33)
        config.evaluator.options.update(bin=(28672, 32768), contexts=8)
        config.update(eval_every=50, checkpoint_every=50, time_limit_minutes=65.0)
    return config
