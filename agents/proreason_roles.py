"""ProReason's roles: their prompts, their JSON schemas (pydantic) and the parse-validate-retry-once rule.

The wisdom roles (dispatcher, reasoning expert, referee, summarizer) never see the image; they answer in JSON
that is validated against a schema. A reply that does not validate is sent back once with the validation error
("Your reply was not valid: …"); each failed parse is counted (``parse_failures``), apart from the rounds. When
the retry fails too, the role's defined fallback applies (`agents.proreason`). The vision expert is the VLM on the
image, answering in free text, "step by step".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from foveate.policies.base import ChatPolicy, ChatResult, SamplingParams


class Dispatch(BaseModel):
    """The dispatcher's choice: which expert, and the sub-question(s) it gets (vision: independent ones)."""

    expert: Literal["vision", "reasoning"]
    sub_questions: list[str] = Field(min_length=1, max_length=4)

    @field_validator("sub_questions")
    @classmethod
    def _non_empty(cls, questions: list[str]) -> list[str]:
        cleaned = [q.strip() for q in questions]
        if any(not q for q in cleaned):
            raise ValueError("sub-questions must not be empty")
        return cleaned


class Reasoned(BaseModel):
    """The reasoning expert's work; only ``answer`` goes into the memory."""

    reasoning: str = ""
    answer: str = Field(min_length=1)


class Verdict(BaseModel):
    """The referee's judgement of the memory."""

    verdict: Literal["CAN_SOLVE", "UNSOLVABLE"]
    reason: str = ""


class Summary(BaseModel):
    """The summarizer's answer, from the memory alone."""

    answer: str = Field(min_length=1)


DISPATCH_PROMPT = """You lead a team answering a question about an image that you cannot see.
Question: {question}
What the team knows so far:
{memory}
Choose who works next. The vision expert sees the image and describes what is visible. The reasoning expert
cannot see the image; it reasons over what is known. Give the vision expert one or more independent questions
about the image, or the reasoning expert one question.
Reply with only JSON: {{"expert": "vision" or "reasoning", "sub_questions": ["..."]}}"""

REASON_PROMPT = """Question about an image: {question}
What is known about the image:
{memory}
Your task: {sub_question}
Think step by step, then reply with only JSON: {{"reasoning": "...", "answer": "..."}}"""

REFEREE_PROMPT = """Question about an image: {question}
What is known about the image:
{memory}
Is what is known enough to answer the question?
Reply with only JSON: {{"verdict": "CAN_SOLVE" or "UNSOLVABLE", "reason": "..."}}"""

SUMMARY_PROMPT = """Question about an image: {question}
What is known about the image:
{memory}
Answer the question from what is known. Reply with only JSON: {{"answer": "a short answer"}}"""

VISION_SUFFIX = "\nAnswer step by step."
RETRY_PROMPT = "Your reply was not valid: {error}\nReply again with only the JSON object."


def vision_message(image: Any, sub_question: str) -> dict[str, Any]:
    """The vision expert's user turn: the image, then the sub-question asked step by step."""
    return {
        "role": "user",
        "content": [{"type": "image", "image": image}, {"type": "text", "text": sub_question + VISION_SUFFIX}],
    }


def memory_text(memory: Sequence[dict[str, Any]]) -> str:
    """The memory as numbered lines, for the wisdom prompts ("(nothing yet)" when empty)."""
    if not memory:
        return "(nothing yet)"
    return "\n".join(
        f"{i}. {entry['expert']} expert, asked {entry['question']!r}: {entry['answer']}"
        for i, entry in enumerate(memory, 1)
    )


def first_json_object(text: str) -> Any:
    """The first JSON object in ``text`` (fences and prose around it are skipped); ValueError if none."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start >= 0:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    raise ValueError("no JSON object in the reply")


def parse_reply(text: str, schema: type[BaseModel]) -> BaseModel:
    """``text``'s first JSON object validated against ``schema``; ValueError with a one-line reason."""
    from foveate.protocol import strip_thought

    data = first_json_object(strip_thought(text) or text)
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}" for e in error.errors())
        raise ValueError(problems) from None


@dataclass
class RoleTurn:
    """One role's structured turn: the parsed value (None when both tries failed), failures, and the calls."""

    value: BaseModel | None
    failures: int
    calls: list[tuple[list[dict[str, Any]], ChatResult]]
    errors: list[str]


def ask_role(
    policy: ChatPolicy, prompt: str, schema: type[BaseModel], params: SamplingParams, retries: int = 1
) -> RoleTurn:
    """Ask ``policy`` (text only) and validate against ``schema``, retrying ``retries`` times with the error."""
    conversation: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    calls, errors = [], []
    for attempt in range(retries + 1):
        result = policy.chat_one(conversation, params)
        calls.append((list(conversation), result))
        try:
            return RoleTurn(parse_reply(result.text, schema), attempt, calls, errors)
        except ValueError as error:
            errors.append(str(error))
            conversation = [
                *conversation,
                {"role": "assistant", "content": result.text},
                {"role": "user", "content": RETRY_PROMPT.format(error=error)},
            ]
    return RoleTurn(None, retries + 1, calls, errors)
