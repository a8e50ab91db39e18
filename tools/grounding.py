"""Grounding: a phrase → boxes in original-image pixels.

One protocol (`Grounder.ground`), three backends, each batched over phrases:

- `VLMGrounder`: the VLM writes Qwen2.5-VL grounding JSON (``[{"bbox_2d": [x1, y1, x2, y2], "label": …}]``, or the
  demo model's single ``{"bbox_2d": […]}``), one ``policy.chat`` call for all phrases, greedy. Boxes are in the
  policy's ``box_convention`` and converted here, at the policy edge (`model_values_to_box`). A reply that is not
  such JSON, or whose boxes are all out of the image / inverted, gives no region and a reason (`GroundingResult`),
  never an exception.
- `DetectorGrounder`: a transformers zero-shot detector (OWLv2, OWL-ViT or Grounding DINO) through
  ``AutoModelForZeroShotObjectDetection`` / ``AutoProcessor`` and the processor's own
  ``post_process_grounded_object_detection``. OWL models pad the image to a square (bottom/right) before
  resizing, so their boxes are scaled with the padded square as the target size and then clipped to the image.
- `AttentionGrounder`: ViCrop's rel-att map ("MLLMs Know Where to Look", ICLR 2025; RESEARCH.md §1) for the
  question "Where is the {phrase}?" divided by the generic prompt's map, from the declared
  ``policy.image_attention`` (all phrases and the generic prompt in one batched call); the box is either the
  tight box of the thresholded map around its peak (default) or ViCrop's square window
  (`foveate.tools.saliency.select_box`). Training-free, offline: the default for white-box VLMs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from foveate import protocol
from foveate.errors import BoxError, FoveateError, PolicyError, WhiteBoxUnsupported
from foveate.policies.base import WhiteBoxPolicy
from foveate.tools.boxes import Box, from_resized, parse_box
from foveate.tools.saliency import select_box


@dataclass(frozen=True)
class Grounding:
    """One grounded region: ``box`` in original-image pixels, ``score`` in [0, 1], the ``phrase`` it answers."""

    box: Box
    score: float
    phrase: str


@runtime_checkable
class Grounder(Protocol):
    def ground(self, image: Image.Image, phrases: Sequence[str]) -> list[list[Grounding]]:
        """For each phrase, the regions it names (best first; empty when none)."""
        ...


__all__ = [
    "AttentionGrounder",
    "DetectorGrounder",
    "Grounder",
    "Grounding",
    "GroundingResult",
    "VLMGrounder",
    "model_values_to_box",
    "parse_grounding_reply",
    "thresholded_box",
]

WHERE_PROMPT = "Where is the {phrase}?"  # ViCrop's question form for attention grounding
EXISTS_PROMPT = "Is there a {phrase} in the image? Answer yes or no."  # the optional check before mapping


@dataclass(frozen=True)
class GroundingResult:
    """A phrase's regions with why there are none (or what was dropped): ``reason`` is "" when all went well."""

    phrase: str
    groundings: list[Grounding]
    reason: str = ""
    raw: str = ""  # the model's reply (VLM backend), for traces


