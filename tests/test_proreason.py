"""ProReason's role loop (agents/proreason.py): control flow, structured outputs, parse retries, fan-out.

The wisdom LLM is a scripted `FunctionPolicy` served by the OpenAI-compatible test server on loopback and reached
through the real HTTP backend (``--wisdom-endpoint``): it stands in for a remote LLM server, which cannot run here,
and gives each role the exact reply a control-flow test needs. The eyesight is the real tiny model.
"""

from __future__ import annotations

import html
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai_server import FunctionPolicy, make_app, serve_in_thread
from PIL import Image, ImageDraw

from foveate.agents import get_builder
from foveate.agents.proreason_roles import Dispatch, first_json_object, parse_reply
from foveate.agents.state import FoveateContext, wisdom_policy
from foveate.api import ask, make_wisdom_policy
from foveate.chat import describe_step
from foveate.errors import FoveateError
from foveate.policies.base import ChatPolicy
from foveate.policies.batching import MicroBatcher
from foveate.policies.openai_http import OpenAIChatPolicy
from foveate.tools.store import ImageStore
from foveate.trace import Trace

ROOT = Path(__file__).resolve().parents[1]
MARKERS = {
    "dispatcher": "Choose who works next",
    "reasoning": "Your task:",
    "referee": "Is what is known enough",
    "summarizer": "Answer the question from what is known",
}


def role_of(conversation: list[dict]) -> str:
    first = conversation[0]["content"]
    return next(role for role, marker in MARKERS.items() if marker in first)


class RoleScript:
    """Replies per role, in order (the last one repeats); records each role's conversations."""

    def __init__(self, **replies: list[str]) -> None:
        self.replies = {role: list(texts) for role, texts in replies.items()}
        self.asked: dict[str, list[list[dict]]] = {role: [] for role in MARKERS}
        self.lock = threading.Lock()

    def __call__(self, conversation: list[dict], index: int) -> str:
        with self.lock:
            role = role_of(conversation)
            self.asked[role].append(conversation)
            queue = self.replies[role]
            return queue.pop(0) if len(queue) > 1 else queue[0]


@pytest.fixture
def wisdom_server() -> Iterator:
    """``start(script)`` serves a RoleScript at a loopback URL; yields that function."""
    contexts = []

    def start(script: RoleScript) -> str:
        context = serve_in_thread(make_app(FunctionPolicy(script), "wisdom"))
        contexts.append(context)
        return context.__enter__()

    yield start
    for context in contexts:
        context.__exit__(None, None, None)


@pytest.fixture(scope="module")
def scene() -> Image.Image:
    image = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(image).rectangle((40, 40, 120, 110), fill="blue")
    return image


def run(script_url: str, eyesight: ChatPolicy, image: Image.Image, store: ImageStore, **options) -> dict:
    """The final state of one ProReason run (the graph itself, to read rounds, memory and parse failures)."""
    graph = get_builder("proreason", options)()
    wisdom = OpenAIChatPolicy(script_url, "wisdom")
    context = FoveateContext(policy=eyesight, wisdom=wisdom, store=store, max_new_tokens=8)
    return graph.invoke({"image": store.put(image), "question": "What color is the square?"}, context=context)


def roles(state: dict) -> list[str]:
    return [step["role"] for step in state["steps"] if step["kind"] == "role"]


VISION = json.dumps({"expert": "vision", "sub_questions": ["What color is the square?"]})
REASON = json.dumps({"expert": "reasoning", "sub_questions": ["Which color was seen?"]})
SOLVED, UNSOLVED = '{"verdict": "CAN_SOLVE", "reason": "seen"}', '{"verdict": "UNSOLVABLE", "reason": "unclear"}'


