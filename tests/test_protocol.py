"""The look-first answer format and the thought stripping every strategy's final answer goes through."""

from __future__ import annotations

from PIL import Image
from scripted import Scripted

from foveate import protocol
from foveate.agents.direct import build
from foveate.api import run_strategy
from foveate.tools.store import ImageStore


def test_look_answer_and_strip_thought_round_trip() -> None:
    text = protocol.look_answer(["the red star", "the small circle"], "yes")
    assert text == "<think>the red star; the small circle yes</think>yes"
    assert protocol.strip_thought(text) == "yes"
    assert protocol.strip_thought("  blue \n") == "blue"  # no thought: just stripped
    assert protocol.strip_thought("<think>the red star</think>\n blue") == "blue"
    assert protocol.strip_thought("<think>the red st") == ""  # cut inside the thought: no answer, not the thought
    assert protocol.strip_thought("blue <think>x</think>") == "blue <think>x</think>"  # only a leading block


def test_direct_answer_drops_the_thought_and_the_trace_keeps_it(tmp_path) -> None:
    """Scripted policy: the test needs one exact look-first reply, which the untrained tiny model cannot give."""
    store = ImageStore(tmp_path / "images")
    inputs = {"image": store.put(Image.new("RGB", (64, 64), "red")), "question": "What color is the square?"}
    policy = Scripted(["<think>the square red</think>red"])
    result = run_strategy(build(), inputs, strategy="direct", policy=policy, store=store)
    assert result.answer == "red"
    call = next(step for step in result.trace.steps if step["kind"] == "model_call")
    assert call["outputs"] == ["<think>the square red</think>red"]