def _user(image: Image.Image, text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


# ---- the VLM's own boxes ------------------------------------------------------------------------------------
def model_values_to_box(values: Any, image_size: tuple[int, int], convention: str, resized_size: Any = None) -> Box:
    """Untrusted box ``values`` in a model ``convention`` ("thousand", "normalized", "pixels", "resized") → a `Box`
    in original pixels, clipped to the image; raises `BoxError` naming the problem. ``resized`` needs the model's
    ``resized_size`` (its input's extent, ``policy.resized_size(image_size)``)."""
    if convention != "resized":
        return parse_box(values, image_size, convention=convention, min_side=0.0)
    if resized_size is None:
        raise BoxError("box convention 'resized' needs the model's resized input size")
    in_resized = parse_box(values, resized_size, convention="pixels", min_side=0.0, clamp=False)
    original = from_resized(in_resized.to_list(), image_size, resized_size)
    return parse_box(original.to_list(), image_size, min_side=0.0)


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_THOUGHT = re.compile(r"<think>.*?</think>", re.DOTALL)


def _json_values(text: str) -> list[Any]:
    """Every JSON value that starts at a ``[`` or ``{`` in ``text``, outermost first (fenced blocks preferred)."""
    fenced = _FENCE.findall(text)
    sources = fenced + [text] if fenced else [text]
    decoder, found = json.JSONDecoder(), []
    for source in sources:
        index = 0
        while index < len(source):
            starts = [i for i in (source.find("[", index), source.find("{", index)) if i >= 0]
            if not starts:
                break
            start = min(starts)
            try:
                value, end = decoder.raw_decode(source, start)
            except json.JSONDecodeError:
                index = start + 1
                continue
            found.append(value)
            index = end
    return found


def parse_grounding_reply(
    text: str, phrase: str, image_size: tuple[int, int], convention: str = "thousand", resized_size: Any = None
) -> GroundingResult:
    """Read a grounding reply: a JSON list of ``{"bbox_2d": [...], "label": ...}`` objects, or one such object,
    optionally in a ```json fence and after a ``<think>`` block. Bad entries are skipped (the reason says which);
    a reply with no usable box gives an empty result and a reason. Never raises. Scores are 1.0 (the model
    states boxes without a confidence); order is the model's.

    >>> r = parse_grounding_reply('[{"bbox_2d": [0, 0, 500, 500], "label": "star"}]', "star", (200, 100))
    >>> r.groundings[0].box.to_list(), r.reason
    ([0.0, 0.0, 100.0, 50.0], '')
    >>> parse_grounding_reply("a star at the top", "star", (200, 100)).reason
    'no JSON in the reply'
    """
    body = _THOUGHT.sub("", str(text))
    entries: list[Any] = []
    for value in _json_values(body):
        items = value if isinstance(value, list) else [value]
        entries += [item for item in items if isinstance(item, dict) and ("bbox_2d" in item or "bbox" in item)]
        if entries:
            break
    if not entries:
        reason = "no JSON in the reply" if not _json_values(body) else "JSON without a bbox_2d"
        return GroundingResult(phrase, [], reason, raw=str(text))
    groundings, problems = [], []
    for number, entry in enumerate(entries, 1):
        try:
            box = model_values_to_box(entry.get("bbox_2d", entry.get("bbox")), image_size, convention, resized_size)
        except (BoxError, ValueError, TypeError) as error:
            problems.append(f"box {number}: {error}")
            continue
        groundings.append(Grounding(box, 1.0, phrase))
    return GroundingResult(phrase, groundings, "; ".join(problems), raw=str(text))


class VLMGrounder:
    """Phrases grounded by the VLM's own box output (one batched greedy ``policy.chat`` for all phrases).

    ``prompt`` has a ``{phrase}`` slot; the default is the project's grounding prompt (what the demo model was
    trained on); for stock Qwen2.5-VL pass e.g. ``"Locate every {phrase} in the image and output the bbox
    coordinates in JSON format."``.
    """

    def __init__(self, policy: Any, prompt: str | None = None, max_new_tokens: int = 96) -> None:
        self.policy = policy
        self.prompt = prompt or protocol.GROUNDING_PROMPT.replace("{reference}", "{phrase}")
        self.max_new_tokens = max_new_tokens

    def ground_with_reasons(self, image: Image.Image, phrases: Sequence[str]) -> list[GroundingResult]:
        from foveate.policies.base import SamplingParams

        if not phrases:
            return []
        conversations = [_user(image, self.prompt.format(phrase=phrase)) for phrase in phrases]
        replies = self.policy.chat(conversations, SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0))
        convention = str(self.policy.box_convention)
        resized = None
        if convention == "resized":
            try:
                resized = self.policy.resized_size(image.size)
            except (AttributeError, PolicyError) as error:
                reason = f"box convention 'resized' but the backend gives no resized size ({error})"
                return [GroundingResult(p, [], reason, raw=r.text) for p, r in zip(phrases, replies, strict=True)]
        return [
            parse_grounding_reply(reply.text, phrase, image.size, convention, resized)
            for phrase, reply in zip(phrases, replies, strict=True)
        ]

    def ground(self, image: Image.Image, phrases: Sequence[str]) -> list[list[Grounding]]:
        return [result.groundings for result in self.ground_with_reasons(image, phrases)]


# ---- a zero-shot detector -----------------------------------------------------------------------------------
_SQUARE_PADDED = ("owlv2", "owlvit")  # processors that pad to a square before resizing (boxes are relative to it)


