"""VisRL: intention-driven focus — the model states where to look, then answers from the image plus that crop.

Paper: "VisRL: Intention-Driven Visual Perception via Reinforced Reasoning" (RESEARCH.md §3). VisRL trains the
focus step with DPO; this module is its inference procedure, which the demo model is trained to follow
(``rl.sft_data.visrl``). Both steps are one conversation, as in training:

    user       [image, question + VISRL_FOCUS_SUFFIX]
    assistant  {"bbox_2d": [x1, y1, x2, y2]}          ← step 1: the focus box, in the model's convention
    user       [crop, VISRL_ANSWER_PROMPT]             ← step 2: crop of the ORIGINAL image
    assistant  answer                                  ← step 3: answered from the full image plus the crop

Graph::

    intake → focus ─┬─ a usable box ─→ crop → answer → END
                    └─ no usable box ─→ answer_full → END

Focus parsing: the first ``[x1, y1, x2, y2]`` in the reply (the value of ``{"bbox_2d": …}`` or a bare list) in
``policy.box_convention``, converted to original pixels at the policy edge (``agents.zoom_tool``), clipped to the
image. A reply without one, or with a non-numeric, inverted, empty or out-of-image box, is unusable: the run
falls back to answering from the full image alone with the plain question (the demo model's ``qa`` format), and
both the focus call and the fallback call are traced with the reason (``focus_error`` / ``fallback``).

Crop rule (a minimum window, like oracle-crop's): each side of the stated box is grown about its centre to at
least ``min(s, short image side / 2)`` pixels, where ``s`` is the model's input side (``model_input_side``),
and shifted back inside the image; sides already longer are kept. So a tiny box (a point, the object itself)
still yields enough context to read it, while the window is never more than half the image's short side
unless the model asked for more (a stock model with a huge pixel budget still gets a 2x zoom). The demo model
was trained on windows of 180–320 px or 2–4x the evidence on 672-px scenes, close to its 224-px input side,
so its own boxes are rarely grown.

Deviations from the paper: VisRL predicts normalised boxes and trains with an LLM judge; here boxes are in the
policy's convention and the crop gets the minimum window above. Earlier turns of a thread are sent before the
question as plain text turns. Decoding is greedy with the run's ``max_new_tokens``.
"""

from __future__ import annotations

import re
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from foveate.agents.oracle_crop import model_input_side
from foveate.agents.state import (
    AgentState,
    FoveateContext,
    answer_update,
    crop_update,
    image_refs,
    intake,
    prompt_for_trace,
    resolve_context,
    to_policy_messages,
)
from foveate.agents.zoom_tool import model_box_to_pixels, without_vision_tokens
from foveate.errors import BoxError
from foveate.policies.base import ChatPolicy
from foveate.protocol import VISRL_ANSWER_PROMPT, VISRL_FOCUS_SUFFIX
from foveate.tools.boxes import Box
from foveate.trace import model_call_step

_LIST = re.compile(r"\[([^\[\]]*)\]")


class VisRLState(AgentState, total=False):
    focus_output: str  # the model's step-1 reply, as written
    focus_box: list[float]  # the stated box in original pixels ([] when unusable)
    focus_error: str  # why the stated box is unusable ("" when usable)
    crop: str  # image-store ref of the crop
    crop_box: list[float]  # the region actually cropped, original pixels


def parse_focus_box(text: str, image_size: tuple[int, int], policy: ChatPolicy) -> Box:
    """The first ``[x1, y1, x2, y2]`` in ``text`` (policy convention) as a clipped `Box` in original pixels.

    Raises `BoxError` naming what is wrong (no list, wrong length, non-numeric, inverted, outside the image).

    >>> class Qwen2(ChatPolicy): box_convention = "thousand"
    >>> parse_focus_box('{"bbox_2d": [500, 500, 750, 1000]}', (672, 504), Qwen2()).to_list()
    [336.0, 252.0, 504.0, 504.0]
    """
    match = _LIST.search(text or "")
    if match is None:
        raise BoxError("the reply has no box [x1, y1, x2, y2]")
    values = [value.strip() for value in match.group(1).split(",")] if match.group(1).strip() else []
    return model_box_to_pixels(values, image_size, policy)


def focus_window(box: Box, image_size: tuple[int, int], input_side: int) -> Box:
    """The crop region for a stated box: each side at least ``min(input_side, short side / 2)`` (docstring)."""
    min_side = min(float(input_side), min(image_size) / 2)
    return box.pad_to_min_side(min_side, image_size)


