"""The TPU VM launcher in dry-run mode: the gcloud commands it would run for a named slice and zone."""

import os
import shlex
import subprocess
import sys

import pytest

from launch.tpu.launch import Slice, plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLICE = Slice(
    name="d2l-main",
    zone="us-east5-a",
    accelerator_type="v5p-8",
    bucket="gs://d2l-runs",
    config="experiments/main_mistral7b.py",
    overrides=("train.batch_size=4", "train.grad_accum_steps=16"),
    model_uri="gs://d2l-runs/models/Mistral-7B-Instruct-v0.2",
    jax_version="0.10.2",
)


def dry_run(*flags):
    args = [sys.executable, "-m", "launch.tpu.launch", "--dry_run", *flags]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_dry_run_prints_every_command_for_the_slice():
    out = dry_run(
        "--name=d2l-main", "--zone=us-east5-a", "--accelerator_type=v5p-8", "--bucket=gs://d2l-runs",
        "--config=experiments/main_mistral7b.py", "--set=train.batch_size=4", "--jax_version=0.10.2",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    commands = [shlex.split(line) for line in lines]
    assert commands[0] == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "d2l-main", "--zone=us-east5-a", "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5",
    ]
    assert commands[1][:2] == ["bash", "-c"] and "tar" in commands[1][2]  # the working tree, packed locally
    assert commands[2] == [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/d2l-jax-d2l-main.tar.gz", "d2l-main:~/d2l-jax.tar.gz", "--zone=us-east5-a", "--worker=all",
    ]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "d2l-main", "--zone=us-east5-a", "--worker=all"]
    install, train = commands[3], commands[4]
    assert install[:8] == ssh and "'jax[tpu]==0.10.2' -e ~/d2l-jax" in install[8]
    assert "gcsfuse --implicit-dirs --rename-dir-limit=1000000 d2l-runs $HOME/gcs/d2l-runs" in install[8]
    assert train[:8] == ssh
    assert (
        "python -m launch.train --config=experiments/main_mistral7b.py --workdir=$HOME/gcs/d2l-runs/runs/d2l-main "
        "--distributed --config.train.batch_size=4 > ~/train.log" in train[8]
    )
    assert len(commands) == 5


def test_plan_copies_the_model_and_points_the_config_at_it():
    commands = plan(SLICE, ("install", "train"))
    install, train = commands[-2][-1], commands[-1][-1]
    assert "gcloud storage cp --recursive gs://d2l-runs/models/Mistral-7B-Instruct-v0.2 ~/models/" in install
    assert "--config.model=$HOME/models/Mistral-7B-Instruct-v0.2" in train
    assert "--config.train.grad_accum_steps=16" in train


def test_plan_logs_and_delete_and_other_generations():
    logs, delete = plan(SLICE, ("logs", "delete"))
    assert logs[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "d2l-main", "--zone=us-east5-a", "--worker=0"]
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "d2l-main", "--zone=us-east5-a", "--quiet"]
    v5e = Slice(name="s", zone="us-west4-a", accelerator_type="v5litepod-16", project="p", spot=True)
    assert plan(v5e, ("create",)) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "s", "--zone=us-west4-a", "--project=p",
        "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot",
    ]]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown accelerator type 'tpu-8'"):
        plan(Slice(name="s", zone="z", accelerator_type="tpu-8"), ("create",))
    with pytest.raises(ValueError, match="--bucket must be gs://BUCKET"):
        plan(Slice(name="s", zone="z", accelerator_type="v4-8", bucket="my-bucket", config="c.py"), ("train",))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        plan(Slice(name="s", zone="z", bucket="gs://bkt", config="c.py", overrides=("train.steps",)), ("train",))
    with pytest.raises(ValueError, match="unknown actions"):
        plan(SLICE, ("reboot",))
    out = dry_run("--name=s", "--zone=z", "--accelerator_type=tpu-8", "--actions=create")
    assert out.returncode != 0 and "unknown accelerator type" in out.stderr
