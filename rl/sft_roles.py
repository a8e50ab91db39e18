"""Supervised examples of the agents' role formats, derived from the world's question structure (issue 35 part 5).

The demo VLM serves as eyesight, wisdom and programmer for ``proreason`` and ``vpd``; these builders (registered
in `rl.sft_data.BUILDERS`) teach it the exact prompts those agents send and the ideal replies, built from a world
question row and its scene without any model. Prompts come from the agents themselves
(`agents.proreason_roles`, `agents.vpd.program_messages`), so a changed prompt changes the training data too.

- ``proreason``: one role turn sampled uniformly from the world-derived trace of the row's question:

  one-step families (attribute, existence, counting, text):
      dispatch → vision (the question itself) → referee CAN_SOLVE → summarize
  two-step families (relation, comparison):
      dispatch → vision × 2 (one sub-question per referent: "Where is the red star?", "What color is the
      square?", "What size and shape is the star?") → referee UNSOLVABLE (the facts are known but not compared)
      → dispatch → reasoning (the question, over the two facts) → referee CAN_SOLVE → summarize

  The referee's rule is "CAN_SOLVE once some expert's answer answers the question", so the summarizer only copies
  it. Which rows each role sees: the dispatcher, referee and summarizer every family above (grounding and
  caption rows have no trace: None); the reasoning expert and the UNSOLVABLE referee only relation and
  comparison. Only the vision expert's turn has the image (the eyesight); the wisdom turns are text only, and
  carry ``scene: None`` and no evidence so the collator's vision losses skip them. A vision turn's evidence is
  the row's boxes, or on a two-step question the box of the one object its sub-question asks about.
- ``program``: `agents.vpd`'s programmer prompt without the API reference (``vpd`` with ``api_doc: false``; text
  only) → the program `rl.vpd_world.world_program` writes from the question's template, bare (``extract_program``
  keeps it whole). Every world family but grounding and caption. Why no API reference: under the demo tokenizer
  (1861 tokens, code is nearly character-level) `tools.program_api.API_DOC` alone is 1326 tokens, over the SFT
  collator's ``max_length`` of 512, which would cut every target away; the trained programmer knows the API.

Token lengths (`python bench/role_lengths.py`: every turn of 2000 rows of the default mix's presets, seed 1, the
demo model's processor, images included; about 2.5 minutes):

    role       examples  median  p99  max   (vision: the image's tokens included; the others are text only)
    dispatch       2418     315  423  478
    vision         2418     117  130  137
    referee        2418     211  319  368
    reasoning       418     269  307  360
    summarize      2000     143  251  300
    program        2000     183  383  415

Every example stays under the collator's ``max_length`` of 512 (`rl.sft.TrainConfig`); the longest are
second-round dispatches (the question, two sub-questions and their answers in the memory). The vision answers do
not restate their object (the memory line names it through the sub-question), which keeps those under 512.

Deviations from ProReason: the memory's vision facts are short sentences the world states exactly (positions as
centres in 0-1000 of the image), not free descriptions; the reasoning expert is used only for comparisons.
"""

from __future__ import annotations

import json
import random
from typing import Any

from PIL import Image

from foveate.agents.proreason_roles import (
    DISPATCH_PROMPT,
    REASON_PROMPT,
    REFEREE_PROMPT,
    SUMMARY_PROMPT,
    memory_text,
    vision_message,
)
from foveate.agents.vpd import program_messages
from foveate.rl.vpd_world import world_program
from foveate.tools.boxes import Box, to_thousand
from foveate.world.describe import SIZE_WORDS
from foveate.world.questions import referents
from foveate.world.scenes import SIZE_CLASSES, Scene, WorldObject

Example = dict[str, Any]
ONE_STEP = ("attribute", "existence", "counting", "text")
TWO_STEP = ("relation", "comparison")


def _cap(phrase: str) -> str:
    return phrase[:1].upper() + phrase[1:]


