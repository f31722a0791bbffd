"""Second long-context stage: 1,024-token chunks and documents of up to 16k tokens.

    python -m launch.train --config=experiments/niah_smollm2_long1024.py --workdir=DIR --config.init_from=LONG_WORKDIR

After ``niah_smollm2_long.py`` the student reads 4k-token documents (16 chunks of 256 tokens) but not 32k
ones: 128 chunk adapters add up to replies that fall apart. With 1,024-token chunks a 32k document has 31
chunks, as many as the ~8k documents it read 8/10 of with 256-token chunks; here it learns such chunks on
documents of up to 16 of them. Its run (results/niah_smollm2/run_long_chunks1024/) reached its 35-minute
limit at step 220 with 12/12 validation documents of 14-16k tokens; on test documents it read 20/20 at every
length up to 16k tokens and 12/20 at 32k (results/niah_eval_trained/).
"""

import ml_collections

from experiments import niah_smollm2_long


def get_config() -> ml_collections.ConfigDict:
    config = niah_smollm2_long.get_config()
    config.hypernet.max_chunk_len = 1024
    config.train.update(
        batch_size=6,
        chunk_group_size=6,  # divides the 6 x 17 chunk rows of a batch
        learning_rate=3e-4,
        steps=300,
    )
    config.data.update(niah_bins=((256, 1024), (1024, 4096), (4096, 16384)), niah_eval_bin=(14336, 16384))
    config.eval_every = 100
    config.checkpoint_every = 100
    config.eval_contexts = 12
    config.time_limit_minutes = 35.0
    return config