def test_referee_can_solve_hands_the_memory_to_the_summarizer(wisdom_server, tiny_policy, scene, tmp_path):
    script = RoleScript(dispatcher=[VISION], referee=[SOLVED], summarizer=['```json\n{"answer": "blue"}\n```'])
    state = run(wisdom_server(script), tiny_policy, scene, ImageStore(tmp_path))
    assert state["answer"] == "blue" and state["rounds"] == 1 and state["parse_failures"] == 0
    assert roles(state) == ["dispatcher", "vision expert", "referee", "summarizer"]
    (entry,) = state["memory"]
    assert entry["expert"] == "vision" and entry["question"] == "What color is the square?"
    # The vision answer is the real model's; the blind summarizer saw it in the memory, and no image.
    assert entry["answer"] in script.asked["summarizer"][0][0]["content"]
    for conversations in script.asked.values():
        assert all(isinstance(message["content"], str) for c in conversations for message in c)
    summary = next(s for s in state["steps"] if s["kind"] == "role" and s["role"] == "summarizer")
    assert summary["memory"] == state["memory"] and (summary["rounds"], summary["parse_failures"]) == (1, 0)
    # The trace page and the terminal chat show each role's turn and the memory it saw.
    page = Trace("proreason", state["question"], state["image"], state["answer"], state["steps"])
    text = page.save(tmp_path / "trace.html", ImageStore(tmp_path)).read_text()
    assert "summarizer" in text and "vision expert" in text and html.escape(json.dumps(entry["answer"])) in text
    assert describe_step(summary) == 'summarizer (summarize): {"answer": "blue"}'


@pytest.mark.parametrize("rounds", [3, pytest.param(8, marks=pytest.mark.slow, id="default-8")])
def test_rounds_without_a_solution_fall_back_to_a_direct_answer(rounds, wisdom_server, tiny_policy, scene, tmp_path):
    reasoned = '{"reasoning": "a square was seen", "answer": "a square"}'
    script = RoleScript(dispatcher=[VISION, REASON], referee=[UNSOLVED], reasoning=[reasoned], summarizer=["{}"])
    store = ImageStore(tmp_path)
    state = run(wisdom_server(script), tiny_policy, scene, store, **({} if rounds == 8 else {"max_rounds": rounds}))
    assert state["rounds"] == rounds and len(script.asked["dispatcher"]) == rounds and not script.asked["summarizer"]
    assert [e["expert"] for e in state["memory"]] == ["vision"] + ["reasoning"] * (rounds - 1)
    assert state["memory"][1]["answer"] == "a square"  # only the reasoning expert's final answer is stored
    final = [step for step in state["steps"] if step["kind"] == "model_call"][-1]
    assert final["node"] == "direct" and f"no solution in {rounds} rounds" in final["fallback"]
    direct = ask(scene, "What color is the square?", "direct", policy=tiny_policy, store=store, max_new_tokens=8)
    assert state["answer"] == direct.answer  # the fallback is the plain VLM answer


def test_malformed_role_output_is_retried_once_and_counted(wisdom_server, tiny_policy, scene, tmp_path):
    script = RoleScript(
        dispatcher=["I would ask the vision expert.", VISION],
        referee=['{"verdict": "MAYBE"}', SOLVED],
        summarizer=['{"answer": "blue"}'],
    )
    state = run(wisdom_server(script), tiny_policy, scene, ImageStore(tmp_path))
    assert state["answer"] == "blue" and state["rounds"] == 1 and state["parse_failures"] == 2
    retry = script.asked["referee"][1]
    assert [m["role"] for m in retry] == ["user", "assistant", "user"] and retry[1]["content"] == '{"verdict": "MAYBE"}'
    assert "Your reply was not valid: verdict:" in retry[2]["content"]
    dispatched = next(step for step in state["steps"] if step["kind"] == "role" and step["role"] == "dispatcher")
    assert dispatched["parse_errors"] == ["no JSON object in the reply"] and not dispatched["content"]["fallback"]


