"""Question families over a scene, each with an exact answer and its evidence boxes.

Every family returns a plain dict::

    {"question", "answers", "family", "subtype", "split", "clutter", "boxes", "target_size", "object_ids"}

- ``answers[0]`` is the canonical lower-case answer (colour or shape name, "yes"/"no", a digit string, the label
  lower-cased); later entries are accepted synonyms ("plus" for cross, "three" for 3) for rule-based matching.
- ``boxes`` are the evidence: the boxes a perfect looker must inspect (for text, the object and its label ink).
- ``target_size`` is the size class that limits legibility: the target's for single-object questions, the
  smallest involved object's for counting/relation/comparison, the LARGEST match's for an existence "yes" (any
  one match suffices), the smallest one-attribute "near miss" for an existence "no" (None when there is none,
  i.e. nothing in the scene shares the colour or the shape it would take to be confused).
- ``split`` follows from it: tiny -> "small-detail", small -> "mid-detail", medium/large/None -> "large".
  Presets accept a question only if its split is in `QuestionConfig.splits`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from foveate.protocol import DESCRIBE_PROMPT, GROUNDING_PROMPT
from foveate.world.describe import matching_objects, unique_reference
from foveate.world.scenes import COLORS, SHAPES, SIZE_CLASSES, Scene, SceneConfig, WorldObject

__all__ = [
    "EXISTENCE_SUBTYPES",
    "FAMILIES",
    "SPLITS",
    "QuestionConfig",
    "confusers",
    "generate_question",
    "generate_questions",
    "popularity",
    "referents",
    "split_for",
]

SPLITS: tuple[str, ...] = ("small-detail", "mid-detail", "large")
EXISTENCE_SUBTYPES: tuple[str, ...] = ("random", "popular", "adversarial")
POPULAR_TOP_K = 3  # POPE "popular": sample among the k most frequent (colour, shape) combos absent from the image
_PLURALS = {s: s + "s" for s in SHAPES} | {"cross": "crosses"}
_SHAPE_SYNONYMS = {"cross": ["plus"], "diamond": ["rhombus"], "circle": ["disc"]}
_COLOR_SYNONYMS = {"purple": ["violet"], "cyan": ["turquoise"]}
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_REL_PHRASE = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class QuestionConfig:
    """Which questions a preset asks. Families a scene cannot support are skipped, never forced."""

    family_weights: tuple[tuple[str, float], ...] = (
        ("attribute", 3.0),
        ("existence", 2.0),
        ("counting", 1.5),
        ("relation", 1.5),
        ("text", 1.5),
        ("comparison", 1.0),
    )
    splits: tuple[str, ...] = SPLITS  # accepted values of `split` (the target's size regime)
    attribute_subtypes: tuple[str, ...] = ("color", "shape")
    existence_subtypes: tuple[str, ...] = EXISTENCE_SUBTYPES  # POPE subsets; each gets yes and no questions
    existence_yes_prob: float = 0.5  # POPE balance: half the existence questions are answered "yes"
    counting_subtypes: tuple[str, ...] = ("color", "shape", "color+shape")
    relation_subtypes: tuple[str, ...] = ("left of", "right of", "above", "below")
    comparison_subtypes: tuple[str, ...] = ("same-color", "same-shape", "larger")
    max_count: int = 9  # counting answers stay single digits
    # If set, each question first draws its split from these weights and is then generated within it, so a mixed
    # preset is not dominated by small-detail questions (tiny objects are the most numerous).
    split_weights: tuple[tuple[str, float], ...] | None = None


def split_for(size_class: str | None) -> str:
    """The size regime of a question from the size class of the object that limits it."""
    if size_class == "tiny":
        return "small-detail"
    if size_class == "small":
        return "mid-detail"
    return "large"


def _smallest(objs: list[WorldObject]) -> str:
    return min((o.size_class for o in objs), key=SIZE_CLASSES.index)


def _largest(objs: list[WorldObject]) -> str:
    return max((o.size_class for o in objs), key=SIZE_CLASSES.index)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _strip_the(phrase: str) -> str:
    return phrase[4:] if phrase.startswith("the ") else phrase


def _make(
    scene: Scene,
    question: str,
    answers: list[str],
    family: str,
    subtype: str,
    objs: list[WorldObject],
    target: str | None,
    boxes: list[list[int]] | None = None,
    ref_attrs: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    if boxes is None:
        # Evidence is each object's box, plus its label ink when the question names the object by its label
        # ("the triangle marked "F""): finding the referent then means reading that label.
        boxes = []
        for obj, attrs in zip(objs, ref_attrs or [{} for _ in objs], strict=True):
            boxes.append(obj.box)
            if "label" in attrs and obj.label_box:
                boxes.append(obj.label_box)
    return {
        "question": question,
        "answers": list(dict.fromkeys(answers)),  # dedupe, keep order (canonical first)
        "family": family,
        "subtype": subtype,
        "split": split_for(target),
        "clutter": scene.clutter_split,
        "boxes": [list(b) for b in boxes],
        "target_size": target,
        "object_ids": [o.id for o in objs],
    }


def _ok(cfg: QuestionConfig, size_class: str | None) -> bool:
    return split_for(size_class) in cfg.splits


def ask_attribute(scene: Scene, rng: random.Random, cfg: QuestionConfig, scfg: SceneConfig) -> dict[str, Any] | None:
    """ "What color is the star?" / "What shape is the tiny red object?" -- never describes by the asked attribute."""
    subtype = rng.choice(cfg.attribute_subtypes)
    cands = []
    for o in scene.objects:
        ref = unique_reference(scene, o, exclude=(subtype,)) if _ok(cfg, o.size_class) else None
        if ref:
            cands.append((o, ref))
    if not cands:
        return None
    obj, (phrase, attrs) = rng.choice(cands)
    if subtype == "color":
        q, answers = f"What color is {phrase}?", [obj.color, *_COLOR_SYNONYMS.get(obj.color, [])]
    else:
        q, answers = f"What shape is {phrase}?", [obj.shape, *_SHAPE_SYNONYMS.get(obj.shape, [])]
    return _make(scene, q, answers, "attribute", subtype, [obj], obj.size_class, ref_attrs=[attrs])


def popularity(scfg: SceneConfig) -> dict[tuple[str, str], float]:
    """Prior frequency of each (colour, shape) combo in the world: the ranking behind POPE "popular" negatives."""
    return {
        (c, s): cw * sw
        for c, cw in zip(COLORS, scfg.color_weights, strict=True)
        for s, sw in zip(SHAPES, scfg.shape_weights, strict=True)
    }


def confusers(scene: Scene, color: str, shape: str) -> list[WorldObject]:
    """Objects that differ from (color, shape) in exactly one attribute -- what must be inspected to say "no"."""
    return [o for o in scene.objects if (o.color == color) != (o.shape == shape)]


def ask_existence(scene: Scene, rng: random.Random, cfg: QuestionConfig, scfg: SceneConfig) -> dict[str, Any] | None:
    """POPE-style "Is there a red star in the image?" with random / popular / adversarial negatives.

    Both a "yes" and a "no" candidate must exist before the answer is drawn; otherwise scenes where only one
    polarity fits the split would skew the yes/no balance.
    """
    subtype = rng.choice(cfg.existence_subtypes)
    present = sorted({(o.color, o.shape) for o in scene.objects})
    yes_cands = []
    for color, shape in present:
        matches = matching_objects(scene, {"color": color, "shape": shape})
        if _ok(cfg, _largest(matches)):  # any one match answers "yes", so the largest match sets the split
            yes_cands.append((color, shape, matches, _largest(matches)))
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    if subtype == "popular":
        prior = popularity(scfg)
        absent = sorted(absent, key=lambda cs: (-prior[cs], cs))[:POPULAR_TOP_K]
    elif subtype == "adversarial":
        absent = [cs for cs in absent if confusers(scene, *cs)]  # co-occurs: one attribute away from something present
    no_cands = []
    for color, shape in absent:
        near = confusers(scene, color, shape)
        target = _smallest(near) if near else None
        if _ok(cfg, target):
            no_cands.append((color, shape, near, target))
    if not (yes_cands and no_cands):
        return None
    yes = rng.random() < cfg.existence_yes_prob
    color, shape, objs, target = rng.choice(yes_cands if yes else no_cands)
    q = f"Is there {_a(color)} {shape} in the image?"
    return _make(scene, q, ["yes" if yes else "no"], "existence", subtype, objs, target)


def ask_counting(scene: Scene, rng: random.Random, cfg: QuestionConfig, scfg: SceneConfig) -> dict[str, Any] | None:
    """ "How many red objects are there?" -- counts every match, so the smallest match sets the split."""
    subtype = rng.choice(cfg.counting_subtypes)
    keys = sorted(
        {(o.color if "color" in subtype else None, o.shape if "shape" in subtype else None) for o in scene.objects},
        key=str,
    )
    cands = []
    for color, shape in keys:
        attrs = {k: v for k, v in (("color", color), ("shape", shape)) if v is not None}
        found = matching_objects(scene, attrs)
        if len(found) <= cfg.max_count and _ok(cfg, _smallest(found)):
            cands.append((color, shape, found))
    if not cands:
        return None
    # Draw the count first, uniformly over the counts on offer: most colour/shape keys match one object, and a
    # counter that always says "1" should not score well.
    count = rng.choice(sorted({len(c[2]) for c in cands}))
    color, shape, found = rng.choice([c for c in cands if len(c[2]) == count])
    noun = " ".join(w for w in (color, _PLURALS[shape] if shape else "objects") if w)
    n = len(found)
    return _make(
        scene, f"How many {noun} are there?", [str(n), _NUMBER_WORDS[n]], "counting", subtype, found, _smallest(found)
    )


def ask_relation(scene: Scene, rng: random.Random, cfg: QuestionConfig, scfg: SceneConfig) -> dict[str, Any] | None:
    """ "Is the red circle to the left of the blue square?" -- "no" asks the inverse of a relation that holds."""
    cands = []
    for rel in scene.relations:
        a, b = scene.object(rel["subject"]), scene.object(rel["object"])
        if rel["relation"] not in cfg.relation_subtypes and _INVERSE[rel["relation"]] not in cfg.relation_subtypes:
            continue
        if _ok(cfg, _smallest([a, b])):
            cands.append((a, rel["relation"], b))
    rng.shuffle(cands)
    for a, relation, b in cands:
        ra, rb = unique_reference(scene, a), unique_reference(scene, b)
        if not (ra and rb):
            continue
        yes = rng.random() < 0.5
        asked = relation if yes else _INVERSE[relation]  # the inverse is false: the strict relation holds the other way
        if asked not in cfg.relation_subtypes:
            asked, yes = (_INVERSE[asked], not yes)
        q = f"Is {ra[0]} {_REL_PHRASE[asked]} {rb[0]}?"
        answer = ["yes" if yes else "no"]
        return _make(scene, q, answer, "relation", asked, [a, b], _smallest([a, b]), ref_attrs=[ra[1], rb[1]])
    return None


def ask_text(scene: Scene, rng: random.Random, cfg: QuestionConfig, scfg: SceneConfig) -> dict[str, Any] | None:
    """ "What is written on the green triangle?" / "... next to the tiny star?" -- evidence is object + label ink."""
    cands = []
    for o in scene.objects:
        if not (o.label and o.label_box and _ok(cfg, o.size_class)):
            continue
        ref = unique_reference(scene, o, exclude=("label",))
        if ref:
            cands.append((o, ref[0]))
    if not cands:
        return None
    obj, phrase = rng.choice(cands)
    assert obj.label and obj.label_box
    where = "on" if obj.label_placement == "on" else "next to"
    boxes = [obj.box, obj.label_box]
    return _make(
        scene,
        f"What is written {where} {phrase}?",
        [obj.label.lower()],
        "text",
        obj.label_placement or "next",
        [obj],
        obj.size_class,
        boxes,
    )


def ask_comparison(scene: Scene, rng: random.Random, cfg: QuestionConfig, scfg: SceneConfig) -> dict[str, Any] | None:
    """Two-step: "Is the star the same color as the square?", "... same shape ...", "Which is larger, X or Y?"."""
    subtype = rng.choice(cfg.comparison_subtypes)
    # Never describe an object by the attribute being compared (that would answer the question in the prompt).
    exclude = {"same-color": ("color",), "same-shape": ("shape",), "larger": ("size",)}[subtype]
    refs = {o.id: unique_reference(scene, o, exclude=exclude) for o in scene.objects}
    yes_pairs, no_pairs = [], []
    objs = scene.objects
    for i, a in enumerate(objs):
        for b in objs[i + 1 :]:
            if not (refs[a.id] and refs[b.id] and _ok(cfg, _smallest([a, b]))):
                continue
            if subtype == "larger":
                # Different size classes (areas differ >= ~2x) and shapes, so the answer is a shape word.
                if a.size_class != b.size_class and a.shape != b.shape:
                    yes_pairs.append((a, b))
            elif a.color == b.color if subtype == "same-color" else a.shape == b.shape:
                yes_pairs.append((a, b))
            else:
                no_pairs.append((a, b))
    if subtype == "larger":
        no_pairs = yes_pairs  # no polarity: the answer is a shape word
    if not (yes_pairs and no_pairs):  # both polarities must be possible, or "yes" would be rare (see existence)
        return None
    a, b = rng.choice(yes_pairs if rng.random() < 0.5 else no_pairs)
    if rng.random() < 0.5:
        a, b = b, a
    pa, pb = refs[a.id][0], refs[b.id][0]  # type: ignore[index]
    if subtype == "larger":
        big, pbig = (a, pa) if SIZE_CLASSES.index(a.size_class) > SIZE_CLASSES.index(b.size_class) else (b, pb)
        q = f"Which is larger, {pa} or {pb}?"
        answers = [big.shape, _strip_the(pbig), pbig]
    else:
        attr = "color" if subtype == "same-color" else "shape"
        q = f"Is {pa} the same {attr} as {pb}?"
        answers = ["yes" if getattr(a, attr) == getattr(b, attr) else "no"]
    ref_attrs = [refs[a.id][1], refs[b.id][1]]  # type: ignore[index]
    return _make(scene, q, answers, "comparison", subtype, [a, b], _smallest([a, b]), ref_attrs=ref_attrs)


def ask_grounding(scene: Scene, rng: random.Random, cfg: QuestionConfig, scfg: SceneConfig) -> dict[str, Any] | None:
    """ "Locate the red star. Answer with its bounding box." -- answers [], the gold box is the evidence box.

    Not part of any preset's default family weights (the demo model learns grounding from its own SFT format);
    the `grounding` preset asks only these, for grounding accuracy at IoU >= 0.5.
    """
    cands = [(o, ref) for o in scene.objects if _ok(cfg, o.size_class) and (ref := unique_reference(scene, o))]
    if not cands:
        return None
    obj, (phrase, attrs) = rng.choice(cands)
    question = GROUNDING_PROMPT.format(reference=_strip_the(phrase))
    return _make(scene, question, [], "grounding", "box", [obj], obj.size_class, boxes=[list(obj.box)])


def ask_caption(scene: Scene, rng: random.Random, cfg: QuestionConfig, scfg: SceneConfig) -> dict[str, Any] | None:
    """ "Describe the image in detail." -- the reference is the scene's dense description, and the row carries every
    object with its attributes and box (``objects``) for the caption metrics (`foveate.eval.captions`).

    Only the `caption` preset asks it; its split is the smallest object's regime (what a detailed caption must
    reach). The prompt is the one the demo model learned its descriptions with (`protocol.DESCRIBE_PROMPT`).
    """
    del rng, scfg  # one caption per scene: nothing to draw
    if not scene.objects or not _ok(cfg, _smallest(scene.objects)):
        return None
    smallest = _smallest(scene.objects)
    row = _make(scene, DESCRIBE_PROMPT, [scene.description], "caption", "dense", scene.objects, smallest)
    row["objects"] = [{**o.attrs(), "box": list(o.box)} for o in scene.objects]
    return row


FamilyFn = Callable[[Scene, random.Random, QuestionConfig, SceneConfig], dict[str, Any] | None]
FAMILIES: dict[str, FamilyFn] = {
    "attribute": ask_attribute,
    "existence": ask_existence,
    "counting": ask_counting,
    "relation": ask_relation,
    "text": ask_text,
    "comparison": ask_comparison,
    "grounding": ask_grounding,
    "caption": ask_caption,
}


def generate_question(
    scene: Scene,
    rng: random.Random,
    family: str,
    config: QuestionConfig | None = None,
    scene_config: SceneConfig | None = None,
) -> dict[str, Any] | None:
    """One question of `family` about `scene`, or None if the scene cannot support it under the config's splits."""
    if family not in FAMILIES:
        raise ValueError(f"unknown question family {family!r}; choose from {sorted(FAMILIES)}")
    return FAMILIES[family](scene, rng, config or QuestionConfig(), scene_config or SceneConfig())


