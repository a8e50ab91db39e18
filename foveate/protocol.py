"""The prompt and answer formats shared by the strategies and the demo model's training data.

One module so that a strategy and the data that taught the demo model to follow it can never drift apart.
Boxes that a model writes are in the model's own convention (the demo model and Qwen2-VL: integers 0–1000 of
the image width/height); strategies convert them at the policy edge with ``tools.boxes``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

GENERIC_PROMPT = "Write a general description of the image."  # ViCrop's generic prompt (rel-att denominator)
DESCRIBE_PROMPT = "Describe the image in detail."
GROUNDING_PROMPT = "Locate the {reference}. Answer with its bounding box."
VISRL_FOCUS_SUFFIX = "\nFirst give the focus box for the question."
VISRL_ANSWER_PROMPT = "Here is the focus region. Answer the question."
DEEPEYES_SUFFIX = "\nThink first. Zoom in with image_zoom_in_tool if a detail is too small, then answer."
ZOOM_TOOL_NAME = "image_zoom_in_tool"

# The zoom tool's schema exactly as TRL renders it into DeepEyes GRPO prompts (transformers' get_json_schema of
# `rl.zoom_env.ZoomEnvironment.image_zoom_in_tool`; tests/test_rl_grpo.py checks the two are equal), so a model
# trained there sees the same system turn when the `deepeyes` strategy runs with ``tool_schema``.
ZOOM_TOOL_SCHEMA = {
    "type": "function",
    "function": {
        "name": ZOOM_TOOL_NAME,
        "description": "Zoom in on a region of the original image and return the crop.",
        "parameters": {
            "type": "object",
            "properties": {
                "bbox_2d": {
                    "type": "array",
                    "items": {"type": "number"},
                    "nullable": True,
                    "description": "the region [x1, y1, x2, y2] of the original image",
                },
                "label": {"type": "string", "nullable": True, "description": "what is in the region"},
            },
            "required": ["bbox_2d"],
        },
        "return": {},
    },
}


def tools_system_prompt(tools: Sequence[dict]) -> str:
    """The system turn a Qwen2.5-style chat template writes for ``tools=`` (policies/chat_template.jinja, and
    Qwen2.5-VL's own template: "# Tools ... <tools> one JSON per line </tools> ..."), as plain text, so a strategy
    can send it through any backend's ``chat`` as a system message. JSON as the templates' ``tojson`` writes it."""
    listed = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\nYou may call one or more functions. Function signatures:\n<tools>"
        + listed
        + '\n</tools>\nReturn a function call as <tool_call>{"name": <function-name>, "arguments": <args-json-object>}'
        "</tool_call>"
    )


def box_json(box: Sequence[float]) -> str:
    """A box answer as the demo model writes it: ``{"bbox_2d": [x1, y1, x2, y2]}`` with integers."""
    return json.dumps({"bbox_2d": [int(round(v)) for v in box]})


THOUGHT_OPEN, THOUGHT_CLOSE = "<think>", "</think>"


def think_answer(thought: str, answer: str) -> str:
    """A DeepEyes-format final turn."""
    return f"{THOUGHT_OPEN}{thought}{THOUGHT_CLOSE}\n<answer>{answer}</answer>"


def look_answer(referents: Sequence[str], answer: str) -> str:
    """A short answer that first names what it looks at: ``<think>the red star blue</think>blue``.

    The demo model's look-first format (`rl.sft_data.DataMix.look_first`). The thought restates the question's
    referents and then the answer, so the answer is first predicted AT the referent's last word: the decoder's
    lookup of "which object" then has the referent's own embedding as its query, and needs no earlier layer to
    carry the question there. A separator between the two (``the red star</think>blue``) does not do this:
    measured while building the demo model (`bench/binding_symbolic.py`, now in git history), the adjacent
    form binds in about 450 steps, the separated one is at chance after 900.
    The answer after the thought is a copy of the one inside it.
    """
    return f"{THOUGHT_OPEN}{'; '.join(referents)} {answer}{THOUGHT_CLOSE}{answer}"


def look_parts(reply: str) -> tuple[str, str] | None:
    """A look-first reply split into its thought (between the tags) and the answer after it: ("the red circle",
    "circle") from ``<think>the red circle</think>circle``. None without a closed leading thought, or with an
    empty answer or one that is not plain text (DeepEyes' ``<answer>…</answer>``, a tool call)."""
    stripped = reply.strip()
    if not stripped.startswith(THOUGHT_OPEN):
        return None
    thought, close, answer = stripped[len(THOUGHT_OPEN) :].partition(THOUGHT_CLOSE)
    answer = answer.strip()
    if not close or not answer or "<" in answer:
        return None
    return thought, answer


def strip_thought(text: str) -> str:
    """The reply without a leading ``<think>…</think>`` block (reasoning models' and the look-first format's).

    An unclosed block (generation cut short inside it) leaves no answer: "".
    """
    stripped = text.strip()
    if not stripped.startswith(THOUGHT_OPEN):
        return stripped
    closing = stripped.find(THOUGHT_CLOSE)
    return "" if closing < 0 else stripped[closing + len(THOUGHT_CLOSE) :].strip()
