"""Ctrl-C to a running ``python -m launch.train``: it saves the step it reached, exits with its own status
(``launch.STOPPED_BY_SIGNAL``) and says how to resume; Orbax's INFO lines stay out of its output."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch import STOPPED_BY_SIGNAL
from tests.conftest import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.model = {model!r}
    config.hypernet = dict(
        encoder_type="early_exit", early_exit_layer=1, latent_size=32, n_latent_queries=4, num_blocks=1, num_heads=4, head_dim=8,
        num_kv_heads=2, lora_rank=2, max_chunk_len=64, max_chunks=2,
    )
    config.train = dict(loss="ce", learning_rate=1e-3, warmup_steps=1, steps=100000, batch_size=2, seed=0)
    config.data = dict(source=dict(name="niah", options=dict(bins=((8, 37),))), max_student_len=36, max_labels=8)
    config.eval_every = 0
    config.checkpoint_every = 0
    config.log_every = 1
    return config
"""


def _logged_steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]


def test_ctrl_c_to_a_training_process_saves_and_exits_with_its_own_status(smollm2, tmp_path):
    model = tmp_path / "tiny-model"
    save_tiny_model(model, vocab_size=len(smollm2.tokenizer), num_hidden_layers=2)
    smollm2.tokenizer.save_pretrained(model)
    config = tmp_path / "tiny_run.py"
    config.write_text(CONFIG.format(model=str(model)))
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}"]
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(_logged_steps(workdir / "metrics.jsonl")) < 2:
            assert child.poll() is None, child.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no training step logged within 300 s"
            time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=300)
    finally:
        child.kill()
    assert child.returncode == STOPPED_BY_SIGNAL, stderr[-3000:]
    result = json.loads(stdout[stdout.index("{") :])
    assert result["stopped_by"] == "SIGINT" and result["step"] >= 2
    assert f"stopped by SIGINT at step {result['step']} (checkpoint saved); run the same command to resume" in stderr
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [result["step"]]
    assert "checkpoint_manager.py" not in stderr  # Orbax's INFO lines are dropped (launch.QuietLibraries)