class DetectorGrounder:
    """Phrases grounded by a transformers zero-shot detector (OWLv2 / OWL-ViT / Grounding DINO) from a local
    directory or cached Hub id. Boxes with a score below ``threshold`` are dropped; the rest are returned per
    phrase, best first, clipped to the image."""

    def __init__(self, model: str | Path, threshold: float = 0.1, text_threshold: float = 0.25) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(model).eval()
        except (OSError, ValueError) as error:
            raise FoveateError(f"cannot load a zero-shot detector from {model}: {error}") from error
        self.model_type = str(getattr(self.model.config, "model_type", ""))
        self.threshold = threshold
        self.text_threshold = text_threshold

    def _post_process(self, outputs: Any, inputs: Any, size: tuple[int, int], phrases: list[str]) -> dict[str, Any]:
        width, height = size
        if self.model_type in _SQUARE_PADDED:
            side = max(width, height)
            return self.processor.post_process_grounded_object_detection(
                outputs, threshold=self.threshold, target_sizes=[(side, side)], text_labels=[phrases]
            )[0]
        return self.processor.post_process_grounded_object_detection(  # Grounding DINO: labels come from the text
            outputs,
            inputs["input_ids"],
            threshold=self.threshold,
            text_threshold=self.text_threshold,
            target_sizes=[(height, width)],
            text_labels=[phrases],
        )[0]

    def ground(self, image: Image.Image, phrases: Sequence[str]) -> list[list[Grounding]]:
        import torch

        phrases = [str(p) for p in phrases]
        if not phrases:
            return []
        rgb = image.convert("RGB")
        inputs = self.processor(text=[phrases], images=rgb, return_tensors="pt", padding="max_length", truncation=True)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        result = self._post_process(outputs, inputs, rgb.size, phrases)
        found: list[list[Grounding]] = [[] for _ in phrases]
        labels = result.get("text_labels") or result.get("labels")
        for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(), labels, strict=True):
            index = phrases.index(label) if isinstance(label, str) and label in phrases else None
            if index is None and not isinstance(label, str):
                index = int(label)
            if index is None or not 0 <= index < len(phrases):
                continue  # a Grounding DINO label that is not one of the phrases (a merged span)
            try:
                clipped = parse_box(box, rgb.size, min_side=0.0)
            except BoxError:
                continue  # a degenerate or out-of-image box from the detector
            found[index].append(Grounding(clipped, float(min(max(score, 0.0), 1.0)), phrases[index]))
        return [sorted(regions, key=lambda g: -g.score) for regions in found]


# ---- attention (white-box VLMs) -----------------------------------------------------------------------------
def thresholded_box(values: np.ndarray, image_size: tuple[int, int], fraction: float = 0.5) -> tuple[Box, float]:
    """The box (original pixels) of the 4-connected region of cells ≥ ``fraction`` × max around the map's peak,
    and the share of the map's (non-negative) mass inside that box.

    >>> grid = np.zeros((4, 4)); grid[1, 2] = 1.0; grid[2, 2] = 0.6; grid[3, 0] = 0.9
    >>> box, mass = thresholded_box(grid, (400, 400)); box.to_list(), round(mass, 3)
    ([200.0, 100.0, 300.0, 300.0], 0.64)
    """
    grid = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    grid = np.clip(grid - min(0.0, float(grid.min())), 0.0, None)
    rows, cols = grid.shape
    peak = np.unravel_index(int(np.argmax(grid)), grid.shape)
    keep = grid >= fraction * grid[peak] if grid[peak] > 0 else np.ones_like(grid, dtype=bool)
    seen = np.zeros_like(keep)
    stack, members = [peak], []
    seen[peak] = True
    while stack:
        r, c = stack.pop()
        members.append((r, c))
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < rows and 0 <= nc < cols and keep[nr, nc] and not seen[nr, nc]:
                seen[nr, nc] = True
                stack.append((nr, nc))
    r1, r2 = min(m[0] for m in members), max(m[0] for m in members) + 1
    c1, c2 = min(m[1] for m in members), max(m[1] for m in members) + 1
    width, height = image_size
    box = Box(c1 * width / cols, r1 * height / rows, c2 * width / cols, r2 * height / rows)
    total = float(grid.sum())
    return box, (float(grid[r1:r2, c1:c2].sum()) / total if total > 0 else 0.0)


