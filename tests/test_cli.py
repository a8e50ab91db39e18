"""The installed ``foveate`` console script, run as a subprocess with ``FOVEATE_HOME`` in a temporary directory.

Every error a user can cause prints exactly one line on stderr (no traceback) and exits with status 2. The error
cases start together (each is a separate process) so their import times overlap.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(sys.executable).with_name("foveate")


def _command() -> list[str]:
    return [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "foveate.cli"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def cli_env(workdir) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FOVEATE_")}
    env.update(FOVEATE_HOME=str(workdir / "home"), COLUMNS="60", HF_HUB_OFFLINE="1")
    return env


def _start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*_command(), *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen, timeout: float = 180) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def images(workdir) -> dict[str, Path]:
    good = workdir / "scene.png"
    scene = Image.new("RGB", (96, 64), "white")
    scene.paste("red", (10, 10, 40, 40))
    scene.save(good)
    text = workdir / "notes.png"
    text.write_text("this is a text file, not a PNG\n")
    truncated = workdir / "truncated.png"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    return {"good": good, "text": text, "truncated": truncated}


def _error_cases(workdir: Path, images: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    not_a_model = workdir / "not-a-model"
    not_a_model.mkdir(exist_ok=True)
    (not_a_model / "weights.bin").write_bytes(b"\0")
    good = str(images["good"])
    return {
        "missing file": (["ask", str(workdir / "missing.png"), "q"], "image file not found"),
        "text file named .png": (["ask", str(images["text"]), "q"], "not a recognised image format"),
        "truncated png": (["ask", str(images["truncated"]), "q"], "truncated or corrupt"),
        "unknown strategy": (["ask", good, "q", "--strategy", "telepathy"], "unknown strategy 'telepathy'"),
        "model dir not found": (
            ["ask", good, "q", "--model", str(workdir / "no-such-model")],
            "model directory not found",
        ),
        "dir without config.json": (["ask", good, "q", "--model", str(not_a_model)], "no config.json"),
        # The default (demo) model has 8,192 positions; 10,000 "a" are 10,000 tokens.
        "question past the model's positions": (["ask", good, "a" * 10_000], "more than the model's 8,192 positions"),
        # White-box passes (ViCrop's attention) read the prompt without generating: refused the same way.
        "vicrop question past the positions": (
            ["ask", good, "a" * 10_000, "-s", "vicrop-rel"],
            "more than the model's 8,192 positions",
        ),
        # Rich markup would eat the "[[x1, y1, x2, y2]]" of the message.
        "oracle-crop without boxes": (
            ["ask", good, "q", "-s", "oracle-crop"],
            "pass `evidence_boxes` ([[x1, y1, x2, y2], ...] in original-image pixels)",
        ),
        "endpoint refused": (
            ["ask", good, "q", "--endpoint", f"http://127.0.0.1:{_closed_port()}/v1", "--model", "served"],
            "cannot connect",
        ),
    }


# Each case costs a fresh interpreter 2–7 s of CPU (the model cases import torch and transformers before they
# fail), so by default two cases run as console-script processes (concurrently with the other processes of this
# module) and every case runs through the same ``main`` in-process; the slow set runs every case as a process.
SUBPROCESS_ERRORS = ["missing file", "endpoint refused"]
ALL_ERRORS = [
    "missing file",
    "text file named .png",
    "truncated png",
    "unknown strategy",
    "model dir not found",
    "dir without config.json",
    "question past the model's positions",
    "vicrop question past the positions",
    "oracle-crop without boxes",
    "endpoint refused",
]


@pytest.fixture(scope="module")
def concurrent_runs(workdir, images, cli_env) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    """Start some error cases, bare ``foveate`` and ``model init-tiny`` together (separate processes, so their
    import times and the endpoint's retry back-off overlap); map name → (completed process, stderr fragment)."""
    cases = _error_cases(workdir, images)
    assert sorted(cases) == sorted(ALL_ERRORS)
    commands = {name: cases[name] for name in SUBPROCESS_ERRORS}
    commands["bare"] = ([], "Usage")
    commands["init-tiny"] = (["model", "init-tiny", str(workdir / "tiny-model")], "tiny Qwen2-VL model written")
    started = {name: (_start(args, cli_env, workdir), fragment) for name, (args, fragment) in commands.items()}
    return {name: (_finish(process), fragment) for name, (process, fragment) in started.items()}


def _assert_user_error(completed: subprocess.CompletedProcess, fragment: str) -> None:
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2, completed.stderr
    assert len(lines) == 1, completed.stderr
    assert "Traceback" not in completed.stderr + completed.stdout
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert completed.stdout == ""


@pytest.mark.parametrize("case", SUBPROCESS_ERRORS)
def test_user_errors_in_a_process_print_one_line_and_exit_2(concurrent_runs, case):
    _assert_user_error(*concurrent_runs[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in ALL_ERRORS if c not in SUBPROCESS_ERRORS])
def test_every_user_error_in_a_process(workdir, images, cli_env, case):
    args, fragment = _error_cases(workdir, images)[case]
    _assert_user_error(_finish(_start(args, cli_env, workdir)), fragment)


@pytest.mark.parametrize("case", [c for c in ALL_ERRORS if c != "endpoint refused"])  # its retries sleep ≈ 4 s
def test_user_errors_through_main_in_process(workdir, images, cli_env, case, capsys, monkeypatch):
    from foveate.cli import main

    args, fragment = _error_cases(workdir, images)[case]
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("FOVEATE_HOME", cli_env["FOVEATE_HOME"])
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    _assert_user_error(subprocess.CompletedProcess(args, exit_info.value.code, captured.out, captured.err), fragment)


def test_bare_command_prints_usage_and_fails(concurrent_runs):
    completed, _ = concurrent_runs["bare"]
    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    assert "Usage" in output and "ask" in output and "Traceback" not in output


def test_init_tiny_then_ask_with_html_trace_and_json(concurrent_runs, cli_env, workdir, images):
    model_dir = workdir / "tiny-model"
    built, _ = concurrent_runs["init-tiny"]
    assert built.returncode == 0, built.stderr
    assert (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists()
    assert "tiny Qwen2-VL model written" in built.stdout

    trace_path = workdir / "t.html"
    question = "What color is the <square>?"
    args = ["ask", str(images["good"]), question, "--model", str(model_dir), "--trace", str(trace_path), "--json"]
    answered = _finish(_start([*args, "--max-new-tokens", "6"], cli_env, workdir))
    assert answered.returncode == 0, answered.stderr
    assert "Traceback" not in answered.stderr
    payload = json.loads(answered.stdout)
    assert set(payload) == {"answer", "trace"}
    trace = payload["trace"]
    assert trace["answer"] == payload["answer"] and trace["question"] == question and trace["strategy"] == "direct"
    assert [step["kind"] for step in trace["steps"]] == ["model_call", "answer"]
    assert trace["model_calls"] == 1 and trace["image"].startswith("sha256:")
    assert trace["steps"][0]["completion_tokens"] <= 6
    page = trace_path.read_text()
    assert "data:image/png;base64," in page and "What color is the &lt;square&gt;?" in page
    assert "trace written to" in answered.stderr
    # The image store lives under FOVEATE_HOME, not ~/.cache.
    digest = trace["image"].split(":", 1)[1]
    assert (Path(cli_env["FOVEATE_HOME"]) / "images" / digest[:2] / f"{digest}.png").exists()


def test_ask_without_an_answer_says_why_on_stderr_and_exits_1(tiny_model_dir, images, cli_env, capsys, monkeypatch):
    """The random tiny model never writes DeepEyes' tags, so the loop ends at its turn limit with no answer."""
    from foveate.cli import main

    monkeypatch.setenv("FOVEATE_HOME", cli_env["FOVEATE_HOME"])
    args = ["ask", str(images["good"]), "What color is the square?", "--model", str(tiny_model_dir)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--strategy", "deepeyes", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and captured.out == ""
    assert captured.err.startswith("no answer: ") and "Traceback" not in captured.err
