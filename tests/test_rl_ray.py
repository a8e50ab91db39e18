"""Ray Train on a REAL local cluster (slow): ``ray start --head`` in a temporary directory, a GRPO run submitted to it
through ``--ray-address``, and a run whose driver is SIGKILLed after its first checkpoint and resumed to the same
final step. The cluster runs with ``RAY_AUTH_MODE=disabled`` (a fresh ``ray start`` requires a token otherwise) and
``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0`` (stops in seconds); the test stops it by signalling its process group
and then kills, by PID, any process the cluster started that outlived it (RESEARCH.md §7)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from foveate.rl.ray_train import RAY_ENV

pytestmark = pytest.mark.slow

SMALL_GRPO = {
    "data": "world:large",
    "n_items": 4,
    "batch_size": 2,
    "num_generations": 2,
    "max_completion_length": 48,
    "save_steps": 1,
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def ray_cluster():
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    port = free_port()
    env = {**os.environ, **RAY_ENV}
    ray = str(Path(sys.executable).parent / "ray")
    command = [ray, "start", "--head", "--block", "--num-cpus", "4", "--temp-dir", temp, "--port", str(port)]
    command += ["--include-dashboard=false", "--disable-usage-stats"]
    log = open(Path(temp) / "ray-start.log", "w")  # noqa: SIM115 - closed in teardown
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    descendants: set[int] = set()
    try:
        deadline = time.time() + 120
        while True:
            assert head.poll() is None, (Path(temp) / "ray-start.log").read_text()[-2000:]
            assert time.time() < deadline, "ray start did not come up"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(3)  # the raylet registers after the GCS port opens
        yield {"address": f"127.0.0.1:{port}", "env": env, "head": head, "descendants": descendants}
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            descendants |= {p.pid for p in psutil.Process(head.pid).children(recursive=True)}
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        time.sleep(2)
        for pid in descendants:  # orphans (ray::DashboardAgent, ray::RuntimeEnvAgent …): by PID, ours only
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def config_file(tmp_path: Path) -> Path:
    config = yaml.safe_load(Path("configs/rl/deepeyes.yaml").read_text())
    config.update(SMALL_GRPO)
    path = tmp_path / "deepeyes.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def grpo_command(config: Path, out: Path, address: str, steps: int) -> list[str]:
    return [sys.executable, "-m", "foveate.cli", "train", "grpo", "--config", str(config), "--output-dir", str(out),
            "--max-steps", str(steps), "--ray-workers", "2", "--ray-address", address]  # fmt: skip


def ray_checkpoints(out: Path) -> list[Path]:
    return sorted((out / "ray" / "deepeyes-grpo").glob("checkpoint_*/trainer_state.json"))


def registered_checkpoints(out: Path) -> list[Path]:
    """The checkpoints Ray has registered (its snapshot is written after the copy: only these are resumed from)."""
    snapshot = out / "ray" / "deepeyes-grpo" / "checkpoint_manager_snapshot.json"
    try:
        text = snapshot.read_text()
    except OSError:
        return []
    return [path for path in ray_checkpoints(out) if path.parent.name in text]


def test_short_run_on_a_real_cluster(ray_cluster, tmp_path):
    out = tmp_path / "run"
    command = grpo_command(config_file(tmp_path), out, ray_cluster["address"], 2)
    done = subprocess.run(command, env=ray_cluster["env"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    states = [json.loads(path.read_text())["global_step"] for path in ray_checkpoints(out)]
    assert states and max(states) == 2
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "checkpoint-2" / "rng_state_1.pth").is_file()  # both ranks trained
    assert [
        json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in line
    ] == [1, 2]


def test_killed_run_resumes_on_the_cluster_to_the_same_final_step(ray_cluster, tmp_path):
    out = tmp_path / "run"
    config = config_file(tmp_path)
    command = grpo_command(config, out, ray_cluster["address"], 3)
    driver = subprocess.Popen(
        command, env=ray_cluster["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 900
        while not registered_checkpoints(out):
            assert driver.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    killed_at = max(json.loads(p.read_text())["global_step"] for p in registered_checkpoints(out))
    assert killed_at < 3
    time.sleep(5)  # the cluster reaps the dead driver's workers
    done = subprocess.run([*command, "--resume"], env=ray_cluster["env"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert max(json.loads(p.read_text())["global_step"] for p in ray_checkpoints(out)) == 3
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    steps = [
        json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in line
    ]
    assert steps[-1] == 3 and steps.count(1) == 1  # resumed from the registered checkpoint, not restarted
