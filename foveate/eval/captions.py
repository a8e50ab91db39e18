"""Dense-caption metrics against a world scene's objects: object and attribute P/R/F1, hallucination, length.

The world knows every object, so a caption needs no judge: a parser of the world's vocabulary (shapes, colours,
sizes from `foveate.world.scenes`) reads the object *mentions* of a caption and they are compared with the scene.

- A **mention** is a shape noun ("circle", plural "circles") with the colour and size words before it in the same
  phrase (at most 4 words back, not past punctuation or another shape): "a tiny red star" → (star, red, tiny).
  "medium-sized" reads as "medium". A number word or digit right before the adjectives ("two red circles")
  repeats the mention that many times (at most 9); a plural without a number counts once.
- A mention is **consistent** with an object when the shapes are equal and every stated attribute equals the
  object's. A mention consistent with no object in the scene is **hallucinated** (CHAIR_i: hallucinated mentions
  / mentions; CHAIR_s: whether the caption has any).
- **Object recall** = objects covered by a maximum one-to-one matching of mentions to consistent objects / objects;
  **object precision** = mentions consistent with some object / mentions (= 1 − CHAIR_i, so repeating a real
  object is not a false positive: duplicates show in the length instead); F1 from those.
- **Attributes**: every mention states (shape, attribute, value) triples for its colour and size; every object
  has its colour and size triples. Precision = predicted triples that some object has / predicted triples (a
  repeated true triple is not penalised, as for objects); recall = the multiset overlap / reference triples.
  Labels (text written on objects) are not scored.
- **Length**: words in the caption.

The CAPTURE metric the paper reports (object/attribute/relation F1 weighted 0.5/0.5/0.2 over scene graphs parsed by
a language model) needs a parser model; this is its exact-vocabulary counterpart for the world.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from foveate.world.scenes import COLORS, SHAPES, SIZE_CLASSES

__all__ = ["Mention", "caption_metrics", "parse_mentions"]

_PLURALS = {shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s"): shape for shape in SHAPES}
_SHAPE_WORDS = {**{shape: shape for shape in SHAPES}, **_PLURALS}
_SIZE_WORDS = {**{size: size for size in SIZE_CLASSES}, "medium-sized": "medium"}
_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}
_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)*|\d+|[^\sa-z\d]")


@dataclass(frozen=True)
class Mention:
    """One object a caption names: its shape, and its colour and size when the caption states them."""

    shape: str
    color: str | None = None
    size: str | None = None

    def consistent(self, obj: dict[str, Any]) -> bool:
        return (
            obj["shape"] == self.shape
            and self.color in (None, obj["color"])
            and self.size in (None, obj.get("size", obj.get("size_class")))
        )


def parse_mentions(text: str) -> list[Mention]:
    """The object mentions of a caption, in order (see the module doc).

    >>> parse_mentions("A tiny red star; two medium-sized blue squares and a circle on a pale blue background.")
    [Mention(shape='star', color='red', size='tiny'), Mention(shape='square', color='blue', size='medium'), \
Mention(shape='square', color='blue', size='medium'), Mention(shape='circle', color=None, size=None)]
    """
    tokens = _TOKEN.findall(str(text).lower())
    mentions: list[Mention] = []
    for index, token in enumerate(tokens):
        shape = _SHAPE_WORDS.get(token)
        if shape is None:
            continue
        color = size = None
        count = 1
        for back in range(index - 1, max(-1, index - 5), -1):
            word = tokens[back]
            if word in _SHAPE_WORDS or not re.match(r"[a-z\d]", word):
                break
            if word in COLORS and color is None:
                color = word
            elif word in _SIZE_WORDS and size is None:
                size = _SIZE_WORDS[word]
            elif word in _NUMBERS or word.isdigit():
                count = min(9, max(1, _NUMBERS.get(word) or int(word)))
                break
        mentions += [Mention(shape, color, size)] * count
    return mentions


def _max_matching(mentions: Sequence[Mention], objects: Sequence[dict[str, Any]]) -> int:
    """Size of a maximum one-to-one matching of mentions to consistent objects (augmenting paths)."""
    edges = [[j for j, obj in enumerate(objects) if m.consistent(obj)] for m in mentions]
    owner: dict[int, int] = {}

    def augment(i: int, seen: set[int]) -> bool:
        for j in edges[i]:
            if j in seen:
                continue
            seen.add(j)
            if j not in owner or augment(owner[j], seen):
                owner[j] = i
                return True
        return False

    return sum(augment(i, set()) for i in range(len(mentions)))


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def caption_metrics(text: str, objects: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every caption metric of ``text`` against the scene ``objects`` (dicts with shape, color, size).

    >>> star = {"shape": "star", "color": "red", "size": "tiny"}
    >>> m = caption_metrics("A tiny red star and a green square.", [star, {"shape": "circle", "color": "blue"}])
    >>> m["object_recall"], m["object_precision"], m["hallucination"], round(m["attribute_precision"], 3)
    (0.5, 0.5, 0.5, 0.667)
    """
    mentions = parse_mentions(text)
    consistent = [any(m.consistent(o) for o in objects) for m in mentions]
    matched = _max_matching(mentions, objects)
    precision = sum(consistent) / len(mentions) if mentions else 0.0
    recall = matched / len(objects) if objects else 0.0
    predicted = Counter(
        (m.shape, key, value) for m in mentions for key, value in (("color", m.color), ("size", m.size)) if value
    )
    reference = Counter(
        (o["shape"], key, o.get(key) if key == "color" else o.get("size", o.get("size_class")))
        for o in objects
        for key in ("color", "size")
    )
    true_triples = sum(count for triple, count in predicted.items() if triple in reference)
    attribute_precision = true_triples / sum(predicted.values()) if predicted else 0.0
    attribute_recall = sum((predicted & reference).values()) / sum(reference.values()) if reference else 0.0
    hallucinated = len(mentions) - sum(consistent)
    return {
        "object_precision": precision,
        "object_recall": recall,
        "object_f1": _f1(precision, recall),
        "attribute_precision": attribute_precision,
        "attribute_recall": attribute_recall,
        "attribute_f1": _f1(attribute_precision, attribute_recall),
        "hallucination": hallucinated / len(mentions) if mentions else 0.0,
        "hallucinated_caption": float(hallucinated > 0),
        "mentions": len(mentions),
        "caption_words": len(re.findall(r"\S+", str(text))),
    }
