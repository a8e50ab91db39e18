"""``foveate chat``: questions from stdin, steps and answers rendered, threads in SQLite that a new process resumes
(the second process's model prompt holds the first process's question and answer)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

import foveate
from foveate.chat import run_chat
from foveate.cli import main
from foveate.tools.store import ImageStore

MAX_NEW_TOKENS = 6


@pytest.fixture
def image_path(tmp_path):
    image = Image.new("RGB", (160, 120), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, 70, 60), fill="red")
    draw.ellipse((90, 50, 150, 110), fill="blue")
    path = tmp_path / "scene.png"
    image.save(path)
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("FOVEATE_HOME", str(home))
    return home


def _texts(prompt: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], " ".join(p.get("text", "") for p in m["content"] if p.get("type") == "text")) for m in prompt]


def test_chat_renders_steps_and_answers(image_path, home, tiny_model_dir, tiny_policy):
    out = io.StringIO()
    questions = io.StringIO("What color is the square?\n\n   \nAnd the circle?\n/exit\nnever asked\n")
    thread = run_chat(
        image_path, model=str(tiny_model_dir), max_new_tokens=MAX_NEW_TOKENS, questions=questions, out=out
    )
    text = out.getvalue()
    assert f"thread {thread}" in text and f"--thread {thread}" in text
    assert text.count("model call (answer)") == 2 and "never asked" not in text
    first = foveate.ask(
        image_path,
        "What color is the square?",
        policy=tiny_policy,
        store=ImageStore(home / "images"),
        max_new_tokens=MAX_NEW_TOKENS,
    )
    assert first.answer in text
    assert (home / "threads.sqlite").is_file()


def _chat(image_path, home, tiny_model_dir, question: str, *extra: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-m", "foveate.cli", "chat", str(image_path), "--model", str(tiny_model_dir)]
        + ["--max-new-tokens", str(MAX_NEW_TOKENS), "--json", *extra],
        input=f"{question}\n",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FOVEATE_HOME": str(home)},
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 1, completed.stdout  # --json: one JSON object per turn on stdout, the rest on stderr
    return {**json.loads(lines[0]), "stderr": completed.stderr}


def test_thread_resumes_after_a_restart(image_path, home, tiny_model_dir):
    q1, q2 = "What color is the square?", "And the circle?"
    first = _chat(image_path, home, tiny_model_dir, q1)
    thread = first["thread"]
    assert "(new; resume with --thread" in first["stderr"]
    assert _texts(first["trace"]["steps"][0]["prompt"]) == [("user", q1)]

    second = _chat(image_path, home, tiny_model_dir, q2, "--thread", thread)  # a new process
    assert second["thread"] == thread and "resumed (1 earlier question)" in second["stderr"]
    prompt = second["trace"]["steps"][0]["prompt"]
    assert _texts(prompt) == [("user", q1), ("assistant", first["answer"]), ("user", q2)]
    assert prompt[0]["content"][0] == {"type": "image", "ref": first["trace"]["image"]}
    assert all(part["type"] == "text" for part in prompt[2]["content"])  # the same image is not sent twice
    assert [step["kind"] for step in second["trace"]["steps"]] == ["model_call", "answer"]  # this turn's steps only


def test_chat_errors_are_one_line(image_path, home, capsys):
    for argv, message in [
        (["chat", str(image_path), "--strategy", "nope"], "unknown strategy 'nope'"),
        (["chat", str(image_path), "--strategy", "oracle-crop"], "needs ground-truth evidence"),
        (["chat", str(image_path.with_name("missing.png"))], "image file not found"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_a_turn_past_the_models_context_is_an_error_line_and_the_chat_goes_on(image_path, home, tiny_model_dir):
    out = io.StringIO()
    long = "a" * 10_000
    # A failed first turn (a new thread) and a failed third (after a saved turn): neither stays in the thread, so
    # each next question fits and is answered with only the questions that were answered before it.
    questions = io.StringIO(f"{long}\nWhat color is the square?\n{long}\nAnd the circle?\n")
    thread = run_chat(
        image_path, model=str(tiny_model_dir), max_new_tokens=MAX_NEW_TOKENS, questions=questions, out=out
    )
    text = out.getvalue()
    assert text.count("error: the prompt is") == 2 and "more than the model's 8,192 positions" in text
    assert text.count("model call (answer)") == 2
    resumed = io.StringIO()
    run_chat(image_path, model=str(tiny_model_dir), max_new_tokens=MAX_NEW_TOKENS, thread=thread,
             questions=io.StringIO("Which is larger?\n"), out=resumed, as_json=True)  # fmt: skip
    prompt = json.loads(resumed.getvalue().splitlines()[-1])["trace"]["steps"][0]["prompt"]
    asked = [text for role, text in _texts(prompt) if role == "user"]
    assert asked == ["What color is the square?", "And the circle?", "Which is larger?"]
