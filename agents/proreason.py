"""ProReason: decoupled eyesight (a VLM that sees) and wisdom (an LLM that reasons, blind), in a loop of roles.

Paper: "ProReason: Multi-Modal Proactive Reasoning with Decoupled Eyesight and Wisdom" (RESEARCH.md §4).

    intake → dispatch ─┬─ vision ×n (LangGraph Send: one branch per independent sub-question) ─┬→ referee
                       └─ reasoning ───────────────────────────────────────────────────────────┘
    referee ─┬─ CAN_SOLVE → summarize ─┬─ answer → END
             │                         └─ no valid answer → direct → END
             ├─ UNSOLVABLE, rounds < max_rounds → dispatch
             └─ UNSOLVABLE after max_rounds (8) → direct (a plain VLM answer, marked as fallback) → END

Roles (prompts and schemas in `agents.proreason_roles`):
- **Dispatcher** (wisdom, blind): from the question and the memory, picks the vision expert with one or more
  independent sub-questions, or the reasoning expert with one. Each dispatch is one round.
- **Vision expert** (eyesight: the VLM on the image): answers its sub-question "step by step" in free text;
  the answer (without a leading ``<think>`` block) goes into the memory.
- **Reasoning expert** (wisdom, blind): reasons over the memory; only its final ``answer`` is stored.
- **Referee** (wisdom, blind): CAN_SOLVE or UNSOLVABLE from the memory.
- **Summarizer** (wisdom, blind): answers the question from the memory alone.

Structured output: every wisdom role replies in JSON validated by a pydantic schema; an invalid reply is sent
back once with the validation error. Each invalid reply adds one to ``parse_failures`` (state and trace), never
to ``rounds``. When the retry fails too: the dispatcher sends the original question to the vision expert, the
reasoning expert's raw reply is stored, the referee's verdict is UNSOLVABLE, and the summarizer gives way to the
direct answer.

Batching: the vision sub-questions of one dispatch fan out as parallel Send branches; on a batching policy
(`policies.batching.MicroBatcher`, which ``foveate serve`` and ``foveate eval`` use) their calls reach the model
as one padded batch. Under ``foveate ask`` with a bare backend the branches' calls run one after another.

Policies: ``eyesight`` is the run's VLM (``--model``/``--endpoint``); ``wisdom`` is ``--wisdom-model`` /
``--wisdom-endpoint`` or the config's ``wisdom_model``/``wisdom_endpoint``, else the VLM answering text-only.

Deviations from the paper: the reference parses free text; here roles answer in validated JSON with one retry.
The dispatcher may send several independent vision sub-questions at once (the paper asks one per round).
Greedy decoding everywhere.
"""

from __future__ import annotations

from typing import Annotated, Any

from langchain_core.messages import AIMessage
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import Send

from foveate.agents.proreason_roles import (
    DISPATCH_PROMPT,
    REASON_PROMPT,
    REFEREE_PROMPT,
    SUMMARY_PROMPT,
    Dispatch,
    Reasoned,
    RoleTurn,
    Summary,
    Verdict,
    ask_role,
    memory_text,
    vision_message,
)
from foveate.agents.state import (
    AgentState,
    FoveateContext,
    answer_update,
    image_refs,
    intake,
    prompt_for_trace,
    resolve_context,
    to_policy_messages,
    wisdom_policy,
)
from foveate.errors import FoveateError
from foveate.policies.base import SamplingParams
from foveate.protocol import strip_thought
from foveate.trace import answer_step, model_call_step, role_step


def _memory(old: list[dict] | None, new: list[dict] | None) -> list[dict]:
    """Memory reducer: appends; ``None`` clears it (a new question in a thread starts with an empty memory)."""
    return [] if new is None else [*(old or []), *new]


def _count(old: int | None, new: int | None) -> int:
    """Counter reducer: adds; ``None`` resets to 0."""
    return 0 if new is None else (old or 0) + new


