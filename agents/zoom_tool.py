"""Boxes at the policy edge, and DeepEyes' ``image_zoom_in_tool``: parsing a model's reply and running the tool.

Shared by the strategies whose model *writes* boxes (deepeyes, visrl). Three pieces:

**Conversion** (`model_box_to_pixels`, `pixels_to_model_box`, defined at the policy edge in `policies.box_edge`
and importable from here): a box in the policy's own convention (``policy.box_convention``) to and from a `Box`
in original-image pixels.

**Reply parsing** (`parse_reply`), what a DeepEyes-format reply may be and how each case is read:

- ``<answer>…</answer>`` → an answer (stripped). A missing ``</answer>`` (generation cut by the token cap or a
  stop string) takes the rest of the reply. An empty answer is malformed.
- ``<tool_call>{json}</tool_call>`` → a tool call. The body is read as the first JSON object in it (so trailing
  text inside the tags is ignored); failing that, as a Python literal (a model writing single quotes,
  ``True``/``None``); a missing ``</tool_call>`` is accepted if the rest parses. The object must have a string
  ``name`` and ``arguments``, an object (or a string holding a JSON object, the OpenAI wire form).
- Both tags: whichever comes first wins (a tool call followed by a guessed answer is a tool call; its guess
  is dropped). Several tool calls: the first is executed; the rest of the reply after it is dropped (DeepEyes
  trains one call per turn), and the assistant turn passed back holds only that call.
- Vision placeholder tokens a model may emit (``<|image_pad|>``, ``<|vision_start|>`` …) are removed first
  (`without_vision_tokens`): passed back in the assistant turn they would claim images that are not there, and
  the processor would refuse the conversation.
- Anything else (no tags, a tag with unparseable JSON, JSON without ``name``/``arguments``) is malformed. Plain
  text without tags is never taken as an answer: the demo model and DeepEyes are trained to tag answers, and
  DeepEyes' format reward counts an untagged reply as a format error.

**The tool** (`run_zoom`), DeepEyes' validity rules (RESEARCH.md §2): ``bbox_2d`` (4 numbers or numeric
strings, in the policy's convention) is converted to original pixels and clipped to the image; a box entirely
outside, inverted or empty, with a short side ≤ `MIN_ZOOM_SIDE` (30) pixels or an aspect ratio above
`MAX_ZOOM_ASPECT` (100) is refused with a `ToolError` whose message names the problem; ``label`` (optional) is
kept as text; unknown extra arguments are ignored. The crop is always of the ORIGINAL image, snapped outward to
whole pixels (``tools.crop.crop``), so it never reaches outside the image.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from foveate.errors import BoxError, FoveateError
from foveate.policies.base import ChatPolicy
from foveate.policies.box_edge import model_box_to_pixels, pixels_to_model_box  # noqa: F401 (re-exported)
from foveate.protocol import ZOOM_TOOL_NAME
from foveate.tools.boxes import Box
from foveate.tools.crop import crop

MIN_ZOOM_SIDE = 30  # pixels of the original image; DeepEyes refuses boxes whose short side is <= this
MAX_ZOOM_ASPECT = 100  # long side / short side; DeepEyes refuses thinner boxes

_TOOL_OPEN, _TOOL_CLOSE = "<tool_call>", "</tool_call>"
_VISION_TOKENS = re.compile(r"<\|(?:image_pad|video_pad|vision_start|vision_end|vision_pad)\|>")
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"


class ToolError(FoveateError):
    """A tool call the tool refuses; the message is what the model is shown after ``Error: ``."""


# ---- reply parsing ------------------------------------------------------------------------------------------
@dataclass
class ToolCall:
    """A structurally valid tool call: a name and an arguments object (not yet checked by the tool)."""

    name: str
    arguments: dict[str, Any]

    def arguments_json(self) -> str:
        """The arguments as the chat template's ``tojson`` writes them (so a re-rendered call reads the same)."""
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass
class Reply:
    """One parsed model reply. ``kind`` is ``"answer"``, ``"tool_call"`` or ``"malformed"``.

    ``content`` is the text before the tool call (the assistant message's content when the call is passed
    back as ``tool_calls``); ``error`` says what is wrong with a malformed reply.
    """

    kind: Literal["answer", "tool_call", "malformed"]
    text: str
    content: str = ""
    answer: str | None = None
    call: ToolCall | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def _load_object(body: str) -> Any:
    """The first JSON object in ``body``; else ``body`` from its first ``{`` to its last ``}`` as a Python literal."""
    start = body.find("{")
    if start < 0:
        raise ValueError("no JSON object")
    try:
        value, _ = json.JSONDecoder().raw_decode(body, start)
        return value
    except json.JSONDecodeError as error:
        end = body.rfind("}")
        if end > start:
            try:
                return ast.literal_eval(body[start : end + 1])
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                pass
        raise ValueError(error.msg) from None


