"""Exports a trained hypernetwork from a training workdir as a pretrained directory (``D2L.from_pretrained``):

    python -m launch.export --checkpoint=runs/qa --step=1800 --out=pretrained/smollm2-135m-qa \\
        --description="QA hypernetwork trained on SQuAD (experiments/qa_smollm2.py), step 1800"

The base model is loaded as the run loaded it, and ``from_pretrained`` loads it the same way by default.
"""

from __future__ import annotations

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir (or its checkpoints folder)", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_OUT = flags.DEFINE_string("out", None, "directory to write (model.safetensors + config.json)", required=True)
_DESCRIPTION = flags.DEFINE_string("description", None, "what it was trained on and how well it does", required=True)


def main(argv):
    del argv
    from d2l_jax.api import D2L
    from d2l_jax.train.checkpoint import Checkpointer
    from d2l_jax.train.config import RunConfig

    checkpoints = Checkpointer.of_run(_CHECKPOINT.value)
    try:
        run = RunConfig.from_json(checkpoints.read_json("config", _STEP.value))
    finally:
        checkpoints.close()
    d2l = D2L.load(_CHECKPOINT.value, step=_STEP.value)
    out = d2l.save_pretrained(_OUT.value, description=_DESCRIPTION.value, base_execution=run.base_execution)
    print(f"wrote {out} ({d2l.param_count():,} parameters)")


if __name__ == "__main__":
    app.run(main)