def generate_questions(
    scene: Scene,
    rng: random.Random,
    k: int,
    config: QuestionConfig | None = None,
    scene_config: SceneConfig | None = None,
) -> list[dict[str, Any]]:
    """Up to `k` distinct questions (different wording) about one scene, families drawn by weight.

    Fewer than `k` come back when the scene cannot support more under the preset's splits.
    """
    cfg = config or QuestionConfig()
    names = [f for f, _ in cfg.family_weights]
    weights = [w for _, w in cfg.family_weights]
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(12 * k):
        if len(out) >= k:
            break
        qcfg = cfg
        if cfg.split_weights:
            split = rng.choices([s for s, _ in cfg.split_weights], weights=[w for _, w in cfg.split_weights])[0]
            qcfg = replace(cfg, splits=(split,))
        q = generate_question(scene, rng, rng.choices(names, weights=weights)[0], qcfg, scene_config)
        if q is not None and q["question"] not in seen:
            seen.add(q["question"])
            out.append(q)
    return out


_REL_ALTERNATION = "|".join(_REL_PHRASE.values())
# The world's question templates, each with the groups that name the objects the answer depends on.
_REFERENT_PATTERNS = [
    re.compile(r"What (?:color|shape) is (.+)\?"),
    re.compile(r"Is there (.+) in the image\?"),
    re.compile(r"How many (.+) are there\?"),
    re.compile(r"What is written (?:on|next to) (.+)\?"),
    re.compile(rf"Is (the .+?) (?:{_REL_ALTERNATION}) (the .+)\?"),
    re.compile(r"Which is larger, (the .+?) or (the .+)\?"),
    re.compile(r"Is (the .+?) the same (?:color|shape) as (the .+)\?"),
]


def referents(question: str) -> list[str]:
    """The phrases of a world question that name what its answer depends on, in question order.

    >>> referents("What color is the medium-sized square?")
    ['the medium-sized square']
    >>> referents("Is the red star to the left of the small circle?")
    ['the red star', 'the small circle']

    Empty for text that is not one of the world's question templates (grounding prompts included).
    """
    for pattern in _REFERENT_PATTERNS:
        match = pattern.fullmatch(question.strip())
        if match:
            return list(match.groups())
    return []
