"""Patch Matters' pure steps (no model): divide the image, pick grounding phrases, group samples, merge texts.

Split from `agents.patch_matters` (the graph and its model calls; its docstring describes the method and lists
the deviations from the paper). Everything here takes boxes, strings and embedding matrices and is tested on
exact cases (tests/test_patch_matters.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from foveate.tools.boxes import Box

Embed = Callable[[Sequence[str]], np.ndarray]  # texts → unit vectors (rows), e.g. SentenceEmbedder.embed


# ---- divide -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Patch:
    """One region to caption: ``name`` (top-left … bottom-right, main) and its box in original pixels."""

    name: str
    box: Box
    enlarged_by: tuple[int, ...] = ()  # indices of the grounded boxes that enlarged it


QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")


def union(boxes: Sequence[Box]) -> Box:
    """The smallest box holding every box."""
    return Box(min(b.x1 for b in boxes), min(b.y1 for b in boxes), max(b.x2 for b in boxes), max(b.y2 for b in boxes))


def inside_fraction(box: Box, region: Box) -> float:
    """Share of ``box``'s area that lies inside ``region``."""
    overlap = box.intersection(region)
    return overlap.area / box.area if overlap else 0.0


def quadrants(image_size: tuple[int, int]) -> list[Box]:
    """The four quadrants, row-major (top-left, top-right, bottom-left, bottom-right)."""
    width, height = image_size
    cx, cy = width / 2, height / 2
    return [Box(0, 0, cx, cy), Box(cx, 0, width, cy), Box(0, cy, cx, height), Box(cx, cy, width, height)]


def divide(
    image_size: tuple[int, int],
    boxes: Sequence[Box],
    main_boxes: Sequence[Box] = (),
    *,
    inside: float = 0.3,
    main_iou: float = 0.4,
) -> list[Patch]:
    """The paper's patches: each quadrant enlarged to hold every box with more than ``inside`` of its area in
    the (original) quadrant, plus the semantic main box (union of ``main_boxes``) when its IoU with the whole
    image is below ``main_iou``. One pass: a box pulled in does not pull in further boxes.

    >>> [p.box.to_list() for p in divide((100, 100), [Box(30, 30, 60, 60)])][:2]  # 44 % in top-left, 22 % top-right
    [[0.0, 0.0, 60.0, 60.0], [50.0, 0.0, 100.0, 50.0]]
    """
    patches = []
    for name, quadrant in zip(QUADRANTS, quadrants(image_size), strict=True):
        members = tuple(i for i, box in enumerate(boxes) if inside_fraction(box, quadrant) > inside)
        grown = union([quadrant, *(boxes[i] for i in members)])
        patches.append(Patch(name, grown, members))
    if main_boxes:
        main = union(list(main_boxes))
        if main.iou(Box(0, 0, *image_size)) < main_iou:
            patches.append(Patch("main", main))
    return patches


def region_name(box: Box, image_size: tuple[int, int]) -> str:
    """Where a box's centre lies: "top-left" … "bottom-right", "top", "left", …, or "centre" (thirds)."""
    cx, cy = box.center
    width, height = image_size
    column = ("left", "", "right")[min(2, int(3 * cx / width))]
    row = ("top", "", "bottom")[min(2, int(3 * cy / height))]
    return "-".join(part for part in (row, column) if part) or "centre"


# ---- phrases to ground ----------------------------------------------------------------------------------------
_ARTICLE = re.compile(r"^(?:a|an|the|one|two|three|four|five|six|seven|eight|nine|ten|\d+|some|several)\s+", re.I)
_STOP = re.compile(
    r"\s+(?:in|on|at|with|near|next|to|of|above|below|beside|behind|under|over|left|right|and|is|are|that|which|"
    r"written|marked|labelled|labeled|covered)\b.*$",
    re.I,
)
_NOT_OBJECTS = {"image", "picture", "photo", "photograph", "background", "scene", "object", "objects", "view"}