def test_a_role_that_fails_twice_takes_its_defined_fallback(wisdom_server, tiny_policy, scene, tmp_path):
    script = RoleScript(dispatcher=["vision please"], referee=["yes"], summarizer=["{}"])
    state = run(wisdom_server(script), tiny_policy, scene, ImageStore(tmp_path), max_rounds=2)
    assert state["rounds"] == 2 and state["parse_failures"] == 2 * (2 + 2)  # two roles, two tries, two rounds
    assert all(e["question"] == "What color is the square?" for e in state["memory"])  # dispatcher's fallback
    assert state["verdict"] == "UNSOLVABLE" and state["answer"]  # referee's fallback, then the direct answer


class Counting(ChatPolicy):
    """The real model underneath, counting the conversations of each chat call it receives."""

    def __init__(self, policy: ChatPolicy) -> None:
        self.policy, self.name, self.white_box, self.batches = policy, policy.name, policy.white_box, []

    def chat(self, conversations, params=None):
        self.batches.append(len(conversations))
        return self.policy.chat(conversations, params)


def test_independent_vision_sub_questions_fan_out_and_batch(wisdom_server, tiny_policy, scene, tmp_path):
    two = json.dumps({"expert": "vision", "sub_questions": ["What shape is it?", "What color is it?"]})
    script = RoleScript(dispatcher=[two], referee=[SOLVED], summarizer=['{"answer": "a blue square"}'])
    counting = Counting(tiny_policy)
    with MicroBatcher(counting, max_batch=8, max_wait_ms=500) as eyesight:
        state = run(wisdom_server(script), eyesight, scene, ImageStore(tmp_path))
    assert sorted(e["question"] for e in state["memory"]) == ["What color is it?", "What shape is it?"]
    assert counting.batches == [2]  # the two Send branches reached the model as one batch
    assert roles(state) == ["dispatcher", "vision expert", "vision expert", "referee", "summarizer"]


