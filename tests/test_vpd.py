"""The vpd strategy (agents/vpd.py): k programs from one batched programmer call, run in the sandbox in order,
the first that answers wins, a direct VLM answer when none does; every program and its log in the trace.

The programmer is a scripted `FunctionPolicy` behind the OpenAI-compatible test server on loopback (it stands in
for a remote code LLM, which cannot run here); the eyesight that answers the programs' queries is the real tiny
model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai_server import FunctionPolicy, make_app, serve_in_thread
from PIL import Image

from foveate.agents import get_builder
from foveate.agents.state import FoveateContext
from foveate.agents.vpd import extract_program
from foveate.api import ask
from foveate.chat import describe_step
from foveate.policies.openai_http import OpenAIChatPolicy
from foveate.protocol import strip_thought
from foveate.tools.store import ImageStore
from foveate.trace import Trace

ROOT = Path(__file__).resolve().parents[1]
IMAGE = Image.new("RGB", (320, 200), "white")
BROKEN = "```python\ndef execute_command(image_patch)\n    return 'x'\n```"
HOSTILE = "```python\nimport os\ndef execute_command(image_patch):\n    return os.getcwd()\n```"
WIDE = "```python\ndef execute_command(image_patch):\n    return bool_to_yesno(image_patch.width > image_patch.height)\n```"  # noqa: E501
QUERY = "def execute_command(image_patch):\n    return image_patch.crop(0, 0, 160, 200).simple_query('What is it?')\n"


def run(programs: list[str], eyesight, store: ImageStore, **options) -> tuple[dict, FunctionPolicy]:
    """The final state of a vpd run whose programmer samples ``programs`` (completion i = programs[i])."""
    programmer = FunctionPolicy(lambda conversation, i: programs[i])
    with serve_in_thread(make_app(programmer, "coder")) as url:
        context = FoveateContext(policy=eyesight, wisdom=OpenAIChatPolicy(url, "coder"), store=store, max_new_tokens=8)
        graph = get_builder("vpd", {"k": len(programs), **options})()
        state = graph.invoke({"image": store.put(IMAGE), "question": "Is the image wide?"}, context=context)
    return state, programmer


def program_steps(state: dict) -> list[dict]:
    return [step for step in state["steps"] if step["kind"] == "program"]


def test_k_programs_in_one_batched_call_and_the_first_that_runs_answers(tiny_policy, tmp_path):
    state, programmer = run([BROKEN, HOSTILE, WIDE, WIDE], tiny_policy, ImageStore(tmp_path))
    assert len(programmer.seen) == 1 and programmer.seen[0][1] == 4  # one request, n = 4 samples
    prompt = programmer.seen[0][0][0]["content"]
    assert "class ImagePatch" in prompt and "Question: Is the image wide?" in prompt
    assert state["answer"] == "yes" and state["winner"] == 2
    steps = program_steps(state)
    assert [s["index"] for s in steps] == [0, 1, 2, 3]
    assert "syntax error" in steps[0]["outcome"]["error"]
    assert "import statements are not allowed" in steps[1]["outcome"]["error"]
    assert steps[2]["outcome"]["ok"] and steps[2]["outcome"]["value"] == "yes"
    assert steps[3]["outcome"] is None  # not run: an earlier program answered
    assert steps[2]["source"].startswith("def execute_command")  # the code, out of its fence


def test_programs_query_the_vlm_and_the_log_records_it(tiny_policy, tmp_path):
    store = ImageStore(tmp_path)
    state, _ = run([QUERY], tiny_policy, store)
    (step,) = program_steps(state)
    (call,) = [entry for entry in step["outcome"]["log"] if entry["name"] == "simple_query"]
    assert call["boxes"] == [[0.0, 0.0, 160.0, 200.0]] and call["args"] == {"question": "What is it?"}
    crop = IMAGE.crop((0, 0, 160, 200))
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": crop}, {"type": "text", "text": "What is it?"}]}
    ]
    expected = strip_thought(tiny_policy.chat_one(conversation, FoveateContext(max_new_tokens=32).sampling()).text)
    assert call["result"] == expected  # the real model's answer on the patch's crop
    if expected:
        assert state["answer"] == expected and state["winner"] == 0


def test_no_program_runs_so_the_vlm_answers_directly(tiny_policy, tmp_path):
    store = ImageStore(tmp_path)
    state, _ = run([BROKEN, HOSTILE], tiny_policy, store)
    assert state["winner"] == -1 and all(not s["outcome"]["ok"] for s in program_steps(state))
    final = [step for step in state["steps"] if step["kind"] == "model_call"][-1]
    assert final["node"] == "direct" and "none of the 2 programs" in final["fallback"]
    direct = ask(IMAGE, "Is the image wide?", "direct", policy=tiny_policy, store=store, max_new_tokens=8)
    assert state["answer"] == direct.answer


def test_the_trace_page_shows_programs_and_their_calls(tiny_policy, tmp_path):
    store = ImageStore(tmp_path)
    state, _ = run([HOSTILE, WIDE], tiny_policy, store)
    trace = Trace("vpd", state["question"], state["image"], state["answer"], state["steps"])
    page = Trace.from_dict(json.loads(trace.to_json())).save(tmp_path / "trace.html", store).read_text()
    assert "import os" in page and "import statements are not allowed" in page and "value &quot;yes&quot;" in page
    lines = [describe_step(step) for step in program_steps(state)]
    assert lines[0].startswith("program 0 (execute): 0 calls → refused: import") and lines[1].endswith('value "yes"')


def test_extract_program_takes_the_code() -> None:
    assert (
        extract_program("```py\ndef execute_command(p):\n    return 1\n```")
        == "def execute_command(p):\n    return 1\n"
    )
    assert extract_program("Sure.\ndef execute_command(p):\n    return 2") == "def execute_command(p):\n    return 2"
    assert (
        extract_program("```python\ndef execute_command(p):\n    return 3") == "def execute_command(p):\n    return 3"
    )
    assert extract_program("no code") == "no code"


@pytest.mark.slow
def test_ask_vpd_on_the_demo_model_runs_its_programs_or_falls_back(tmp_path):
    """The demo model as programmer and eyesight: it has not learned the program format, so its programs are
    refused and the direct answer comes back, with the programs in the trace."""
    import os
    import subprocess
    import sys

    image = ROOT / "examples" / "world" / "images" / "large-7-000002.png"
    command = [sys.executable, "-m", "foveate.cli", "ask", str(image), "What color is the medium-sized square?"]
    command += ["-s", "vpd", "-o", "k=2", "-o", "max_program_tokens=48", "--json"]
    env = {**os.environ, "FOVEATE_HOME": str(tmp_path)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    steps = out["trace"]["steps"]
    programs = [s for s in steps if s["kind"] == "program"]
    assert len(programs) == 2 and out["answer"]
    ran = [p for p in programs if p["outcome"] and p["outcome"]["ok"]]
    assert ran or "none of the 2 programs" in steps[-2]["fallback"]
