"""Test doubles for the box-convention and control-flow tests of the zoom strategies (DeepEyes, VisRL).

They stand in for a model only where a test needs exact replies (a malformed tool call, a box at the image
edge); the real tiny model runs everywhere else.
"""

from __future__ import annotations

from foveate.policies.base import ChatPolicy, ChatResult, Completion


class Convention(ChatPolicy):
    """A policy that only declares a box convention (for the pure conversion and tool tests)."""

    def __init__(self, convention: str = "thousand", resized: tuple[float, float] | None = None) -> None:
        self.box_convention = convention
        if resized is not None:
            self.resized_size = lambda size: resized


class Scripted(ChatPolicy):
    """Replays ``replies`` in order (control-flow tests ONLY) and records every conversation it is sent."""

    name = "scripted"
    input_side = 224  # what model_input_side reads (the demo model's)
    exhausted_reply: str | None = None  # the reply once the script is used up; None: the test fails (IndexError)

    def __init__(self, replies: list[str], convention: str = "thousand") -> None:
        self.replies = list(replies)
        self.box_convention = convention
        self.seen: list[list[dict]] = []

    def chat(self, conversations, params=None):
        results = []
        for conversation in conversations:
            self.seen.append(list(conversation))
            exhausted = not self.replies and self.exhausted_reply is not None
            text = self.exhausted_reply if exhausted else self.replies.pop(0)
            results.append(ChatResult([Completion(text, len(text.split()))], prompt_tokens=0, latency_s=0.0))
        return results


def twin(cls: type, policy: ChatPolicy):
    """An instance of ``cls`` (a subclass of ``policy``'s class overriding a method or two) sharing ``policy``'s
    model, processor and kept sessions: a test double that is still the declared backend type (a `WhiteBoxPolicy`
    for the transformers backend), with everything it does not override done by the real code."""
    policy.release_sessions([])  # creates the real policy's session store, so the twin shares it
    double = object.__new__(cls)
    double.__dict__.update(policy.__dict__)
    return double
