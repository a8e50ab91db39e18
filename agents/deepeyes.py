"""DeepEyes: interleaved thinking with images — the model zooms with a tool until it can answer (inference).

Paper: "DeepEyes: Incentivizing 'Thinking with Images' via Reinforcement Learning" (RESEARCH.md §2). The model
writes ``<think>…</think>`` and then either a ``<tool_call>`` of ``image_zoom_in_tool`` (``bbox_2d`` on the
original image, optional ``label``) or ``<answer>…</answer>``. Each tool call is executed on the ORIGINAL image
and its crop comes back as the next turn, until the model answers or the turn limit is reached.

Graph::

    intake → start → model ─┬─ answer, or the turn limit is reached ──→ finish → END
                     ▲      └─ tool call or malformed reply ─→ tool ─┐
                     └───────────────────────────────────────────────┘

The conversation is exactly the demo model's training format (``rl.sft_data.deepeyes``):

    user       [image, question + DEEPEYES_SUFFIX]
    assistant  "<think>…</think>\\n" + tool_calls=[image_zoom_in_tool {"bbox_2d": [...]}]
    tool       [crop image]
    …
    assistant  "<think>…</think>\\n<answer>…</answer>"

A tool call goes back as the assistant's ``tool_calls`` (content = the text before the call), so the chat
template renders ``<tool_call>{"name": …, "arguments": …}</tool_call>`` exactly as the model wrote it (for a
call written in canonical JSON; other spellings come back canonicalised). Over an OpenAI-compatible server the
same messages travel as the API's tool calls and tool messages, with the crop as an image part of the tool
message (``images_in_tool_turns=False`` on the backend moves it into a following user turn).

Replies are parsed and the tool is run by ``agents.zoom_tool`` (what is accepted: its docstring). Errors the
model sees:

- a structurally valid call that the tool refuses (unknown tool, no/non-numeric/inverted/out-of-image bbox_2d,
  short side ≤ 30 px or aspect ratio > 100 after clipping) → a ``tool`` message ``"Error: …"`` answering it;
- a reply that is not a call at all (no tags, unparseable JSON, empty answer) → the reply stays as assistant
  text and a ``user`` message ``"Error: …"`` follows (a ``tool`` message would answer no call, which
  OpenAI-compatible servers reject).

Both count as a turn. Termination: at most ``max_turns`` (default 5, DeepEyes' training cap) tool/error turns,
so at most ``max_turns + 1`` model calls. When the reply after the last allowed turn is still not an answer, the
run ends with NO ANSWER: ``answer`` is ``""``, ``outcome`` says why, the transcript gets ``(no answer: …)``, and
the unexecuted call is traced with an error. (We do not add an "answer now" instruction: neither DeepEyes nor the
demo model was trained on one, and an untrained prompt would measure prompt-following, not the method.)

Deviations from the paper: boxes are read in the policy's own convention (``policy.box_convention``; the demo
model writes 0–1000 like Qwen2-VL) and converted at the edge, where DeepEyes' Qwen2.5-VL writes pixels; no tool
schema is put in a system prompt by default, because the demo model was trained without one; ``-o tool_schema=true``
sends it as TRL's GRPO prompts do (a model trained by `foveate train grpo`, or a stock model that needs it).
Earlier turns of a thread are sent before the question as plain text turns; a single question gets exactly the
training format. Decoding is greedy with the run's ``max_new_tokens`` per call.

Every model call, tool call (arguments, result ref or error) and crop (box in original pixels) is traced; crops
live in the image store and the state holds refs only.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

from langchain_core.messages import AIMessage
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from foveate.agents.state import (
    AgentState,
    FoveateContext,
    image_refs,
    intake,
    prompt_for_trace,
    resolve_context,
    to_policy_messages,
)
from foveate.agents.zoom_tool import Reply, ToolCall, ToolError, parse_reply, run_zoom, tool_call_message
from foveate.errors import FoveateError
from foveate.protocol import DEEPEYES_SUFFIX, ZOOM_TOOL_SCHEMA, tools_system_prompt
from foveate.tools.store import ImageStore
from foveate.trace import answer_step, crop_step, model_call_step, tool_call_step

DEFAULT_MAX_TURNS = 5  # DeepEyes' cap on tool turns during training


class DeepEyesState(AgentState, total=False):
    dialogue: list[dict]  # this question's conversation in policy format, images as {"type": "image", "ref": …}
    turns: int  # tool/error turns taken for this question
    reply: dict  # the last model reply, parsed (agents.zoom_tool.Reply as a dict)
    crops: list[str]  # refs of the crops returned so far
    crop_boxes: list[list[float]]  # their regions, original pixels
    outcome: str  # "answer", or "no answer: <why>"


def materialise(dialogue: list[dict], store: ImageStore) -> list[dict]:
    """The dialogue as policy messages: every ``{"type": "image", "ref": …}`` part becomes a PIL image."""
    loaded: dict[str, Any] = {}
    messages = []
    for message in dialogue:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image" and "ref" in part:
                    ref = part["ref"]
                    if ref not in loaded:
                        loaded[ref] = store.get(ref)
                    parts.append({"type": "image", "image": loaded[ref]})
                else:
                    parts.append(dict(part))
            message = {**message, "content": parts}
        messages.append(message)
    return messages


def _reply_from_state(data: dict) -> Reply:
    call = ToolCall(**data["call"]) if data.get("call") else None
    return Reply(**{**data, "call": call})


# ---- nodes --------------------------------------------------------------------------------------------------
def intake_node(state: DeepEyesState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
    return intake(state, resolve_context(runtime).store)


def start_node(state: DeepEyesState, runtime: Runtime[FoveateContext], tool_schema: bool = False) -> dict[str, Any]:
    """Open this question's dialogue: the tool's system turn with ``tool_schema``, earlier turns of the thread,
    then [image, question + DEEPEYES_SUFFIX]."""
    context = resolve_context(runtime)
    earlier = state["messages"][:-1]
    dialogue = prompt_for_trace(to_policy_messages(earlier, context.store), image_refs(earlier))
    question = {
        "role": "user",
        "content": [
            {"type": "image", "ref": state["image"]},
            {"type": "text", "text": state["question"] + DEEPEYES_SUFFIX},
        ],
    }
    system = [{"role": "system", "content": tools_system_prompt([ZOOM_TOOL_SCHEMA])}] if tool_schema else []
    return {
        "dialogue": [*system, *dialogue, question],
        "turns": 0,
        "reply": {},
        "crops": [],
        "crop_boxes": [],
        "outcome": "",
    }


def model_node(state: DeepEyesState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
    """One model call on the dialogue so far; the parsed reply is appended as the assistant turn."""
    context = resolve_context(runtime)
    dialogue = state["dialogue"]
    result = context.policy.chat_one(materialise(dialogue, context.store), context.sampling())
    reply = parse_reply(result.text)
    if reply.kind == "tool_call":
        message = {
            "role": "assistant",
            "content": reply.content,
            "tool_calls": [tool_call_message(reply.call, f"call_{state['turns']}")],
        }
    else:
        message = {"role": "assistant", "content": reply.text}
    step = model_call_step(
        "model",
        copy.deepcopy(dialogue),
        result,
        turn=state["turns"],
        reply=reply.kind,
        error=reply.error,
        notes=reply.notes,
    )
    return {"dialogue": [*dialogue, message], "reply": asdict(reply), "steps": [step]}


def tool_node(state: DeepEyesState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
    """Run the zoom (or report the malformed reply) and append the turn the model sees next."""
    context = resolve_context(runtime)
    reply = _reply_from_state(state["reply"])
    turn = state["turns"]
    update: dict[str, Any] = {"turns": turn + 1}
    if reply.kind == "malformed":
        message = {"role": "user", "content": [{"type": "text", "text": f"Error: {reply.error}"}]}
        update["steps"] = [tool_call_step("tool", "", reply.text, error=reply.error)]
    else:
        call = reply.call
        call_id = f"call_{turn}"
        try:
            zoom = run_zoom(call, context.store.get(state["image"]), context.policy)
        except ToolError as error:
            message = {"role": "tool", "tool_call_id": call_id, "content": f"Error: {error}"}
            update["steps"] = [tool_call_step("tool", call.name, call.arguments, error=str(error))]
        else:
            ref = context.store.put(zoom.image)
            box = zoom.box.to_list()
            message = {"role": "tool", "tool_call_id": call_id, "content": [{"type": "image", "ref": ref}]}
            reason = f"{call.name} turn {turn}" + (f": {zoom.label}" if zoom.label else "")
            update["steps"] = [
                tool_call_step("tool", call.name, call.arguments, result=ref),
                crop_step("tool", state["image"], box, ref, reason=reason),
            ]
            update["crops"] = [*state.get("crops", []), ref]
            update["crop_boxes"] = [*state.get("crop_boxes", []), box]
    update["dialogue"] = [*state["dialogue"], message]
    return update


def finish_node(state: DeepEyesState) -> dict[str, Any]:
    """The answer from the last reply, or a clear no-answer when the turn limit ended the loop."""
    reply = _reply_from_state(state["reply"])
    if reply.kind == "answer":
        step = {**answer_step("finish", reply.answer), "outcome": "answer"}
        return {
            "answer": reply.answer,
            "outcome": "answer",
            "messages": [AIMessage(content=reply.answer)],
            "steps": [step],
        }
    reason = f"no <answer> within the limit of {state['turns']} tool turns"
    outcome = f"no answer: {reason}"
    name = reply.call.name if reply.call else ""
    arguments = reply.call.arguments if reply.call else reply.text
    not_run = tool_call_step("finish", name, arguments, error=f"not run: {reason} (last reply: {reply.kind})")
    step = {**answer_step("finish", ""), "outcome": outcome}
    return {"answer": "", "outcome": outcome, "messages": [AIMessage(content=f"({outcome})")], "steps": [not_run, step]}


# ---- wiring -------------------------------------------------------------------------------------------------
def build(checkpointer: Any = None, *, max_turns: int = DEFAULT_MAX_TURNS, tool_schema: bool = False):
    """The compiled DeepEyes graph: at most ``max_turns`` tool/error turns per question, so at most
    ``max_turns + 1`` model calls. ``tool_schema``: open with the zoom tool's schema in a system turn, as TRL's
    GRPO prompts do (`protocol.tools_system_prompt`): for a model trained by `foveate train grpo`, or a stock model
    that needs to be told of the tool. Pass a checkpointer (e.g. SqliteSaver) for durable threads."""
    if max_turns < 0:
        raise FoveateError(f"max_turns must be >= 0, got {max_turns}")

    def start(state: DeepEyesState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
        return start_node(state, runtime, tool_schema=tool_schema)

    def after_model(state: DeepEyesState) -> str:
        if state["reply"]["kind"] == "answer":
            return "finish"  # the model answered
        if state["turns"] >= max_turns:
            return "finish"  # the turn budget is spent: stop with no answer
        return "tool"  # run the zoom (or report the malformed reply) and ask again

    builder = StateGraph(DeepEyesState, context_schema=FoveateContext)
    builder.add_node("intake", intake_node)
    builder.add_node("start", start)
    builder.add_node("model", model_node)
    builder.add_node("tool", tool_node)
    builder.add_node("finish", finish_node)
    builder.add_edge(START, "intake")  # every run starts by normalising its input
    builder.add_edge("intake", "start")  # open the DeepEyes dialogue for this question
    builder.add_edge("start", "model")  # the model thinks first
    builder.add_conditional_edges("model", after_model, ["tool", "finish"])  # answer/limit → finish, else tool
    builder.add_edge("tool", "model")  # the crop (or the error) is the model's next turn
    builder.add_edge("finish", END)
    graph = builder.compile(checkpointer=checkpointer, name="deepeyes")
    # Each turn is two graph steps; keep LangGraph's recursion guard above the loop's own bound.
    return graph.with_config(recursion_limit=2 * max_turns + 10)


graph = build()
