"""State, runtime context and message helpers shared by every strategy graph.

Every graph keeps a ``messages`` key (LangChain messages, merged by ``add_messages``) so LangGraph Studio and
agent-chat-ui can drive it, plus ``image`` (an image-store ref), ``question``, ``answer`` and the trace
``steps``. Images inside messages are replaced by ref parts ``{"type": "image", "ref": "sha256:…"}`` on intake,
so checkpoints hold references, never pixels.

The model backend and the image store arrive through LangGraph's runtime context (``FoveateContext``), not the
state: they are live objects that must not be checkpointed. Where no context is given (``langgraph dev``), the
default policy is loaded on first use.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.graph.message import add_messages
from langgraph.runtime import Runtime

from foveate import protocol
from foveate.errors import FoveateError
from foveate.policies.base import ChatPolicy, SamplingParams, image_source, is_image_part
from foveate.tools.boxes import Box
from foveate.tools.crop import crop as crop_image
from foveate.tools.images import load_image
from foveate.tools.store import ImageStore
from foveate.trace import answer_step, crop_step, model_call_step


class AgentState(TypedDict, total=False):
    """The keys every strategy graph shares."""

    messages: Annotated[list[AnyMessage], add_messages]  # chat transcript; images as store refs
    image: str  # ref of the image the current question is about
    question: str  # the current question (last user text)
    answer: str  # the strategy's final answer to the current question
    steps: Annotated[list[dict], operator.add]  # trace steps, appended by every node
    # Ground-truth evidence boxes [[x1, y1, x2, y2], ...] in original-image pixels, when the caller knows them
    # (the evaluator passes each task row's ``boxes``). Only oracle strategies (oracle-crop) may read them.
    evidence_boxes: list[list[float]]


@dataclass
class FoveateContext:
    """Live objects a run needs: the model backend, the image store and decoding defaults."""

    policy: ChatPolicy | None = None  # None → the default model (loaded once, on first use)
    wisdom: ChatPolicy | None = None  # text-only roles' LLM; None → the configured one, else ``policy``
    store: ImageStore | None = None  # None → the default store under $FOVEATE_HOME
    max_new_tokens: int = 128  # answer length cap for every model call of a strategy

    def sampling(self, **overrides: Any) -> SamplingParams:
        return SamplingParams(**{"max_new_tokens": self.max_new_tokens, **overrides})


def resolve_context(runtime: Runtime[FoveateContext] | None) -> FoveateContext:
    """The run's context with defaults filled in (default policy and store)."""
    from foveate.policies.factory import default_policy

    context = (runtime.context if runtime is not None else None) or FoveateContext()
    policy = context.policy or default_policy()
    store = context.store or ImageStore()
    return FoveateContext(policy=policy, wisdom=context.wisdom, store=store, max_new_tokens=context.max_new_tokens)


def wisdom_policy(context: FoveateContext) -> ChatPolicy:
    """The LLM for text-only roles (ProReason's "wisdom", VPD's programmer): the context's, else the one the
    config names (``wisdom_model`` / ``wisdom_endpoint``), else the eyesight policy itself."""
    from foveate.policies.factory import default_wisdom

    return context.wisdom or default_wisdom() or context.policy


def _parts(message: AnyMessage) -> list[Any]:
    content = message.content
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _text_of(parts: list[Any]) -> str:
    texts = [
        p if isinstance(p, str) else p.get("text", "") for p in parts if isinstance(p, str) or p.get("type") == "text"
    ]
    return " ".join(t.strip() for t in texts if t.strip())


def intake(state: AgentState, store: ImageStore) -> dict[str, Any]:
    """Normalise the input: store images as refs, fill ``image`` and ``question`` from the last user turn.

    Accepts either ``{"image": ref_or_source, "question": str}`` (the Python API) or a ``messages`` list whose
    last human message holds the question and, optionally, an image (agent-chat-ui, the server). A follow-up
    question without an image keeps talking about the thread's current image.
    """
    update: dict[str, Any] = {}
    image = state.get("image")
    if image and not str(image).startswith("sha256:"):
        image = store.put(load_image(image))
        update["image"] = image
    messages = state.get("messages") or []
    if not messages:
        question = state.get("question", "").strip()
        if not question:
            raise FoveateError("no question: pass `question` or a user message")
        content: list[Any] = ([{"type": "image", "ref": image}] if image else []) + [{"type": "text", "text": question}]
        update["messages"] = [HumanMessage(content=content)]
        update["question"] = question
    else:
        last = messages[-1]
        if last.type != "human":
            raise FoveateError("the last message must be the user's question")
        parts, changed = [], False
        for part in _parts(last):
            if isinstance(part, dict) and is_image_part(part) and "ref" not in part:
                source = image_source(part)
                if isinstance(source, str) and source.startswith(("http://", "https://", "file:")):
                    raise FoveateError("image URLs are not fetched; send the image as a data URL")
                ref = store.put(load_image(source))
                parts.append({"type": "image", "ref": ref})
                image, changed = ref, True
            else:
                parts.append(part)
        if changed:  # same id → add_messages replaces the message instead of appending it
            update["messages"] = [HumanMessage(content=parts, id=last.id)]
            update["image"] = image
        # The new user turn is the question; a checkpointed thread still holds the previous turn's question.
        update["question"] = _text_of(parts) or state.get("question", "")
    if not (update.get("image") or image):
        raise FoveateError("no image: pass `image` or include an image in the user message")
    update.setdefault("image", image)
    return update