def object_phrases(units: Sequence[str], limit: int = 12) -> list[str]:
    """Noun phrases naming objects in a caption's units: text after a leading article or number, cut before the
    first preposition or verb, at most 4 words, without phrases about the image itself; unique, in order.

    >>> object_phrases(["A 672x672 image with a plain beige background", "It shows 2 objects",
    ...                 "a large red circle in the top left", "The red circle is above the blue square"])
    ['large red circle', 'red circle']
    """
    found: list[str] = []
    for unit in units:
        text = unit.strip().strip("\"'")
        if not _ARTICLE.match(text):
            continue
        phrase = _STOP.sub("", _ARTICLE.sub("", text, count=1)).strip(" ,;:")
        words = phrase.split()
        if not words or len(words) > 4 or words[-1].lower() in _NOT_OBJECTS or any(c.isdigit() for c in phrase):
            continue
        if phrase.lower() not in (f.lower() for f in found):
            found.append(phrase)
        if len(found) >= limit:
            break
    return found


def claim(sentence: str) -> str:
    """What a crop is asked about for one sentence: the object the sentence names, with its article and without
    where it lies or what is written on it ("a medium yellow star in the bottom right" → "a medium yellow star");
    a sentence naming no object is asked as it is (first letter lowered).

    Why: a VLM is asked about objects ("Is there a red star in the image?"), and a sentence's position words are
    relative to the crop they were written on. Measured on the demo model (patch sentences of 12 world:caption
    scenes drawn with seed 7, 652 scored, 55 of them true; AUC of the yes-likelihood for true against hallucinated
    sentences; the probe is `bench/claim_auc.py` at commit ac28ed7): the whole sentence 0.40 (worse than chance),
    its object 0.70.

    >>> claim("A medium yellow star in the bottom right, with \"C\" written on it")
    'a medium yellow star'
    >>> claim("It shows 3 objects")
    'it shows 3 objects'
    """
    phrases = object_phrases([sentence], limit=1)
    if not phrases:
        return sentence[:1].lower() + sentence[1:]
    phrase = phrases[0]
    return f"{'an' if phrase[0].lower() in 'aeiou' else 'a'} {phrase}"


# ---- group the samples of one patch -------------------------------------------------------------------------
@dataclass
class Grouping:
    """One patch's sentences after grouping its samples (every list holds sentence texts)."""

    similar: list[str] = field(default_factory=list)  # agreed by ≥ 2 samples: kept, one representative each
    contradictory: list[list[str]] = field(default_factory=list)  # same topic, different detail: best one kept
    unique: list[str] = field(default_factory=list)  # in one sample only: kept if the image agrees
    decisions: list[dict] = field(default_factory=list)  # for the trace

    def doubtful(self) -> list[str]:
        """Sentences that need an image-text score: every contradictory alternative and every unique one."""
        return [s for group in self.contradictory for s in group] + list(self.unique)


def group_samples(
    samples: Sequence[Sequence[str]], embed: Embed, *, similar: float = 0.9, contradict: float = 0.75
) -> Grouping:
    """Group the sentences of several samples (each a list of sentences) of one patch.

    Sentences are clustered greedily in sample order: a sentence joins the first cluster whose first sentence
    (its representative) it matches at cosine ≥ ``similar`` and which holds no sentence of its own sample yet;
    otherwise it starts a cluster. A cluster with sentences of ≥ 2 samples is *similar* (kept once, by its
    representative). The remaining single-sample sentences are clustered the same way at cosine ≥ ``contradict``
    (same topic, a different detail: "a small red circle" / "a small blue circle"); a cluster with ≥ 2 samples is
    *contradictory* (its best-scoring sentence is kept later), a lone sentence is *unique*. Cosines are of the
    MiniLM embeddings ``embed`` gives. Representatives (not every pair) decide, so chains of near matches
    ("red circle" ~ "red square" ~ "blue square") never pull different things into one group.
    """
    items = [(s, sentence) for s, sample in enumerate(samples) for sentence in sample]
    grouping = Grouping()
    if not items:
        return grouping
    vectors = embed([sentence for _, sentence in items])
    cosine = vectors @ vectors.T
    first = _clusters(list(range(len(items))), items, cosine, similar)
    single = [c[0] for c in first if len({items[i][0] for i in c}) < 2]
    for cluster in first:
        if len({items[i][0] for i in cluster}) >= 2:
            texts = [items[i][1] for i in cluster]
            grouping.similar.append(texts[0])
            grouping.decisions.append(
                {"kind": "similar", "sentences": texts, "samples": [items[i][0] for i in cluster]}
            )
    for cluster in _clusters(single, items, cosine, contradict):
        texts = [items[i][1] for i in cluster]
        if len({items[i][0] for i in cluster}) >= 2:
            grouping.contradictory.append(_unique_texts(texts))
            kind = "contradictory"
        else:
            grouping.unique.append(texts[0])
            kind = "unique"
        grouping.decisions.append({"kind": kind, "sentences": texts, "samples": [items[i][0] for i in cluster]})
    return grouping


