"""Running a strategy graph step by step, and the OpenAI chat-completion shapes (whole and SSE chunks).

`iter_run` drives a compiled strategy graph with ``stream_mode=["updates", "values"]``: each trace step a node
appends is yielded as soon as that node finishes (a zoom, a tool call, a model call), then the final state. The
server turns that into SSE chunks; ``foveate chat`` prints the same events. Nothing here imports the web stack.

Streaming format (what ``openai`` clients parse; extra fields are ignored by them and kept by pydantic):

    data: {"object": "chat.completion.chunk", "choices": [{"delta": {"role": "assistant", "content": ""}}], …}
    data: {…, "choices": [{"delta": {}, …}], "foveate_step": {"kind": "crop", …}}      one per trace step
    data: {…, "choices": [{"delta": {"content": "The "}}]}                            the answer, word by word
    data: {…, "choices": [{"delta": {}, "finish_reason": "stop"}], "foveate_trace": {…}}
    data: {…, "choices": [], "usage": {…}}                  only with stream_options.include_usage
    data: [DONE]

The answer is not produced token by token: strategies answer after their last model call, so the content
deltas follow the steps. A failure after the stream started is sent as ``data: {"error": {…}}`` (which the
``openai`` client raises as ``APIError``) followed by ``data: [DONE]``.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from foveate.trace import Trace

_PIECES = re.compile(r"\s*\S+\s*|\s+")


def iter_run(
    graph: Any,
    inputs: dict[str, Any],
    *,
    context: Any,
    config: dict[str, Any] | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[tuple[str, Any]]:
    """Yield ``("step", step)`` for every trace step as its node finishes, then ``("final", state)``.

    ``cancel`` is checked between nodes: once set, the run stops after the node in progress (a timed-out
    request does not keep the model busy for the rest of its strategy).
    """
    final: dict[str, Any] = {}
    for mode, chunk in graph.stream(inputs, config=config, context=context, stream_mode=["updates", "values"]):
        if cancel is not None and cancel.is_set():
            return
        if mode == "values":
            final = chunk
            continue
        for update in (chunk or {}).values():
            updates = update if isinstance(update, list) else [update]
            for item in updates:
                if isinstance(item, dict):
                    for step in item.get("steps") or []:
                        yield "step", step
    yield "final", final


def make_trace(strategy: str, state: dict[str, Any], steps: list[dict[str, Any]], model: str) -> Trace:
    """The trace of one run: this run's steps (a thread's earlier turns are not part of this answer)."""
    return Trace(
        strategy=strategy,
        question=state.get("question", ""),
        image=state.get("image"),
        answer=state.get("answer", ""),
        steps=list(steps),
        model=model,
    )


def usage_of(steps: list[dict[str, Any]]) -> dict[str, int]:
    """Token usage summed over every model call of the run (what the request cost the model)."""
    prompt = sum(int(s.get("prompt_tokens", 0)) for s in steps if s.get("kind") == "model_call")
    completion = sum(int(s.get("completion_tokens", 0)) for s in steps if s.get("kind") == "model_call")
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def answer_pieces(text: str) -> list[str]:
    """The answer cut into word-sized content deltas that concatenate back to ``text`` exactly."""
    return _PIECES.findall(text) or ([text] if text else [])


class Completion:
    """Shapes of one chat completion (id and creation time shared by all its chunks)."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": None}

    def whole(self, answer: str, trace: Trace) -> dict[str, Any]:
        """The non-streaming response, with the trace in ``foveate_trace``."""
        return {
            **self._base("chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer, "refusal": None},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": usage_of(trace.steps),
            "foveate_trace": trace.to_dict(),
        }

    def chunk(
        self, delta: dict[str, Any], finish_reason: str | None = None, *, usage: bool = False, **extra: Any
    ) -> dict[str, Any]:
        """One ``chat.completion.chunk``; ``usage`` adds ``"usage": null`` (as OpenAI does with include_usage)."""
        data = {
            **self._base("chat.completion.chunk"),
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            **extra,
        }
        if usage:
            data["usage"] = None
        return data

    def usage_chunk(self, steps: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": usage_of(steps)}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event line pair."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
