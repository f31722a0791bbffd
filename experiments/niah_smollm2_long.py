"""Fine-tunes the NIAH D2L of ``niah_smollm2.py`` on documents of up to 4,096 tokens in 256-token chunks.

    python -m launch.train --config=experiments/niah_smollm2_long.py --workdir=DIR --config.init_from=NIAH_WORKDIR

Trained on 32-256 tokens in 64-token chunks, the NIAH hypernetwork reads a needle from any one chunk, but
the adapters of many noise chunks add up and drown it: the student answers 6/10 documents of ~1k tokens
and 1/10 of ~4k tokens in 256-token chunks. Here it learns on documents of up to 16 such chunks.
"""

import ml_collections

from experiments import niah_smollm2


def get_config() -> ml_collections.ConfigDict:
    config = niah_smollm2.get_config()
    config.init_from = ""  # the short-context run's workdir
    config.hypernet.max_chunk_len = 256
    config.hypernet.max_chunks = 17  # 4,096 tokens and the chat affixes
    # About 3-4 s a step here (9,700 tokens on average); the run of results/niah_smollm2/run_long_chunks256/
    # reached its 50-minute limit at step 790 (96% of the 4k-token validation documents at step 600).
    config.train.update(learning_rate=5e-4, warmup_steps=10, steps=900)
    config.data.update(
        # The short bin keeps what the hypernetwork already does; the long ones teach it many chunks.
        niah_bins=((32, 256), (256, 1024), (1024, 4096)),
        niah_warmup_bins=(),
        niah_warmup_steps=0,
        niah_eval_bin=(3584, 4096),
        chunks_per_context=17,
    )
    config.eval_every = 150
    config.eval_contexts = 24
    config.checkpoint_every = 150
    config.time_limit_minutes = 50.0
    return config
