"""Grounding: a phrase → boxes in original-image pixels. (protocol; backends added by the grounding work)"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from PIL import Image

from foveate.tools.boxes import Box


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


# ---- a minimal backend for white-box VLMs (the grounding work builds the full set) --------------------------
EXISTS_PROMPT = "Is there a {phrase} in the image? Answer yes or no."
WHERE_PROMPT = "Where is the {phrase}?"
GENERIC_PROMPT = "Write a general description of the image."  # ViCrop's generic prompt (protocol.GENERIC_PROMPT)


class AttentionGrounder:
    """Grounding with a white-box VLM's own attention (ViCrop's rel-att map and window search).

    For each phrase, in two batched model calls: the VLM answers "Is there a {phrase} in the image?" (a "no"
    grounds nothing); for the "yes" phrases the attention of "Where is the {phrase}?" at ``layer``, divided by that
    of ViCrop's generic prompt, goes through `tools.saliency.select_box`, and the chosen window is the region
    (score: the fraction of the map's mass inside it). The window is a crop-sized square around the attention
    peak, not a tight box, and one phrase yields at most one region, so counts from it are 0 or 1: use a detector
    for counting. An image the model sees whole (``input_side`` covers it) grounds to the whole image.
    """

    def __init__(self, policy, *, layer: int = 0, input_side: int = 224, max_new_tokens: int = 8) -> None:
        if not getattr(policy, "white_box", False):
            raise ValueError(f"{getattr(policy, 'name', 'policy')}: attention grounding needs a white-box backend")
        self.policy, self.layer, self.input_side, self.max_new_tokens = policy, layer, input_side, max_new_tokens

    @staticmethod
    def _conversation(image: Image.Image, text: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]

    def ground(self, image: Image.Image, phrases: Sequence[str]) -> list[list[Grounding]]:
        import numpy as np

        from foveate.policies.base import SamplingParams
        from foveate.protocol import strip_thought
        from foveate.tools.saliency import select_box

        if not phrases:
            return []
        asked = [self._conversation(image, EXISTS_PROMPT.format(phrase=phrase)) for phrase in phrases]
        replies = self.policy.chat(asked, SamplingParams(max_new_tokens=self.max_new_tokens))
        present = [i for i, reply in enumerate(replies) if strip_thought(reply.text).lower().startswith("yes")]
        results: list[list[Grounding]] = [[] for _ in phrases]
        if not present:
            return results
        wheres = [self._conversation(image, WHERE_PROMPT.format(phrase=phrases[i])) for i in present]
        maps = self.policy.image_attention([*wheres, self._conversation(image, GENERIC_PROMPT)], self.layer)
        generic = np.asarray(maps[-1][0].values, dtype=float)
        for index, row in zip(present, maps[:-1], strict=False):
            ratio = np.asarray(row[0].values, dtype=float) / (generic + 1e-3 * float(generic.mean()) + 1e-12)
            selection = select_box(ratio, image.size, self.input_side)
            box = selection.box or Box(0, 0, *image.size)
            cells = row[0].upsampled()
            inside = cells[int(box.y1) : int(box.y2), int(box.x1) : int(box.x2)].sum()
            score = float(inside / cells.sum()) if cells.sum() > 0 else 0.0
            results[index].append(Grounding(box=box, score=min(1.0, max(0.0, score)), phrase=phrases[index]))
        return results
