"""Meta-trains D2L: ``python -m launch.train --config=experiments/niah_smollm2.py --workdir=DIR [--config.x=y]``.

Resumes from the newest checkpoint in ``DIR/checkpoints`` that verifies (``--resume_step`` picks one);
``--stop_after=N`` ends this call after N more steps with a checkpoint, the schedule unchanged; SIGTERM
and SIGINT (Ctrl-C) save a checkpoint and exit with status 3. Multi-host: pass
``--coordinator_address``, ``--num_processes`` and ``--process_id`` (or nothing on a TPU VM, where the
environment says it) and run the same command on every host.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import flags
from ml_collections import config_flags

from launch import STOPPED_BY_SIGNAL, run

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (ml_collections)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the config", required=True)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (multi-host)")
_RESUME_STEP = flags.DEFINE_integer("resume_step", None, "resume from this checkpoint step (default: the newest that verifies)")
_STOP_AFTER = flags.DEFINE_integer(
    "stop_after", None, "end this call after this many more steps (checkpoint saved; the schedule still runs to train.steps)", lower_bound=1
)


def main(argv):
    del argv
    import jax

    if _DISTRIBUTED.value or _COORDINATOR.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from d2l_jax.eval.evaluators import make_evaluator
    from d2l_jax.train.config import parse_experiment
    from d2l_jax.train.loop import train

    logging.getLogger("d2l_jax").setLevel(logging.INFO)
    experiment = parse_experiment(json.loads(_CONFIG.value.to_json()))
    base = experiment.base_execution.load(experiment.model)
    evaluator = make_evaluator(experiment.evaluator, base, seed=experiment.train.seed) if experiment.evaluator else None
    result = train(experiment, _WORKDIR.value, base=base, evaluator=evaluator, stop_after=_STOP_AFTER.value, resume_step=_RESUME_STEP.value)
    if jax.process_index() == 0:
        print(json.dumps(result, indent=2))
    if result["stopped_by"]:
        print(f"stopped by {result['stopped_by']} at step {result['step']} (checkpoint saved); run the same command to resume", file=sys.stderr)
        sys.exit(STOPPED_BY_SIGNAL)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    run(main)
