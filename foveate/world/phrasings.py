"""The world's questions as people phrase them: many wordings per family, with a held-out pool.

The question generator (`foveate.world.questions`) asks each family from one template ("Is there a red star in the
image?"), and a model trained on them keys on the template: asked "does the image contain a red star?" it may
answer with a shape. `rephrase` rewrites a world question row into another wording that asks the SAME thing
(same scene, answers, boxes, family, subtype); only a negated wording ("Is there no red star in the image?", "Do
the star and the circle have different colours?") flips a yes/no answer, and the row says so.

A rephrased row carries two new keys:

- ``referents``: the phrases of the NEW text that name what the answer depends on, verbatim ("the red thing" where
  the template said "the red object"). `foveate.world.questions.referents` parses only the fixed templates, so the
  demo model's look-first thought (`rl.sft_data.short_answer`) reads these instead;
- ``phrasing``: the wording's id, ``family/name`` (e.g. ``existence/contain``); ``source_question`` keeps the
  template text.

Wordings vary in form ("does the image contain …", "is … present?", "can you see …", "how many … can you see?",
"tell me the shape of …"), letter case (a sentence-case question or one starting in lower case, drawn per row),
"color" / "colour", the noun of a shapeless reference ("the red object" → "the red thing" / "shape" / "item") and
the world's own vocabulary synonyms (purple / violet, cyan / turquoise, circle / disc, diamond / rhombus; the
answers already accept them). Negations: existence and same-colour / same-shape comparisons. When the scene has
exactly one object (``n_objects=1``), attribute questions may also name the whole image ("What shape is in the
image?", referent "the image"; "What color is the shape?", referent "the shape").

Vocabulary stays the world's: no new colours or shapes. Words a user may bring that the world cannot draw
(rectangles that are not squares, teal, gray OBJECTS — gray is only a background colour) are not asked, since
no world answer would be true of them.

Pools: every wording belongs to exactly one pool. `HELDOUT` (about a quarter, at least one per family and
subtype, and some of each synonym kind: "colour", "thing", violet / rhombus, a negation) is never used by
``pool="train"`` (training, `rl.sft_data.DataMix.phrasings`); ``foveate eval --task world:<preset>@heldout``
evaluates with it, ``@train`` with the trained wordings, on the same items.

Rows of other kinds come back unchanged (as a copy, no keys added): multiple choice (``scoring == "choice"``, the
`zoom` preset), grounding and caption prompts, and any text that is not a world question template.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from foveate.world.questions import referents as template_referents

__all__ = ["HELDOUT", "PHRASINGS", "POOLS", "Phrasing", "phrasings_for", "rephrase", "rephrase_rows"]

POOLS: tuple[str, ...] = ("train", "heldout")
# Synonyms the world's answers already accept (questions._COLOR_SYNONYMS / _SHAPE_SYNONYMS), used in references.
_VOCAB = {"purple": "violet", "cyan": "turquoise", "circle": "disc", "diamond": "rhombus"}
_PLURAL_VOCAB = {"circles": "discs", "diamonds": "rhombuses"}
_REL_STYLES = {
    "std": {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"},
    "short": {"left of": "left of", "right of": "right of", "above": "over", "below": "under"},
    "side": {
        "left of": "on the left side of",
        "right of": "on the right side of",
        "above": "higher up than",
        "below": "lower down than",
    },
}
_PLURALS = {"cross": "crosses", "rhombus": "rhombuses"}


@dataclass(frozen=True)
class Phrasing:
    """One wording. ``text`` fills ``{a}``/``{b}`` (references), ``{np}`` (a counted plural), ``{an}``/``{bare}``/
    ``{pl}`` (an existence target: "a red star" / "red star" / "red stars"), ``{rel}``, ``{where}``, ``{attr}``.
    ``kind``: the family, or ``family/subtype`` when only that subtype fits. ``noun`` replaces a reference's
    "object"; ``vocab`` swaps in the world's synonyms; ``flip`` negates a yes/no answer; ``whole`` is a wording for
    one-object scenes whose referent is the fixed phrase it holds."""

    id: str
    kind: str
    text: str
    noun: str | None = None
    vocab: bool = False
    flip: bool = False
    whole: str | None = None
    rel: str = "std"
    british: bool = False  # {attr} "color" -> "colour"
    beside: bool = False  # {where} "next to" -> "beside"


_P = Phrasing
PHRASINGS: tuple[Phrasing, ...] = (
    # attribute / color
    _P("attribute/color-what", "attribute/color", "What color is {a}?"),
    _P("attribute/colour-what", "attribute/color", "What colour is {a}?", noun="thing"),
    _P("attribute/color-which", "attribute/color", "Which color is {a}?", vocab=True),
    _P("attribute/color-of", "attribute/color", "What is the color of {a}?", noun="shape"),
    _P("attribute/colour-tell", "attribute/color", "Tell me the colour of {a}."),
    _P("attribute/color-have", "attribute/color", "What color does {a} have?", noun="item", vocab=True),
    _P("attribute/color-in-image", "attribute/color", "What color is {a} in the image?"),
    _P("attribute/colour-picture", "attribute/color", "What colour is {a} in this picture?", noun="thing", vocab=True),
    _P("attribute/color-name", "attribute/color", "Name the color of {a}.", noun="shape"),
    _P("attribute/color-the-shape", "attribute/color", "What color is the shape?", whole="the shape"),
    _P(
        "attribute/colour-whole",
        "attribute/color",
        "What colour is the object in the image?",
        whole="the object in the image",
    ),
    # attribute / shape
    _P("attribute/shape-what", "attribute/shape", "What shape is {a}?"),
    _P("attribute/shape-which", "attribute/shape", "Which shape is {a}?", vocab=True),
    _P("attribute/shape-of", "attribute/shape", "What is the shape of {a}?", noun="thing"),
    _P("attribute/shape-tell", "attribute/shape", "Tell me the shape of {a}.", noun="item"),
    _P("attribute/shape-kind", "attribute/shape", "What kind of shape is {a}?", noun="thing", vocab=True),
    _P("attribute/shape-have", "attribute/shape", "What shape does {a} have?"),
    _P("attribute/shape-type", "attribute/shape", "What type of shape is {a}?", noun="item"),
    _P("attribute/shape-in-image", "attribute/shape", "What shape is {a} in the image?", vocab=True),
    _P("attribute/shape-whole", "attribute/shape", "What shape is in the image?", whole="the image"),
    _P("attribute/shape-see", "attribute/shape", "What shape do you see in the picture?", whole="the picture"),
    # existence (POPE); negated wordings flip the answer
    _P("existence/is-there", "existence", "Is there {an} in the image?"),
    _P("existence/contain", "existence", "Does the image contain {an}?"),
    _P("existence/present", "existence", "Is {an} present?", vocab=True),
    _P("existence/present-image", "existence", "Is {an} present in the image?"),
    _P("existence/see", "existence", "Can you see {an}?"),
    _P("existence/do-you-see", "existence", "Do you see {an} in this image?", vocab=True),
    _P("existence/any", "existence", "Are there any {pl}?"),
    _P("existence/anywhere", "existence", "Is there {an} anywhere in the picture?", vocab=True),
    _P("existence/have", "existence", "Does this picture have {an} in it?"),
    _P("existence/find", "existence", "Can you find {an} in the image?"),
    _P("existence/no", "existence", "Is there no {bare} in the image?", flip=True),
    _P("existence/true-no", "existence", "Is it true that the image has no {bare}?", flip=True),
    _P("existence/free-of", "existence", "Is the image free of {pl}?", flip=True, vocab=True),
    _P("existence/absent", "existence", "Is {an} absent from the image?", flip=True),
    # counting
    _P("counting/are-there", "counting", "How many {np} are there?"),
    _P("counting/in-image", "counting", "How many {np} are in the image?", noun="thing"),
    _P("counting/can-see", "counting", "How many {np} can you see?", noun="shape", vocab=True),
    _P("counting/do-you-see", "counting", "How many {np} do you see in the picture?", noun="thing"),
    _P("counting/count", "counting", "Count the {np} in the image.", noun="item"),
    _P("counting/number", "counting", "What is the number of {np} in the image?", noun="shape"),
    _P("counting/contain", "counting", "How many {np} does the image contain?", vocab=True),
    _P("counting/shown", "counting", "How many {np} are shown?", noun="thing", vocab=True),
    # relation
    _P("relation/is", "relation", "Is {a} {rel} {b}?"),
    _P("relation/in-image", "relation", "Is {a} {rel} {b} in the image?", rel="short", noun="thing"),
    _P("relation/located", "relation", "Is {a} located {rel} {b}?", rel="side"),
    _P("relation/appear", "relation", "Does {a} appear {rel} {b}?", vocab=True),
    _P("relation/positioned", "relation", "Is {a} positioned {rel} {b}?", rel="short", noun="item"),
    _P("relation/in-the-image", "relation", "In the image, is {a} {rel} {b}?", rel="side", noun="shape"),
    _P("relation/would-you-say", "relation", "Would you say {a} is {rel} {b}?", rel="short", vocab=True),
    # text
    _P("text/written", "text", "What is written {where} {a}?"),
    _P("text/label-say", "text", "What does the label {where} {a} say?", noun="thing"),
    _P("text/what-text", "text", "What text is {where} {a}?", beside=True),
    _P("text/read", "text", "Read the text {where} {a}.", vocab=True),
    _P("text/characters", "text", "Which characters are written {where} {a}?", noun="shape", beside=True),
    _P("text/appears", "text", "What text appears {where} {a}?", noun="item", vocab=True),
    # comparison / same-color and same-shape
    _P("comparison/same-is", "comparison/same", "Is {a} the same {attr} as {b}?"),
    _P("comparison/same-are", "comparison/same", "Are {a} and {b} the same {attr}?", british=True),
    _P("comparison/same-have", "comparison/same", "Do {a} and {b} have the same {attr}?", noun="thing"),
    _P("comparison/same-does", "comparison/same", "Does {a} have the same {attr} as {b}?", vocab=True),
    _P(
        "comparison/same-image",
        "comparison/same",
        "In the image, is {a} the same {attr} as {b}?",
        british=True,
        noun="item",
    ),
    _P("comparison/different-have", "comparison/same", "Do {a} and {b} have different {attr}s?", flip=True),
    _P(
        "comparison/different-are",
        "comparison/same",
        "Are {a} and {b} different {attr}s?",
        flip=True,
        british=True,
        noun="thing",
    ),
    _P("comparison/different-from", "comparison/same", "Is {a} a different {attr} from {b}?", flip=True, vocab=True),
    # comparison / larger: references are kept as the answers list them (no noun or vocabulary swap)
    _P("comparison/larger-which", "comparison/larger", "Which is larger, {a} or {b}?"),
    _P("comparison/bigger-which", "comparison/larger", "Which is bigger, {a} or {b}?"),
    _P("comparison/larger-one", "comparison/larger", "Which one is larger: {a} or {b}?"),
    _P("comparison/bigger-of", "comparison/larger", "Of {a} and {b}, which is bigger?"),
    _P("comparison/bigger-looks", "comparison/larger", "Which looks bigger, {a} or {b}?"),
)
# The held-out wordings (never drawn by pool="train"): 17 of the 69, at least one per family and subtype (single-
# object wordings too), covering "colour", "thing" / "item" / "shape" nouns, the world's synonyms and negations.
HELDOUT: frozenset[str] = frozenset(
    {
        "attribute/colour-picture",
        "attribute/color-name",
        "attribute/colour-whole",
        "attribute/shape-kind",
        "attribute/shape-see",
        "existence/do-you-see",
        "existence/anywhere",
        "existence/true-no",
        "existence/free-of",
        "counting/do-you-see",
        "counting/shown",
        "relation/in-the-image",
        "relation/would-you-say",
        "text/characters",
        "comparison/same-image",
        "comparison/different-are",
        "comparison/bigger-looks",
    }
)
_BY_ID = {p.id: p for p in PHRASINGS}
if len(_BY_ID) != len(PHRASINGS) or not set(_BY_ID) >= HELDOUT:  # a typo in an id fails at import
    raise AssertionError("phrasing ids must be unique and HELDOUT must name existing phrasings")


def _kind(row: dict[str, Any]) -> str:
    subtype = str(row.get("subtype"))
    if row["family"] == "attribute":
        return f"attribute/{subtype}"
    if row["family"] == "comparison":
        return "comparison/larger" if subtype == "larger" else "comparison/same"
    return row["family"]


def phrasings_for(row: dict[str, Any], pool: str, n_objects: int | None = None) -> list[Phrasing]:
    """The wordings of `pool` that fit the row's family and subtype (one-object wordings only if ``n_objects == 1``)."""
    if pool not in POOLS:
        raise ValueError(f"unknown phrasing pool {pool!r}; choose from {POOLS}")
    kind = _kind(row)
    return [
        p
        for p in PHRASINGS
        if p.kind == kind and (p.id in HELDOUT) == (pool == "heldout") and (p.whole is None or n_objects == 1)
    ]