def _centre(obj: WorldObject, scene: Scene) -> tuple[int, int]:
    x1, y1, x2, y2 = to_thousand(Box(*obj.box), (scene.width, scene.height))
    return round((x1 + x2) / 2), round((y1 + y2) / 2)


def _fact(kind: str, obj: WorldObject, scene: Scene) -> str:
    """The vision expert's answer about one referent: its colour, shape, size and shape, or centre. The memory line
    already names the object (its sub-question), so the answer does not repeat it: shorter wisdom prompts."""
    if kind == "where":
        x, y = _centre(obj, scene)
        return f"Its centre is at x {x}, y {y} (of 1000, y down)."
    if kind == "color":
        return f"It is {obj.color}."
    if kind == "shape":
        return f"It is a {obj.shape}."
    return f"It is a {SIZE_WORDS[obj.size_class]} {obj.shape}."


_SUB_QUESTION = {
    "where": "Where is {}?",
    "color": "What color is {}?",
    "shape": "What shape is {}?",
    "size": "What size and shape is {}?",
}


def _one_step_fact(row: dict[str, Any], scene: Scene) -> str:
    """The vision expert's answer to a one-step question, stated as a sentence of the world's truth."""
    found, answer = referents(row["question"]), row["answers"][0]
    phrase = found[0]
    if row["family"] == "attribute":
        return _fact(row["subtype"], scene.object(row["object_ids"][0]), scene)
    if row["family"] == "existence":
        return f"Yes, I see {phrase}." if answer == "yes" else f"No, I see no {phrase.split(' ', 1)[1]}."
    if row["family"] == "counting":
        return f"I count {phrase}: {answer}."
    label = scene.object(row["object_ids"][0]).label or answer
    return f'It says "{label}".'


def _compare(row: dict[str, Any], phrases: list[str], objs: list[WorldObject], scene: Scene) -> str:
    """The reasoning expert's comparison of the two referents (its ``reasoning``)."""
    (pa, pb), (a, b), answer = phrases, objs, row["answers"][0]
    if row["family"] == "relation":
        axis = "x" if row["subtype"] in ("left of", "right of") else "y"
        va, vb = (_centre(obj, scene)[0 if axis == "x" else 1] for obj in (a, b))
        relation = {"left of": "to the left of", "right of": "to the right of"}.get(row["subtype"], row["subtype"])
        sign = "<" if va < vb else ">" if va > vb else "="
        return f"{_cap(pa)} has {axis} {va}, {pb} has {axis} {vb}; {va} {sign} {vb}, so {relation}: {answer}."
    if row["subtype"] == "larger":
        sa, sb = (SIZE_WORDS[obj.size_class] for obj in (a, b))
        big = pa if SIZE_CLASSES.index(a.size_class) > SIZE_CLASSES.index(b.size_class) else pb
        return f"{_cap(pa)} is {sa}, {pb} is {sb}; {big} is larger, a {answer}."
    attr = "color" if row["subtype"] == "same-color" else "shape"
    va, vb = getattr(a, attr), getattr(b, attr)
    return f"{_cap(pa)} is {va}, {pb} is {vb}: {'the same' if va == vb else 'different'} {attr}s, so {answer}."


def _two_step_kind(row: dict[str, Any]) -> str:
    if row["family"] == "relation":
        return "where"
    return {"same-color": "color", "same-shape": "shape", "larger": "size"}[row["subtype"]]


def _wisdom(prompt: str, reply: dict[str, Any]) -> Example:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": json.dumps(reply)}]}


def _vision(image: Image.Image, sub_question: str, fact: str, boxes: list[list[float]]) -> Example:
    messages = [vision_message(image, sub_question), {"role": "assistant", "content": fact}]
    return {"messages": messages, "evidence": [list(box) for box in boxes]}