def _clusters(
    members: list[int], items: list[tuple[int, str]], cosine: np.ndarray, threshold: float
) -> list[list[int]]:
    """Greedy clusters of ``members``: each joins the first cluster whose representative it matches at
    ``threshold`` and that has no member from the same sample; else it starts one."""
    clusters: list[list[int]] = []
    for index in members:
        for cluster in clusters:
            sample_free = all(items[j][0] != items[index][0] for j in cluster)
            if sample_free and cosine[cluster[0], index] >= threshold:
                cluster.append(index)
                break
        else:
            clusters.append([index])
    return clusters


def _components(members: list[int], links: np.ndarray) -> list[list[int]]:
    """Connected components of ``members`` under the boolean adjacency ``links`` (in index order)."""
    left, components = set(members), []
    for start in members:
        if start not in left:
            continue
        left.discard(start)
        stack, component = [start], [start]
        while stack:
            node = stack.pop()
            for other in sorted(j for j in left if links[node, j]):
                left.discard(other)
                stack.append(other)
                component.append(other)
        components.append(sorted(component))
    return components


def _unique_texts(texts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def select_sentences(grouping: Grouping, scores: dict[str, float], keep: float = 0.3) -> list[str]:
    """The patch's kept sentences: every similar one; the best-scoring alternative of each contradictory group
    (if it scores above ``keep``); each unique one scoring above ``keep``."""
    kept = list(grouping.similar)
    for group in grouping.contradictory:
        best = max(group, key=lambda s: scores.get(s, 0.0))
        if scores.get(best, 0.0) > keep:
            kept.append(best)
    kept += [s for s in grouping.unique if scores.get(s, 0.0) > keep]
    return kept


# ---- deterministic merges -----------------------------------------------------------------------------------
def new_sentences(
    candidates: Sequence[str], known: Sequence[str], embed: Embed, duplicate: float = 0.9
) -> list[tuple[str, float]]:
    """``candidates`` that duplicate nothing in ``known`` nor an earlier kept candidate (cosine < ``duplicate``),
    each with its best cosine to what was known, in order."""
    if not candidates:
        return []
    vectors = embed(list(candidates))
    known_vectors = embed(list(known)) if known else np.zeros((0, vectors.shape[1]), dtype=np.float32)
    kept: list[tuple[str, float]] = []
    kept_vectors: list[np.ndarray] = []
    for text, vector in zip(candidates, vectors, strict=True):
        pool = np.vstack([known_vectors, *kept_vectors]) if kept_vectors else known_vectors
        best = float((pool @ vector).max()) if len(pool) else 0.0
        if best < duplicate:
            kept.append((text, best))
            kept_vectors.append(vector[None, :])
    return kept


def merge_overlapping(patches: Sequence[tuple[Box, list[str]]], threshold: float = 0.4) -> list[list[int]]:
    """Groups of patch indices to merge: patches are linked when their boxes' IoU exceeds ``threshold``
    (connected groups, in index order).

    >>> merge_overlapping([(Box(0, 0, 10, 10), []), (Box(1, 0, 11, 10), []), (Box(50, 50, 60, 60), [])])
    [[0, 1], [2]]
    """
    count = len(patches)
    boxes = [box for box, _ in patches]
    links = np.array([[i != j and boxes[i].iou(boxes[j]) > threshold for j in range(count)] for i in range(count)])
    return _components(list(range(count)), links) if count else []


def join_sentences(sentences: Sequence[str]) -> str:
    """Sentences as one text: the first capitalised, joined by "; ", ended by a full stop."""
    parts = [s.strip().rstrip(".;") for s in sentences if s.strip()]
    if not parts:
        return ""
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."