def _question_turn(state: VisRLState, suffix: str = VISRL_FOCUS_SUFFIX) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [{"type": "image", "ref": state["image"]}, {"type": "text", "text": state["question"] + suffix}],
    }


def _dialogue(state: VisRLState, context: FoveateContext, *turns: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """(policy messages, trace prompt): earlier thread turns, then ``turns`` whose images are ref parts."""
    earlier = state["messages"][:-1]
    messages = to_policy_messages(earlier, context.store)
    refs = image_refs(earlier)
    for turn in turns:
        if isinstance(turn["content"], str):
            messages.append(dict(turn))
            continue
        parts = []
        for part in turn["content"]:
            if part.get("type") == "image":
                refs.append(part["ref"])
                parts.append({"type": "image", "image": context.store.get(part["ref"])})
            else:
                parts.append(part)
        messages.append({**turn, "content": parts})
    return messages, prompt_for_trace(messages, refs)


# ---- nodes --------------------------------------------------------------------------------------------------
def intake_node(state: VisRLState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
    return intake(state, resolve_context(runtime).store)


def focus_node(state: VisRLState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
    """Step 1: ask for the focus box and parse it."""
    context = resolve_context(runtime)
    messages, prompt = _dialogue(state, context, _question_turn(state))
    result = context.policy.chat_one(messages, context.sampling())
    image_size = context.store.get(state["image"]).size
    try:
        box, error = parse_focus_box(result.text, image_size, context.policy).to_list(), ""
    except BoxError as problem:
        box, error = [], str(problem)
    step = model_call_step("focus", prompt, result, focus_box=box or None, focus_error=error or None)
    # Passed back as the assistant turn: without vision placeholders it cannot claim images that are not there.
    output = without_vision_tokens(result.text).strip()
    return {"focus_output": output, "focus_box": box, "focus_error": error, "steps": [step]}


def crop_node(state: VisRLState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
    """Step 2: crop the original image around the stated box (grown to the minimum window)."""
    context = resolve_context(runtime)
    image = context.store.get(state["image"])
    window = focus_window(Box(*state["focus_box"]), image.size, model_input_side(context.policy))
    reason = f"model focus box {[round(v, 1) for v in state['focus_box']]}"
    return crop_update("crop", state["image"], image, window, context.store, reason)


def answer_node(state: VisRLState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
    """Step 3: answer in the same conversation, given the crop."""
    context = resolve_context(runtime)
    focus_reply = {"role": "assistant", "content": state["focus_output"]}
    crop_turn = {
        "role": "user",
        "content": [{"type": "image", "ref": state["crop"]}, {"type": "text", "text": VISRL_ANSWER_PROMPT}],
    }
    messages, prompt = _dialogue(state, context, _question_turn(state), focus_reply, crop_turn)
    result = context.policy.chat_one(messages, context.sampling())
    return answer_update("answer", prompt, result)


def answer_full_node(state: VisRLState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
    """Fallback when no usable focus box was stated: answer the plain question from the full image alone."""
    context = resolve_context(runtime)
    messages, prompt = _dialogue(state, context, _question_turn(state, suffix=""))
    result = context.policy.chat_one(messages, context.sampling())
    fallback = f"no usable focus box ({state['focus_error']}); answered from the full image alone"
    return answer_update("answer_full", prompt, result, fallback=fallback)


def build(checkpointer: Any = None):
    """The compiled VisRL graph; pass a checkpointer (e.g. SqliteSaver) for durable threads."""
    builder = StateGraph(VisRLState, context_schema=FoveateContext)
    builder.add_node("intake", intake_node)
    builder.add_node("focus", focus_node)
    builder.add_node("crop", crop_node)
    builder.add_node("answer", answer_node)
    builder.add_node("answer_full", answer_full_node)
    builder.add_edge(START, "intake")  # every run starts by normalising its input
    builder.add_edge("intake", "focus")  # step 1: the model says where it needs to look
    builder.add_conditional_edges(  # a usable box is cropped; otherwise answer without one
        "focus", lambda state: "crop" if state.get("focus_box") else "answer_full", ["crop", "answer_full"]
    )
    builder.add_edge("crop", "answer")  # step 2 → 3: the crop goes back into the same conversation
    builder.add_edge("answer", END)
    builder.add_edge("answer_full", END)
    return builder.compile(checkpointer=checkpointer, name="visrl")


graph = build()