class AttentionGrounder:
    """Phrases grounded by a white-box VLM's rel-att map for "Where is the {phrase}?" (see the module notes).

    ``box="tight"`` returns `thresholded_box` of the map (cells ≥ ``fraction`` × peak around the peak; score = the
    map mass inside it); ``box="window"`` returns ViCrop's sharpest square window of side ``input_side · r``
    (`select_box`; score = the mass inside it), falling back to the tight box when the whole image fits the
    model's input. ``layer`` is the decoder layer read (the project's ViCrop default is 0 for the demo model).
    With ``verify=True`` the VLM is first asked "Is there a {phrase} in the image?" (one batched greedy call) and a
    phrase it answers "no" to grounds nothing: a map always has a peak, so without the check every phrase — even
    one naming nothing in the image — gets a region (what `find` / `exists` in visual programs must not do).
    """

    def __init__(
        self,
        policy: Any,
        layer: int | list[int] = 0,
        *,
        box: str = "tight",
        fraction: float = 0.5,
        input_side: int | None = None,
        question: str = WHERE_PROMPT,
        generic_prompt: str = protocol.GENERIC_PROMPT,
        rel_eps: float = 0.05,
        verify: bool = False,
    ) -> None:
        if box not in ("tight", "window"):
            raise FoveateError(f"attention grounding box must be 'tight' or 'window', got {box!r}")
        if box == "window" and not input_side:
            raise FoveateError("attention grounding with box='window' needs the model's input side (input_side)")
        self.policy, self.layer, self.box, self.fraction = policy, layer, box, fraction
        self.input_side, self.question = input_side, question
        self.generic_prompt, self.rel_eps, self.verify = generic_prompt, rel_eps, verify

    def maps(self, image: Image.Image, phrases: Sequence[str]) -> list[np.ndarray]:
        """The rel-att map of each phrase (one batched ``image_attention`` call with the generic row)."""
        if not isinstance(self.policy, WhiteBoxPolicy):
            raise WhiteBoxUnsupported(
                f"{self.policy.name}: attention grounding needs a white-box backend "
                "(--model DIR); use the VLM or detector grounder instead"
            )
        rows = [_user(image, self.question.format(phrase=p)) for p in phrases] + [_user(image, self.generic_prompt)]
        found = self.policy.image_attention(rows, self.layer)
        generic = np.asarray(found[-1][0].values, dtype=np.float64)
        scale = float(generic.mean()) if generic.mean() > 0 else 1.0
        return [np.asarray(m[0].values, dtype=np.float64) / (generic + self.rel_eps * scale) for m in found[:-1]]

    def present(self, image: Image.Image, phrases: Sequence[str]) -> list[bool]:
        """Whether the VLM says each phrase is in the image (one batched greedy call; look-first thoughts dropped)."""
        from foveate.policies.base import SamplingParams

        asked = [_user(image, EXISTS_PROMPT.format(phrase=phrase)) for phrase in phrases]
        replies = self.policy.chat(asked, SamplingParams(max_new_tokens=8))
        return [protocol.strip_thought(reply.text).strip().lower().startswith("yes") for reply in replies]

    def ground(self, image: Image.Image, phrases: Sequence[str]) -> list[list[Grounding]]:
        if not phrases:
            return []
        if self.verify:
            kept = [phrase for phrase, yes in zip(phrases, self.present(image, phrases), strict=True) if yes]
            found = dict(zip(kept, self._ground_all(image, kept), strict=True)) if kept else {}
            return [found.get(phrase, []) for phrase in phrases]
        return self._ground_all(image, phrases)

    def _ground_all(self, image: Image.Image, phrases: Sequence[str]) -> list[list[Grounding]]:
        results = []
        for phrase, heat in zip(phrases, self.maps(image, phrases), strict=True):
            box, mass = thresholded_box(heat, image.size, self.fraction)
            if self.box == "window":
                selection = select_box(heat, image.size, float(self.input_side))
                if selection.box is not None:
                    box, mass = selection.box, _mass_inside(heat, image.size, selection.box)
            results.append([Grounding(box, float(min(max(mass, 0.0), 1.0)), phrase)])
        return results


def _mass_inside(values: np.ndarray, image_size: tuple[int, int], box: Box) -> float:
    """Share of a non-negative map's mass whose cell centres lie inside ``box``."""
    grid = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, None)
    rows, cols = grid.shape
    width, height = image_size
    ys = (np.arange(rows) + 0.5) * height / rows
    xs = (np.arange(cols) + 0.5) * width / cols
    inside = np.outer((ys >= box.y1) & (ys <= box.y2), (xs >= box.x1) & (xs <= box.x2))
    total = float(grid.sum())
    return float(grid[inside].sum()) / total if total > 0 and not math.isnan(total) else 0.0