def _head_tail(phrase: str) -> tuple[str, str]:
    """A reference split before its quoted label, so word swaps never touch the label's text."""
    cut = phrase.find(' marked "')
    return (phrase, "") if cut < 0 else (phrase[:cut], phrase[cut:])


def _swap(phrase: str, p: Phrasing) -> str:
    head, tail = _head_tail(phrase)
    if p.noun:
        head = re.sub(r"\bobject(s?)\b", lambda m: p.noun + m.group(1), head)
    if p.vocab:
        words = {**_VOCAB, **_PLURAL_VOCAB}
        head = re.sub(r"\b(" + "|".join(words) + r")\b", lambda m: words[m.group(1)], head)
    return head + tail


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _fields(row: dict[str, Any], p: Phrasing) -> dict[str, str] | None:
    """The placeholders of `p` for this row, parsed from its template question; None if it is not one."""
    question = row["question"]
    found = template_referents(question)
    family = row["family"]
    if not found:
        return None
    refs = [_swap(r, p) for r in found]
    if family == "existence":
        words = found[0].split()[1:]  # "a red star" -> color, shape
        if len(words) != 2:
            return None
        color, shape = (_VOCAB.get(w, w) if p.vocab else w for w in words)
        return {
            "an": _article(f"{color} {shape}"),
            "bare": f"{color} {shape}",
            "pl": f"{color} {_PLURALS.get(shape, shape + 's')}",
        }
    if family == "counting":
        return {"np": refs[0]}
    if family == "attribute":
        return {"a": refs[0]}
    if family == "text":
        where = "next to" if question.startswith("What is written next to ") else "on"
        return {"a": refs[0], "where": "beside" if where == "next to" and p.beside else where}
    if family == "relation" and len(refs) == 2 and row.get("subtype") in _REL_STYLES["std"]:
        return {"a": refs[0], "b": refs[1], "rel": _REL_STYLES[p.rel][row["subtype"]]}
    if family == "comparison" and len(refs) == 2:
        if row.get("subtype") == "larger":
            return {"a": found[0], "b": found[1]}  # the answers list these references verbatim
        attr = "shape" if row.get("subtype") == "same-shape" else ("colour" if p.british else "color")
        return {"a": refs[0], "b": refs[1], "attr": attr}
    return None


