"""Referring expressions and the reference dense description of a scene.

A question is only fair if its noun phrase picks out exactly one object. `unique_reference` builds the shortest
phrase ("the star", "the red star", "the tiny red star", "the star marked "K"") and checks programmatically
that exactly one object in the scene matches it; the attribute being asked about is never used to describe the
target (no "What color is the red star?").
"""

from __future__ import annotations

from itertools import combinations
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: scenes imports this module to describe what it generates
    from foveate.world.scenes import Scene, WorldObject

__all__ = ["SIZE_WORDS", "describe_scene", "matching_objects", "reference_phrase", "unique_reference"]

SIZE_WORDS: dict[str, str] = {"tiny": "tiny", "small": "small", "medium": "medium-sized", "large": "large"}
# Preference among unique phrases: shortest first, shape as the natural noun, colour the most natural adjective,
# size next; the label only as a last resort (reading it is itself a fine-detail task).
_PRIORITY = {"shape": 0, "color": 1, "size": 2, "label": 3}
_CLUTTER_WORDS = {"noise": "a faint noise texture", "stripes": "faint stripes", "lines": "many thin random lines"}


def matching_objects(scene: Scene, attrs: dict[str, str]) -> list[WorldObject]:
    """Objects whose attributes equal every given attribute (keys: shape, color, size, label)."""
    return [o for o in scene.objects if all(o.attrs()[k] == v for k, v in attrs.items())]


def reference_phrase(attrs: dict[str, str]) -> str:
    """Noun phrase for an attribute set: {"size": "tiny", "color": "red", "shape": "star"} -> "the tiny red star"."""
    words = ["the"]
    if "size" in attrs:
        words.append(SIZE_WORDS[attrs["size"]])
    if "color" in attrs:
        words.append(attrs["color"])
    words.append(attrs.get("shape", "object"))
    phrase = " ".join(words)
    if "label" in attrs:
        phrase += f' marked "{attrs["label"]}"'
    return phrase


def unique_reference(
    scene: Scene, obj: WorldObject, exclude: tuple[str, ...] | frozenset[str] = ()
) -> tuple[str, dict[str, str]] | None:
    """Shortest phrase that matches `obj` and nothing else, never using the attributes in `exclude`.

    Returns (phrase, attrs) or None when no allowed combination is unique (e.g. two identical unlabelled tiny
    red stars and colour excluded). When shape is allowed it is always part of the phrase, as a noun.
    """
    allowed = [a for a in ("shape", "color", "size", "label") if a not in exclude and (a != "label" or obj.label)]
    candidates = [c for k in range(1, len(allowed) + 1) for c in combinations(allowed, k)]
    if "shape" in allowed:
        candidates = [c for c in candidates if "shape" in c]
    candidates.sort(key=lambda c: ("label" in c, len(c), sorted(_PRIORITY[a] for a in c)))
    full = obj.attrs()
    for combo in candidates:
        attrs = {a: full[a] for a in combo}
        found = matching_objects(scene, attrs)
        if len(found) == 1 and found[0] is obj:
            return reference_phrase(attrs), attrs
    return None


def _object_sentence(obj: WorldObject, width: int, height: int) -> str:
    text = f"a {obj.size_class} {obj.color} {obj.shape} {position_phrase(obj.box, width, height)}"
    if obj.label and obj.label_placement == "on":
        text += f', with "{obj.label}" written on it'
    elif obj.label:
        text += f', with the label "{obj.label}" next to it'
    return text


def describe_scene(scene: Scene, max_relations: int = 4) -> str:
    """Deterministic dense caption: background, every object (largest first), then a few spatial relations."""
    if scene.clutter == "none":
        head = f"A {scene.width}x{scene.height} image with a plain {scene.background} background."
    else:
        texture = _CLUTTER_WORDS[scene.clutter]
        head = f"A {scene.width}x{scene.height} image with a {scene.background} background covered in {texture}."
    order = sorted(scene.objects, key=lambda o: (-o.side, o.id))
    noun = "object" if len(order) == 1 else "objects"
    body = (
        f" It shows {len(order)} {noun}: "
        + "; ".join(_object_sentence(o, scene.width, scene.height) for o in order)
        + "."
    )
    # Relations between the biggest objects first (the ones a reader would anchor on), each pair once, only
    # "left of" / "above" (their inverses are implied), only between uniquely nameable objects.
    relations = {
        (r["subject"], r["object"]): r["relation"] for r in scene.relations if r["relation"] in ("left of", "above")
    }
    refs = {o.id: unique_reference(scene, o) for o in order}
    sentences: list[str] = []
    for a in order:
        for b in order:
            if len(sentences) >= max_relations:
                break
            rel = relations.get((a.id, b.id))
            ra, rb = refs[a.id], refs[b.id]
            if rel and ra and rb:
                verb = "to the left of" if rel == "left of" else "above"
                sentences.append(f"{ra[0][0].upper()}{ra[0][1:]} is {verb} {rb[0]}.")
                break  # one relation per subject keeps the caption varied
    return head + body + ("" if not sentences else " " + " ".join(sentences))


def position_phrase(box: list[int], width: int, height: int) -> str:
    """Rough position of a box centre on a 3x3 grid: "in the top left", "in the center", "at the bottom", ..."""
    cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    col = 0 if cx < 1 / 3 else (1 if cx < 2 / 3 else 2)
    row = 0 if cy < 1 / 3 else (1 if cy < 2 / 3 else 2)
    grid = [
        ["in the top left", "at the top", "in the top right"],
        ["on the left", "in the center", "on the right"],
        ["in the bottom left", "at the bottom", "in the bottom right"],
    ]
    return grid[row][col]