def to_policy_messages(messages: list[AnyMessage], store: ImageStore) -> list[dict[str, Any]]:
    """The chat transcript as policy messages: ref parts become PIL images, AI turns become assistant text."""
    converted = []
    for message in messages:
        role = {"human": "user", "ai": "assistant", "system": "system"}.get(message.type)
        if role is None:
            continue
        parts = []
        for part in _parts(message):
            if isinstance(part, str):
                parts.append({"type": "text", "text": part})
            elif part.get("type") == "image" and "ref" in part:
                parts.append({"type": "image", "image": store.get(part["ref"])})
            elif part.get("type") == "text":
                parts.append({"type": "text", "text": part["text"]})
        converted.append({"role": role, "content": parts})
    return converted


def prompt_for_trace(messages: list[dict[str, Any]], refs: list[str]) -> list[dict[str, Any]]:
    """A policy conversation with its images replaced, in order, by their store refs (for trace steps)."""
    pending = iter(refs)
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        parts = [
            {"type": "image", "ref": next(pending, None)} if part.get("type") == "image" else dict(part)
            for part in content
        ]
        out.append({"role": message["role"], "content": parts})
    return out


def image_refs(messages: list[AnyMessage]) -> list[str]:
    """The image refs of a transcript, in order."""
    return [
        part["ref"]
        for message in messages
        for part in _parts(message)
        if isinstance(part, dict) and part.get("type") == "image" and "ref" in part
    ]


def crop_update(node: str, image_ref: str, image: Any, window: Box, store: Any, reason: str) -> dict[str, Any]:
    """The state update of a node that crops ``window`` out of the image: the stored crop's ref, the region
    actually cropped (original pixels) and its trace step."""
    region, used = crop_image(image, window)
    ref = store.put(region)
    box = used.to_list()
    return {"crop": ref, "crop_box": box, "steps": [crop_step(node, image_ref, box, ref, reason=reason)]}


def reshow_last_turn(
    messages: list[dict[str, Any]], refs: list[str], shown: list[str], store: Any
) -> tuple[list[dict[str, Any]], list[str]]:
    """The policy messages with the last user turn's images replaced by ``shown`` (refs, e.g. the original
    then a crop), its text kept after them; and the image refs of the whole prompt in order, for the trace.

    ``messages``/``refs`` are `to_policy_messages` output and `image_refs` of the state's messages.
    """
    last = messages[-1]
    earlier_refs = refs[: len(refs) - sum(1 for part in last["content"] if part["type"] == "image")]
    texts = [part for part in last["content"] if part["type"] == "text"]
    images = [{"type": "image", "image": store.get(ref)} for ref in shown]
    return [*messages[:-1], {"role": last["role"], "content": images + texts}], [*earlier_refs, *shown]


def answer_update(node: str, prompt: list[dict[str, Any]], result: Any, **call_extra: Any) -> dict[str, Any]:
    """The state update every strategy ends with: the stripped answer, its AI message, and the trace of the
    final model call (``call_extra`` goes into that step) followed by the answer step. A leading
    ``<think>…</think>`` (reasoning models, the demo model's look-first answers) stays in the call's trace and
    out of the answer."""
    answer = protocol.strip_thought(result.text)
    return {
        "answer": answer,
        "messages": [AIMessage(content=answer)],
        "steps": [model_call_step(node, prompt, result, **call_extra), answer_step(node, answer)],
    }


def user_turn(*parts: Any) -> list[dict[str, Any]]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p} for p in parts]
    return [{"role": "user", "content": content}]


def last_user_text(messages: list[dict]) -> str:
    parts = messages[-1]["content"]
    return " ".join(p["text"] for p in parts if p.get("type") == "text").strip()


def target_index(refs: list[str], ref: str) -> int:
    """Which image of the conversation the question is about: the last occurrence of ``ref`` (else the last)."""
    if ref in refs:
        return len(refs) - 1 - refs[::-1].index(ref)
    return max(len(refs) - 1, 0)