def parse_tool_call(body: str) -> ToolCall:
    """The tool call inside ``<tool_call>…</tool_call>`` (``body`` is what lies between); `ValueError` if malformed."""
    try:
        value = _load_object(body)
    except ValueError as error:
        raise ValueError(f"the tool call is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError("the tool call must be a JSON object")
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError('the tool call has no "name"')
    arguments = value.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise ValueError('the tool call\'s "arguments" string is not valid JSON') from None
    if not isinstance(arguments, dict):
        raise ValueError('the tool call needs "arguments", a JSON object')
    return ToolCall(name=name.strip(), arguments=arguments)


def without_vision_tokens(text: str) -> str:
    """``text`` without vision placeholder tokens (Qwen2-VL's ``<|image_pad|>``, ``<|vision_start|>`` …).

    >>> without_vision_tokens("a<|image_pad|>b<|vision_end|>")
    'ab'
    """
    return _VISION_TOKENS.sub("", text or "")


def parse_reply(text: str) -> Reply:
    """Read one DeepEyes-format reply (rules in the module docstring); ``Reply.text`` is the cleaned reply."""
    text = without_vision_tokens(text)
    tool_at, answer_at = text.find(_TOOL_OPEN), text.find(_ANSWER_OPEN)
    if answer_at >= 0 and (tool_at < 0 or answer_at < tool_at):
        start = answer_at + len(_ANSWER_OPEN)
        end = text.find(_ANSWER_CLOSE, start)
        notes = [] if end >= 0 else ["no </answer>: took the rest of the reply"]
        answer = (text[start:end] if end >= 0 else text[start:]).strip()
        if not answer:
            return Reply("malformed", text, error="the <answer> is empty")
        return Reply("answer", text, content=text, answer=answer, notes=notes)
    if tool_at >= 0:
        start = tool_at + len(_TOOL_OPEN)
        end = text.find(_TOOL_CLOSE, start)
        notes = [] if end >= 0 else ["no </tool_call>: parsed the rest of the reply"]
        try:
            call = parse_tool_call(text[start:end] if end >= 0 else text[start:])
        except ValueError as error:
            return Reply("malformed", text, error=str(error))
        if end >= 0 and text.find(_TOOL_OPEN, end) >= 0:
            notes.append("several tool calls: only the first was run")
        return Reply("tool_call", text, content=text[:tool_at], call=call, notes=notes)
    return Reply(
        "malformed",
        text,
        error="the reply has neither a <tool_call> nor an <answer>; "
        "call image_zoom_in_tool or answer with <answer>...</answer>",
    )


# ---- the tool -----------------------------------------------------------------------------------------------
@dataclass
class Zoom:
    """What one zoom produced: the crop, the region actually cropped (original pixels) and the call's label."""

    image: Image.Image
    box: Box
    label: str = ""


def run_zoom(call: ToolCall, image: Image.Image, policy: ChatPolicy) -> Zoom:
    """Execute ``image_zoom_in_tool`` on the ORIGINAL ``image``; `ToolError` with the reason if refused."""
    if call.name != ZOOM_TOOL_NAME:
        raise ToolError(f"unknown tool {call.name!r}; the only tool is {ZOOM_TOOL_NAME}")
    if "bbox_2d" not in call.arguments:
        raise ToolError(f"{ZOOM_TOOL_NAME} needs bbox_2d: [x1, y1, x2, y2]")
    try:
        box = model_box_to_pixels(call.arguments["bbox_2d"], image.size, policy, min_side=0)
    except BoxError as error:
        raise ToolError(f"bad bbox_2d: {error}") from None
    short, long = sorted((box.width, box.height))
    if short <= MIN_ZOOM_SIDE:
        raise ToolError(
            f"bbox_2d is too small: {box.width:.0f}x{box.height:.0f} pixels of the original image "
            f"after clipping; each side must be more than {MIN_ZOOM_SIDE} pixels"
        )
    if long / short > MAX_ZOOM_ASPECT:
        raise ToolError(f"bbox_2d is too thin: aspect ratio {long / short:.0f} exceeds {MAX_ZOOM_ASPECT}")
    region, used = crop(image, box)
    label = call.arguments.get("label")
    return Zoom(image=region, box=used, label="" if label is None else str(label))


def tool_call_message(call: ToolCall, call_id: str) -> dict[str, Any]:
    """The OpenAI-style ``tool_calls`` entry for ``call`` (arguments as a JSON string, as on the wire)."""
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json()}}