def test_wisdom_endpoint_on_the_command_line(wisdom_server, tiny_model_dir, tmp_path, capsys):
    from foveate.cli import main

    image = tmp_path / "scene.png"
    Image.new("RGB", (64, 64), "red").save(image)
    url = wisdom_server(RoleScript(dispatcher=[VISION], referee=[SOLVED], summarizer=['{"answer": "red"}']))
    argv = ["ask", str(image), "What color?", "-s", "proreason", "--model", str(tiny_model_dir)]
    main([*argv, "--wisdom-endpoint", url, "--wisdom-model", "wisdom", "--max-new-tokens", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] == "red" and [s["role"] for s in out["trace"]["steps"] if s["kind"] == "role"][-1] == (
        "summarizer"
    )


def test_wisdom_defaults_to_the_eyesight_and_needs_a_model_name_with_an_endpoint(tiny_policy):
    context = FoveateContext(policy=tiny_policy)
    assert wisdom_policy(context) is tiny_policy  # nothing configured: text-only calls go to the VLM
    assert make_wisdom_policy() is None
    with pytest.raises(FoveateError, match="--wisdom-endpoint needs --wisdom-model"):
        make_wisdom_policy(endpoint="http://127.0.0.1:9/v1")


def test_role_replies_parse_strictly() -> None:
    assert first_json_object('Sure! {"a": 1} and {"b": 2}') == {"a": 1}
    assert parse_reply('<think>hm</think>{"expert": "vision", "sub_questions": [" q "]}', Dispatch).sub_questions == [
        "q"
    ]
    for bad, reason in [
        ('{"expert": "eyes", "sub_questions": ["q"]}', "expert"),
        ('{"expert": "vision", "sub_questions": []}', "sub_questions"),
        ('{"expert": "vision", "sub_questions": [""]}', "must not be empty"),
        ("[1, 2]", "no JSON object"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_reply(bad, Dispatch)


@pytest.mark.slow
def test_ask_proreason_on_the_demo_model_falls_back_as_defined(tmp_path):
    """The demo model as eyesight and wisdom: it writes no JSON, so every role takes its fallback and, after
    max_rounds, the direct answer comes back."""
    import subprocess
    import sys

    image = ROOT / "examples" / "world" / "images" / "large-7-000002.png"
    command = [sys.executable, "-m", "foveate.cli", "ask", str(image), "What color is the medium-sized square?"]
    command += ["-s", "proreason", "-o", "max_rounds=1", "-o", "role_max_new_tokens=16", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**_env(tmp_path)})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    steps = out["trace"]["steps"]
    assert out["answer"] and steps[-2]["node"] == "direct" and "no solution in 1 rounds" in steps[-2]["fallback"]
    assert [s["role"] for s in steps if s["kind"] == "role"] == ["dispatcher", "vision expert", "referee"]


def _env(home: Path) -> dict[str, str]:
    import os

    return {**os.environ, "FOVEATE_HOME": str(home)}


@pytest.mark.slow
def test_eval_runs_proreason_with_a_wisdom_llm_that_is_part_of_the_cache_key(wisdom_server, tiny_policy, tmp_path):
    from foveate.eval.runner import TaskSet, load_eval_tasks, run_eval

    rows = load_eval_tasks(ROOT / "examples" / "world" / "tasks.jsonl")[:2]
    tasks = TaskSet(name="examples", key="examples", rows=rows, path=ROOT / "examples" / "world" / "tasks.jsonl")
    script = RoleScript(dispatcher=[VISION], referee=[SOLVED], summarizer=['{"answer": "yes"}'])
    url = wisdom_server(script)
    items = tmp_path / "items.jsonl"

    def evaluate(wisdom):
        return run_eval(
            tasks, ["proreason"], tiny_policy, items_path=items, store=ImageStore(tmp_path / "images"),
            max_new_tokens=8, wisdom=wisdom, strategy_options={"proreason": {"max_rounds": 1}},
        )  # fmt: skip

    first = evaluate(OpenAIChatPolicy(url, "wisdom"))
    assert [r["prediction"] for r in first] == ["yes", "yes"] and [r["score"] for r in first] == [1.0, 0.0]
    assert len(script.asked["summarizer"]) == 2 and first[0]["wisdom"]
    evaluate(OpenAIChatPolicy(url, "wisdom"))  # same wisdom: cached, the LLM is not asked again
    assert len(script.asked["summarizer"]) == 2
    evaluate(None)  # no wisdom LLM (the VLM answers every role): a different run, not the cached one
    assert len(script.asked["summarizer"]) == 2 and len(items.read_text().splitlines()) == 4


def test_a_follow_up_question_in_a_thread_starts_with_an_empty_memory(wisdom_server, tiny_policy, scene, tmp_path):
    from langchain_core.messages import HumanMessage
    from langgraph.checkpoint.memory import InMemorySaver

    script = RoleScript(dispatcher=[VISION], referee=[SOLVED], summarizer=['{"answer": "blue"}'])
    store = ImageStore(tmp_path)
    graph = get_builder("proreason")(checkpointer=InMemorySaver())
    context = FoveateContext(policy=tiny_policy, wisdom=OpenAIChatPolicy(wisdom_server(script), "wisdom"), store=store,
                             max_new_tokens=8)  # fmt: skip
    config = {"configurable": {"thread_id": "t"}}
    graph.invoke({"image": store.put(scene), "question": "What color is the square?"}, config, context=context)
    follow_up = {"messages": [HumanMessage(content="And its shape?")]}  # as `foveate chat` sends it
    state = graph.invoke(follow_up, config, context=context)
    assert state["question"] == "And its shape?" and len(state["memory"]) == 1 and state["rounds"] == 1
    assert state["parse_failures"] == 0 and len(state["messages"]) == 4  # both turns kept in the transcript
    assert "What color is the square?" not in script.asked["referee"][-1][0]["content"].split("known")[0]
