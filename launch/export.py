"""Exports a trained hypernetwork from a training workdir.

    # a pretrained directory for D2L.from_pretrained (the default)
    python -m launch.export --checkpoint=runs/qa --step=1800 --out=pretrained/smollm2-135m-qa \\
        --description="QA hypernetwork trained on SQuAD (experiments/qa_smollm2.py), step 1800"
    # the reference implementation's pytorch_model.bin (SakanaAI/doc-to-lora)
    python -m launch.export --checkpoint=runs/qa --to=reference --out=exported/qa
    # one document internalized, as a PEFT LoRA directory for transformers or vLLM
    python -m launch.export --checkpoint=runs/qa --to=peft --document=notes.txt --out=exported/notes-lora

The base model is loaded as the run loaded it, and ``from_pretrained`` loads it the same way by default.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from launch import run

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir (or its checkpoints folder)", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_OUT = flags.DEFINE_string("out", None, "directory to write", required=True)
_TO = flags.DEFINE_enum(
    "to",
    "pretrained",
    ["pretrained", "reference", "peft"],
    "pretrained: model.safetensors + config.json for D2L.from_pretrained; reference: the reference's pytorch_model.bin; "
    "peft: the adapter of --document as a PEFT LoRA directory",
)
_DESCRIPTION = flags.DEFINE_string("description", None, "what it was trained on and how well it does (required with --to=pretrained)")
_WEIGHTS_DTYPE = flags.DEFINE_enum("weights_dtype", "float32", ["float32", "float16"], "storage dtype of --to=pretrained weights (float16: half the file)")
_DOCUMENT = flags.DEFINE_string("document", None, "text file to internalize (required with --to=peft)")


def main(argv):
    del argv
    if _TO.value == "pretrained" and _DESCRIPTION.value is None:
        raise app.UsageError("--description is required with --to=pretrained")
    if _TO.value == "peft" and _DOCUMENT.value is None:
        raise app.UsageError("--document is required with --to=peft")
    if _TO.value != "peft" and _DOCUMENT.value is not None:
        raise app.UsageError(f"--document is only used with --to=peft, not --to={_TO.value}")

    from d2l_jax.api import D2L
    from d2l_jax.export import save_peft
    from d2l_jax.export.reference import hub_name
    from d2l_jax.train.checkpoint import Checkpointer
    from d2l_jax.train.config import RunConfig

    document = None
    if _DOCUMENT.value is not None:
        path = Path(_DOCUMENT.value)
        if not path.is_file():
            raise app.UsageError(f"--document={path} does not exist")
        document = path.read_text()
    checkpoints = Checkpointer.of_run(_CHECKPOINT.value)
    try:
        experiment = RunConfig.from_json(checkpoints.read_json("config", _STEP.value))
    finally:
        checkpoints.close()
    d2l = D2L.load(_CHECKPOINT.value, step=_STEP.value)
    if _TO.value == "pretrained":
        out = d2l.save_pretrained(
            _OUT.value, description=_DESCRIPTION.value, base_execution=experiment.base_execution, weights_dtype=_WEIGHTS_DTYPE.value
        )
        print(f"wrote {out} ({d2l.param_count():,} parameters)")
    elif _TO.value == "reference":
        out = d2l.save_reference_checkpoint(_OUT.value)
        print(f"wrote {out} ({d2l.param_count():,} parameters, reference layout)")
    else:
        adapter = d2l.internalize(document)
        out = save_peft(adapter, _OUT.value, base_model_name_or_path=hub_name(d2l.base.name))
        print(f"wrote {out} (rank {adapter.rank}, {adapter.num_chunks} chunks of {adapter.num_tokens} tokens)")


if __name__ == "__main__":
    run(main)
