"""End-to-end RL runs on the demo model through the command line (slow): GRPO and DPO leave a checkpoint, a
metrics file and the resolved config; a GRPO run killed after its first checkpoint resumes to the same final step;
``foveate plot`` draws the curves; a real GRPO batch masks exactly the tool-returned tokens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

SMALL_GRPO = {
    "data": "world:large",
    "n_items": 4,
    "batch_size": 2,
    "num_generations": 2,
    "max_completion_length": 48,
    "save_steps": 1,
}
# Box thresholds that accept any box: the pairs then hinge on accuracy alone, so a handful of items gives pairs.
SMALL_DPO = {
    "data": "world:large",
    "n_items": 6,
    "samples": 4,
    "box_high": 0.0,
    "box_low": 1.0,
    "batch_size": 1,
    "save_steps": 1,
}


def write_config(tmp_path: Path, base: str, settings: dict) -> Path:
    config = yaml.safe_load(Path(base).read_text())
    config.update(settings)
    path = tmp_path / Path(base).name
    path.write_text(yaml.safe_dump(config))
    return path


def foveate(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "foveate.cli", *args], capture_output=True, text=True, **kwargs)


def global_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


def test_grpo_command_leaves_checkpoint_metrics_and_config(tmp_path):
    config = write_config(tmp_path, "configs/rl/deepeyes.yaml", SMALL_GRPO)
    out = tmp_path / "run"
    done = foveate("train", "grpo", "--config", str(config), "--max-steps", "2", "--output-dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert global_step(out / "checkpoint-2") == 2
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "processor_config.json").is_file()
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["max_steps"] == 2 and resolved["n_items"] == 4 and resolved["model"].endswith("demo")
    assert "train grpo" in (out / "command.txt").read_text()
    assert json.loads((out / "versions.json").read_text())["trl"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward", "rewards/accuracy_reward/mean", "rewards/format_reward/mean", "rewards/tool_reward/mean"):
        assert key in steps[0]
    assert {"tool_use_rate", "learning_rate", "loss"} <= set(steps[0])
    again = foveate("train", "grpo", "--config", str(config), "--output-dir", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr
    plotted = foveate("plot", str(out))
    assert plotted.returncode == 0, plotted.stderr
    assert (out / "plot-reward.png").stat().st_size > 1000 and (out / "plot-tools.png").is_file()


def test_grpo_killed_after_first_checkpoint_resumes_to_the_same_final_step(tmp_path):
    config = write_config(tmp_path, "configs/rl/deepeyes.yaml", SMALL_GRPO)
    out = tmp_path / "run"
    # 8 steps: on an idle machine a step takes about a second, so a 3-step run could finish before the kill lands.
    command = [sys.executable, "-m", "foveate.cli", "train", "grpo", "--config", str(config), "--max-steps", "8"]
    process = subprocess.Popen(
        [*command, "--output-dir", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while not (out / "checkpoint-1" / "trainer_state.json").is_file():
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.5)
        time.sleep(0.2)  # trainer_state.json is the checkpoint's last file; a moment for the filesystem
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (out / "checkpoint-8").exists() and not (out / "model").exists()
    done = subprocess.run([*command, "--output-dir", str(out), "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert global_step(out / "checkpoint-8") == 8
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 8 and 7 in steps


def test_dpo_command_runs_both_stages(tmp_path):
    config = write_config(tmp_path, "configs/rl/visrl.yaml", SMALL_DPO)
    out = tmp_path / "run"
    done = foveate("train", "dpo", "--config", str(config), "--max-steps", "2", "--output-dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "preferences" / "summary.json").read_text())
    assert summary["items"] == 6 and summary["pairs"] >= 1
    for stage in ("stage1", "stage2"):
        assert global_step(out / stage / "checkpoint-2") == 2
    assert (out / "model" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"stage1", "stage2"}
    assert any("rewards/margins" in r for r in records)
    assert yaml.safe_load((out / "config.yaml").read_text())["beta"] == 0.1
