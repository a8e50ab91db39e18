"""Direct answering: one VLM call on the image and the conversation so far. The baseline every method beats.

Graph: ``intake`` (store images as refs, find the question) → ``answer`` (one model call) → END.
Follow-up questions in a thread see the earlier turns, because the whole transcript goes to the model.
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from foveate.agents.state import (
    AgentState,
    FoveateContext,
    answer_update,
    image_refs,
    intake,
    prompt_for_trace,
    resolve_context,
    to_policy_messages,
)


def intake_node(state: AgentState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
    return intake(state, resolve_context(runtime).store)


def answer_node(state: AgentState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
    context = resolve_context(runtime)
    messages = to_policy_messages(state["messages"], context.store)
    result = context.policy.chat_one(messages, context.sampling())
    return answer_update("answer", prompt_for_trace(messages, image_refs(state["messages"])), result)


def build(checkpointer: Any = None):
    """The compiled direct graph; pass a checkpointer (e.g. SqliteSaver) for durable threads."""
    builder = StateGraph(AgentState, context_schema=FoveateContext)
    builder.add_node("intake", intake_node)
    builder.add_node("answer", answer_node)
    builder.add_edge(START, "intake")  # every run starts by normalising its input
    builder.add_edge("intake", "answer")  # the baseline looks once
    builder.add_edge("answer", END)  # and answers
    return builder.compile(checkpointer=checkpointer, name="direct")


graph = build()