def role_trace(image: Image.Image, row: dict[str, Any], scene: Scene) -> list[Example] | None:
    """Every role turn of the world-derived ProReason trace of ``row``, in order (None: no trace for its family).

    Each turn names its ``role`` (dispatch, vision, referee, reasoning, summarize); wisdom turns carry ``scene:
    None`` (no image), vision turns the scene and the evidence boxes of what they ask (the row's, or on a two-step
    question the one object's)."""
    question, answer, phrases = row["question"], row["answers"][0], referents(row["question"])
    if row["family"] not in ONE_STEP + TWO_STEP or not phrases:
        return None
    turns: list[Example] = []
    memory: list[dict[str, Any]] = []

    def wisdom(role: str, template: str, reply: dict[str, Any], **fields: str) -> None:
        prompt = template.format(question=question, memory=memory_text(memory), **fields)
        turns.append({**_wisdom(prompt, reply), "role": role, "scene": None, "evidence": []})

    def look(sub_question: str, fact: str, boxes: list[list[float]], round_: int) -> None:
        turns.append({**_vision(image, sub_question, fact, boxes), "role": "vision", "scene": scene})
        memory.append({"round": round_, "expert": "vision", "question": sub_question, "answer": fact})

    solved = {"verdict": "CAN_SOLVE", "reason": "An expert's answer answers the question."}
    if row["family"] in ONE_STEP:
        wisdom("dispatch", DISPATCH_PROMPT, {"expert": "vision", "sub_questions": [question]})
        look(question, _one_step_fact(row, scene), row["boxes"], 1)
    else:
        if len(phrases) != 2 or len(row["object_ids"]) != 2:
            return None
        objs = [scene.object(i) for i in row["object_ids"]]
        kind = _two_step_kind(row)
        sub_questions = [_SUB_QUESTION[kind].format(phrase) for phrase in phrases]
        wisdom("dispatch", DISPATCH_PROMPT, {"expert": "vision", "sub_questions": sub_questions})
        for sub_question, obj in zip(sub_questions, objs, strict=True):
            look(sub_question, _fact(kind, obj, scene), [obj.box], 1)
        reason = "Both objects are described, but not yet compared."
        wisdom("referee", REFEREE_PROMPT, {"verdict": "UNSOLVABLE", "reason": reason})
        wisdom("dispatch", DISPATCH_PROMPT, {"expert": "reasoning", "sub_questions": [question]})
        wisdom(
            "reasoning",
            REASON_PROMPT,
            {"reasoning": _compare(row, phrases, objs, scene), "answer": answer},
            sub_question=question,
        )
        memory.append({"round": 2, "expert": "reasoning", "question": question, "answer": answer})
    wisdom("referee", REFEREE_PROMPT, solved)
    wisdom("summarize", SUMMARY_PROMPT, {"answer": answer})
    return turns


def proreason(image: Image.Image, row: dict[str, Any], scene: Scene, rng: random.Random, **_: Any) -> Example | None:
    """One role turn, drawn uniformly from the row's world-derived ProReason trace."""
    trace = role_trace(image, row, scene)
    return rng.choice(trace) if trace else None


def program(row: dict[str, Any], **_: Any) -> Example | None:
    """The programmer's prompt → the world-derived program for the row's question (text only)."""
    source = world_program(row["question"])
    if source is None:
        return None
    messages = [*program_messages(row["question"], api_doc=False), {"role": "assistant", "content": source}]
    return {"messages": messages, "scene": None, "evidence": []}


def token_count(processor: Any, example: Example) -> int:
    """The example's length in tokens as the SFT collator renders it (chat template, image tokens expanded)."""
    text = processor.apply_chat_template(example["messages"], tokenize=False)
    images = [
        part["image"]
        for message in example["messages"]
        if not isinstance(message["content"], str)
        for part in message["content"]
        if part["type"] == "image"
    ]
    return int(processor(text=[text], images=images or None, return_tensors="pt")["input_ids"].shape[1])