class ProReasonState(AgentState, total=False):
    memory: Annotated[list[dict], _memory]  # expert answers: {"round", "expert", "question", "answer"}
    rounds: int  # dispatches so far (at most max_rounds)
    parse_failures: Annotated[int, _count]  # invalid role replies (retries included), apart from rounds
    dispatch: dict  # the last dispatch: {"expert", "sub_questions", "fallback"}
    verdict: str  # the referee's last verdict


def _turn_steps(node: str, role: str, turn: RoleTurn, content: Any, **extra: Any) -> list[dict[str, Any]]:
    """Trace steps of a structured role turn: each model call, then the role's decision with what it saw."""
    steps = [
        model_call_step(node, prompt, result, role=role, attempt=i) for i, (prompt, result) in enumerate(turn.calls)
    ]
    if turn.errors:
        extra["parse_errors"] = turn.errors
    return [*steps, role_step(node, role, content, **extra)]


def build(checkpointer: Any = None, *, max_rounds: int = 8, role_max_new_tokens: int | None = None, retries: int = 1):
    """The compiled ProReason graph: at most ``max_rounds`` dispatches, ``retries`` re-asks per invalid reply;
    wisdom replies get ``role_max_new_tokens`` (None: the run's ``max_new_tokens``, the cap of every call)."""
    if max_rounds < 1 or (role_max_new_tokens is not None and role_max_new_tokens < 1) or retries < 0:
        raise FoveateError("proreason needs max_rounds >= 1, role_max_new_tokens >= 1 and retries >= 0")

    def role_params(context: FoveateContext) -> SamplingParams:
        return context.sampling(max_new_tokens=role_max_new_tokens or context.max_new_tokens)

    def intake_node(state: ProReasonState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
        update = intake(state, resolve_context(runtime).store)
        return {**update, "memory": None, "rounds": 0, "parse_failures": None, "verdict": "", "answer": ""}

    def dispatch_node(state: ProReasonState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
        context = resolve_context(runtime)
        memory, rounds = state.get("memory", []), state.get("rounds", 0) + 1
        prompt = DISPATCH_PROMPT.format(question=state["question"], memory=memory_text(memory))
        turn = ask_role(wisdom_policy(context), prompt, Dispatch, role_params(context), retries)
        fallback = turn.value is None
        choice = Dispatch(expert="vision", sub_questions=[state["question"]]) if fallback else turn.value
        decision = {**choice.model_dump(), "fallback": fallback}
        steps = _turn_steps("dispatch", "dispatcher", turn, decision, round=rounds, memory=memory)
        return {"rounds": rounds, "dispatch": decision, "parse_failures": turn.failures, "steps": steps}

    def route_dispatch(state: ProReasonState) -> list[Send] | str:
        decision = state["dispatch"]
        if decision["expert"] == "reasoning":
            return "reasoning"
        payload = {"image": state["image"], "round": state["rounds"]}
        return [Send("vision", {**payload, "sub_question": q}) for q in decision["sub_questions"]]

    def vision_node(task: dict[str, Any], runtime: Runtime[FoveateContext]) -> dict[str, Any]:
        """The eyesight: the VLM on the image, one sub-question (one Send branch)."""
        context = resolve_context(runtime)
        message = vision_message(context.store.get(task["image"]), task["sub_question"])
        result = context.policy.chat_one([message], context.sampling())
        answer = strip_thought(result.text) or result.text.strip()
        entry = {"round": task["round"], "expert": "vision", "question": task["sub_question"], "answer": answer}
        prompt = prompt_for_trace([message], [task["image"]])
        steps = [
            model_call_step("vision", prompt, result, role="vision expert"),
            role_step("vision", "vision expert", entry),
        ]
        return {"memory": [entry], "steps": steps}

    def reasoning_node(state: ProReasonState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
        context = resolve_context(runtime)
        memory, sub_question = state.get("memory", []), state["dispatch"]["sub_questions"][0]
        prompt = REASON_PROMPT.format(question=state["question"], memory=memory_text(memory), sub_question=sub_question)
        turn = ask_role(wisdom_policy(context), prompt, Reasoned, role_params(context), retries)
        raw = strip_thought(turn.calls[-1][1].text) or turn.calls[-1][1].text
        answer = turn.value.answer if turn.value is not None else raw.strip()[:500]
        entry = {"round": state["rounds"], "expert": "reasoning", "question": sub_question, "answer": answer}
        steps = _turn_steps("reasoning", "reasoning expert", turn, entry, memory=memory, fallback=turn.value is None)
        return {"memory": [entry], "parse_failures": turn.failures, "steps": steps}

    def referee_node(state: ProReasonState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
        context = resolve_context(runtime)
        memory = state.get("memory", [])
        prompt = REFEREE_PROMPT.format(question=state["question"], memory=memory_text(memory))
        turn = ask_role(wisdom_policy(context), prompt, Verdict, role_params(context), retries)
        verdict = turn.value.model_dump() if turn.value is not None else {"verdict": "UNSOLVABLE", "reason": ""}
        steps = _turn_steps("referee", "referee", turn, verdict, memory=memory, fallback=turn.value is None)
        return {"verdict": verdict["verdict"], "parse_failures": turn.failures, "steps": steps}

    def route_referee(state: ProReasonState) -> str:
        if state.get("verdict") == "CAN_SOLVE":
            return "summarize"
        return "direct" if state.get("rounds", 0) >= max_rounds else "dispatch"

    def summarize_node(state: ProReasonState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
        context = resolve_context(runtime)
        memory = state.get("memory", [])
        prompt = SUMMARY_PROMPT.format(question=state["question"], memory=memory_text(memory))
        turn = ask_role(wisdom_policy(context), prompt, Summary, role_params(context), retries)
        answer = turn.value.answer.strip() if turn.value is not None else ""
        totals = {"rounds": state.get("rounds", 0), "parse_failures": state.get("parse_failures", 0) + turn.failures}
        steps = _turn_steps("summarize", "summarizer", turn, {"answer": answer}, memory=memory, **totals)
        update: dict[str, Any] = {"parse_failures": turn.failures, "steps": steps}
        if answer:
            update.update(answer=answer, messages=[AIMessage(content=answer)])
            steps.append(answer_step("summarize", answer))
        return update

    def direct_node(state: ProReasonState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
        """Fallback: the VLM answers the conversation directly (no CAN_SOLVE in time, or no valid summary)."""
        context = resolve_context(runtime)
        messages = to_policy_messages(state["messages"], context.store)
        result = context.policy.chat_one(messages, context.sampling())
        if state.get("verdict") == "CAN_SOLVE":
            reason = "the summarizer gave no valid answer; answered directly"
        else:
            reason = f"the referee found no solution in {state.get('rounds', 0)} rounds; answered directly"
        prompt = prompt_for_trace(messages, image_refs(state["messages"]))
        return answer_update("direct", prompt, result, fallback=reason, parse_failures=state.get("parse_failures", 0))

    builder = StateGraph(ProReasonState, context_schema=FoveateContext)
    for name, node in [
        ("intake", intake_node),
        ("dispatch", dispatch_node),
        ("vision", vision_node),
        ("reasoning", reasoning_node),
        ("referee", referee_node),
        ("summarize", summarize_node),
        ("direct", direct_node),
    ]:
        builder.add_node(name, node)
    builder.add_edge(START, "intake")  # every run starts by normalising its input (and clearing the memory)
    builder.add_edge("intake", "dispatch")  # the blind dispatcher decides what to find out first
    builder.add_conditional_edges("dispatch", route_dispatch, ["vision", "reasoning"])  # vision fans out (Send)
    builder.add_edge("vision", "referee")  # all vision branches of a round join here
    builder.add_edge("reasoning", "referee")
    builder.add_conditional_edges("referee", route_referee, ["summarize", "dispatch", "direct"])
    builder.add_conditional_edges(  # a valid summary ends the run; otherwise the VLM answers directly
        "summarize", lambda state: END if state.get("answer") else "direct", [END, "direct"]
    )
    builder.add_edge("direct", END)
    return builder.compile(checkpointer=checkpointer, name="proreason")


graph = build()