def _referents(p: Phrasing, fields: dict[str, str]) -> list[str]:
    """The referent placeholders of `p`'s text, in the order they appear."""
    if p.whole is not None:
        return [p.whole]
    keys = [k for k in ("a", "b", "np", "an", "bare", "pl") if "{" + k + "}" in p.text]
    return [fields[k] for k in sorted(keys, key=lambda k: p.text.index("{" + k + "}"))]


_FLIP = {"yes": "no", "no": "yes"}
_FAMILIES = frozenset({"attribute", "existence", "counting", "relation", "text", "comparison"})


def rephrase(
    row: dict[str, Any], rng: random.Random, pool: str = "train", n_objects: int | None = None
) -> dict[str, Any]:
    """A copy of world question `row` asking the same thing in a wording drawn from `pool` (see the module doc).

    ``n_objects``: how many objects the row's scene holds; 1 allows whole-image wordings. Deterministic given
    `rng`'s state. Multiple-choice, grounding and caption rows, rows already rephrased and text that is not a world
    template come back as an unchanged copy (without ``referents`` / ``phrasing``).
    """
    out = dict(row)
    if pool not in POOLS:
        raise ValueError(f"unknown phrasing pool {pool!r}; choose from {POOLS}")
    if row.get("scoring") == "choice" or "phrasing" in row or row.get("family") not in _FAMILIES:
        return out
    candidates = [(p, f) for p in phrasings_for(row, pool, n_objects) if (f := _fields(row, p)) is not None]
    if not candidates:
        return out
    p, fields = rng.choice(candidates)
    question = p.text.format(**fields)
    if rng.random() < 0.5:  # people often start in lower case
        question = question[0].lower() + question[1:]
    answers = list(row["answers"])
    if p.flip:
        if answers[0] not in _FLIP:
            return dict(row)
        answers = [_FLIP[a] for a in answers if a in _FLIP]
    out.update(
        question=question,
        answers=answers,
        referents=_referents(p, fields),
        phrasing=p.id,
        source_question=row["question"],
    )
    return out


def rephrase_rows(rows: list[dict[str, Any]], pool: str, n_objects: dict[str, int]) -> list[dict[str, Any]]:
    """Task rows rephrased from `pool`, each with its own rng seeded by (pool, row id): the same items always get
    the same wording, whatever the other rows. ``n_objects``: objects per ``scene_id`` (whole-image wordings)."""
    return [
        rephrase(row, random.Random(f"foveate-phrasing/{pool}/{row['id']}"), pool, n_objects.get(row.get("scene_id")))
        for row in rows
    ]
