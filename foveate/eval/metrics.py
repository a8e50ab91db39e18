"""Answer metrics: normalised exact match, VQA soft accuracy, POPE yes/no metrics and box grounding accuracy.

Every function is pure and unit-tested on hand-worked cases (tests/test_metrics.py).

- `normalize_answer` follows the VQA evaluation's spirit: lower-case, drop punctuation (keeping decimal points
  and thousands separators inside numbers), number words → digits, articles dropped. It does not expand
  contractions or map synonyms ("colour" stays "colour"); task files list accepted synonyms as answers instead.
- `vqa_soft_accuracy` is ``min(#matching references / 3, 1)``: full credit when at least three of the (usually
  ten) annotators gave the answer. The official VQA script additionally averages that over the ten
  leave-one-annotator-out subsets; ``leave_one_out=True`` reproduces it.
- `vqa_normalize` / `vqa_official_accuracy` are the VQA challenge's own answer processing (punctuation, digits,
  articles, contractions) and accuracy (min(#matching annotators / 3, 1) averaged over the leave-one-out
  subsets): TextVQA rows use them (``scoring: vqa_official``).
- `pope_metrics` parses free-text answers into yes/no (`parse_yes_no`); an answer that is neither counts as a
  wrong answer and never as a "yes".
- `parse_choice` / `choice_match` score multiple choice (V* Bench, the world's `zoom` preset): the option's
  letter ("B", "(B)", "B) star", "Answer: B") or the option's text ("star") both count; naming two options
  counts as no answer.
- `parse_box_answer` finds the first box in a model's answer and converts it from the model's convention into
  original pixels; anything malformed is ``None`` (a miss for `grounding_accuracy`).

Dense captions (family ``caption``, the ``world:caption`` preset) are scored by `foveate.eval.captions` against the
row's ``objects``; their ``score`` is the object F1.

`score_answer` decides per task row which of these applies; the evaluator calls only that.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from foveate.errors import BoxError
from foveate.tools.boxes import Box, from_resized, parse_box

__all__ = [
    "box_iou",
    "choice_match",
    "exact_match",
    "grounding_accuracy",
    "normalize_answer",
    "parse_box_answer",
    "parse_choice",
    "parse_yes_no",
    "pope_metrics",
    "score_answer",
    "scoring_mode",
    "vqa_normalize",
    "vqa_official_accuracy",
    "vqa_soft_accuracy",
]

_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
}
_ARTICLES = {"a", "an", "the"}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")  # 1,000 → 1000
_PUNCTUATION = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]|_")  # every punctuation mark except a decimal point


def normalize_answer(text: str) -> str:
    """Canonical form of an answer for matching.

    >>> normalize_answer("The Red Star.")
    'red star'
    >>> normalize_answer("Three")
    '3'
    >>> normalize_answer("  1,000 apples!  ")
    '1000 apples'
    >>> normalize_answer("A")  # a lone article is an answer (a label), not noise
    'a'
    """
    text = str(text).lower().replace("\u2019", "'")
    text = _THOUSANDS.sub("", text)
    text = text.replace("'", "")  # don't → dont, so contractions stay one token
    text = _PUNCTUATION.sub(" ", text)
    tokens = [_NUMBER_WORDS.get(token, token) for token in text.split()]
    # Drop articles, but never the last token: a label "A" (or an answer "the A") must not vanish.
    tokens = [t for i, t in enumerate(tokens) if t not in _ARTICLES or i == len(tokens) - 1]
    return " ".join(tokens)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference answer, else 0.0.

    >>> exact_match("Purple.", ["purple", "violet"]), exact_match("a violet", ["purple", "violet"])
    (1.0, 1.0)
    >>> exact_match("", ["a"])
    0.0
    """
    predicted = normalize_answer(prediction)
    return 1.0 if any(predicted == normalize_answer(answer) for answer in answers) else 0.0


def vqa_soft_accuracy(prediction: str, answers: Sequence[str], *, leave_one_out: bool = False) -> float:
    """``min(#references matching the prediction / 3, 1)`` over normalised answers.

    With ``leave_one_out`` (the official VQA script), the same quantity is averaged over the ``len(answers)``
    subsets that leave one reference out.

    >>> vqa_soft_accuracy("two", ["2", "2", "3"] + ["4"] * 7)
    0.6666666666666666
    """
    if not answers:
        return 0.0
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(answer) == predicted for answer in answers]
    if not leave_one_out:
        return min(sum(matches) / 3, 1.0)
    total = sum(matches)
    return sum(min((total - int(m)) / 3, 1.0) for m in matches) / len(matches)


# The VQA evaluation's answer processing (VQA/PythonEvaluationTools vqaEval.py, as every VQA/TextVQA harness
# ports it): these punctuation marks are deleted when they touch a space (or the answer has a 1,000-style number)
# and replaced by a space otherwise; a period not followed by a digit is deleted; number words zero-ten become digits;
# articles are dropped; apostrophe-less contractions get their apostrophe back. The contraction table here is the
# common subset of the official one (which also lists rare forms such as "couldnt've"); answers that differ only in
# those rare forms are scored differently from the official script.
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_VQA_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=" is a typo for a lookbehind, so in effect every period
# not followed by a digit goes ("3." -> "3"); kept as it behaves, so scores match the official script.
_VQA_PERIOD = re.compile(r"(?!<=\d)\.(?!\d)")
_VQA_DIGITS = {word: _NUMBER_WORDS[word] for word in list(_NUMBER_WORDS)[:11]}  # zero .. ten
_VQA_DIGITS["none"] = "0"
# Contractions written without their apostrophe; forms that are also words (its, well, were, ill, id, hell,
# shell, wed, lets) are left out so a real word is never rewritten.
_VQA_CONTRACTIONS = {
    word.replace("'", ""): word
    for word in (
        "ain't",
        "aren't",
        "can't",
        "could've",
        "couldn't",
        "didn't",
        "doesn't",
        "don't",
        "hadn't",
        "hasn't",
        "haven't",
        "he'd",
        "he's",
        "how'd",
        "how'll",
        "how's",
        "i'm",
        "i've",
        "isn't",
        "it'd",
        "it'll",
        "ma'am",
        "mightn't",
        "might've",
        "mustn't",
        "must've",
        "needn't",
        "o'clock",
        "shan't",
        "she'd",
        "she's",
        "should've",
        "shouldn't",
        "that's",
        "there's",
        "they'd",
        "they'll",
        "they're",
        "they've",
        "wasn't",
        "we've",
        "weren't",
        "what'll",
        "what're",
        "what's",
        "what've",
        "when's",
        "where'd",
        "where's",
        "who'd",
        "who'll",
        "who's",
        "who've",
        "why's",
        "won't",
        "would've",
        "wouldn't",
        "y'all",
        "you'd",
        "you'll",
        "you're",
        "you've",
    )
}


def vqa_normalize(text: str) -> str:
    """The VQA evaluation's processing of an answer (see the table above).

    >>> vqa_normalize("The Coca-Cola!"), vqa_normalize("two dogs."), vqa_normalize("dont"), vqa_normalize("1,000")
    ('coca cola', '2 dogs', "don't", '1000')
    """
    text = str(text).replace("\n", " ").replace("\t", " ").strip().lower()
    out = text
    for mark in _VQA_PUNCT:
        if (mark + " " in text or " " + mark in text) or _VQA_COMMA_NUMBER.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _VQA_PERIOD.sub("", out)
    words = [_VQA_DIGITS.get(w, w) for w in out.split()]
    words = [_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_official_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA metric as the official script computes it: for each annotator left out, ``min(#other annotators
    who gave the (normalised) prediction / 3, 1)``, averaged.

    >>> round(vqa_official_accuracy("Two", ["2", "2", "two"] + ["3"] * 7), 4)  # 3 matches: 7 x 1 + 3 x 2/3
    0.9
    >>> vqa_official_accuracy("nike", ["nike"] * 10)
    1.0
    """
    if not answers:
        return 0.0
    predicted = vqa_normalize(prediction)
    matches = [vqa_normalize(answer) == predicted for answer in answers]
    total = sum(matches)
    return sum(min((total - int(m)) / 3, 1.0) for m in matches) / len(matches)


_YES_WORDS = {"yes", "yeah", "yep", "yup", "true", "correct"}
_NO_WORDS = {"no", "nope", "not", "false", "none", "nothing", "neither", "never", "incorrect"}


def parse_yes_no(text: str) -> str | None:
    """``"yes"``, ``"no"`` or ``None`` from a free-text answer.

    The first word decides when it is a yes/no word ("Yes, there is a star" → yes; "No." → no); otherwise the
    answer is "no" if it contains a negation ("There is no star", "isn't") and no yes word, "yes" if it contains
    a yes word and no negation, and ``None`` (unparseable) otherwise — including "There is a star", which this
    parser does not guess at.

    >>> parse_yes_no("Yes, there is a red star."), parse_yes_no("There isn't one"), parse_yes_no("red")
    ('yes', 'no', None)
    """
    words = re.findall(r"[a-z]+(?:'t)?", str(text).lower().replace("\u2019", "'"))
    if not words:
        return None
    if words[0] in _YES_WORDS:
        return "yes"
    if words[0] in _NO_WORDS:
        return "no"
    has_no = any(word in _NO_WORDS or word.endswith("n't") for word in words)
    has_yes = any(word in _YES_WORDS for word in words)
    if has_no and not has_yes:
        return "no"
    if has_yes and not has_no:
        return "yes"
    return None


def pope_metrics(predictions: Sequence[str], golds: Sequence[str]) -> dict[str, Any]:
    """POPE's metrics with "yes" as the positive class.

    Returns counts (``tp fp tn fn unparsed n``) and ``accuracy`` (correct / n), ``precision`` (tp / predicted
    yes), ``recall`` (tp / gold yes), ``f1`` and ``yes_ratio`` (predicted yes / n). An unparseable prediction
    is wrong: it is never a "yes", so it is a false negative on a "yes" question and not a true negative on a
    "no" question. Ratios with a zero denominator are 0.0.
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answers")
    tp = fp = tn = fn = unparsed = 0
    for prediction, gold in zip(predictions, golds, strict=True):
        truth = parse_yes_no(gold)
        if truth is None:
            raise ValueError(f"gold answer {gold!r} is not yes/no")
        guess = parse_yes_no(prediction)
        if guess is None:
            unparsed += 1
            fn += truth == "yes"
        elif guess == "yes":
            tp += truth == "yes"
            fp += truth == "no"
        else:
            tn += truth == "no"
            fn += truth == "yes"
    n = len(golds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "unparsed": unparsed,
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
    }


_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# "B", "(B)", "B)", "B.", "B:", "option B", "answer: (B)", "the answer is B" at the start of the answer.
_LEADING_LETTER = re.compile(
    r"^\s*(?:(?:the\s+)?(?:correct\s+)?(?:answer|option)\s*(?:is)?\s*:?\s*)?"  # an optional "the answer is"
    r"\(?([a-z])\)?(?=$|[\s.:,)])"  # the letter, alone or with its bracket / punctuation
)


def parse_choice(text: str, options: Sequence[str]) -> int | None:
    """The option index a free-text answer picks, or ``None`` when it picks none or several.

    A leading option letter decides ("B", "(B) star", "Answer: B"); otherwise the answer must name exactly one
    option's text (normalised, as whole words; a longer option wins over one it contains).

    >>> parse_choice("(B) star", ["circle", "star"]), parse_choice("a star", ["circle", "star"])
    (1, 1)
    >>> parse_choice("circle or star", ["circle", "star"]) is None
    True
    """
    raw = str(text).strip().lower()
    letter = _LEADING_LETTER.match(raw)
    if letter and _LETTERS.index(letter.group(1)) < len(options):
        rest = raw[letter.end() :].strip(" .:,)")
        index = _LETTERS.index(letter.group(1))
        # "a star": a lone article followed by an option's words is not the letter A.
        if not (letter.group(1) == "a" and rest and not raw.startswith(("(", "a)", "a.", "a:"))):
            return index
    said = f" {normalize_answer(raw)} "
    normal = [normalize_answer(option) for option in options]
    hits = [i for i, option in enumerate(normal) if option and f" {option} " in said]
    # Drop options contained in a longer named option ("red" inside "dark red").
    hits = [i for i in hits if not any(j != i and normal[i] in normal[j] for j in hits)]
    return hits[0] if len(hits) == 1 else None


def choice_match(prediction: str, options: Sequence[str], answer: str) -> float:
    """1.0 if the prediction picks the correct option; ``answer`` is its letter ("B") or its text.

    >>> choice_match("B", ["circle", "star"], "B"), choice_match("star.", ["circle", "star"], "B")
    (1.0, 1.0)
    """
    gold = answer.strip().lower()
    if len(gold) == 1 and gold in _LETTERS:
        correct = _LETTERS.index(gold)
    else:
        correct = [normalize_answer(o) for o in options].index(normalize_answer(answer))
    return float(parse_choice(prediction, options) == correct)


_NUM = r"([-+]?\d+(?:\.\d+)?)"
_SEP = r"\s*,\s*"
_BOX_PATTERNS = (
    re.compile(r"\[\s*" + _SEP.join([_NUM] * 4) + r"\s*\]"),  # [x1, y1, x2, y2], also inside {"bbox_2d": [...]}
    re.compile(
        r"\(\s*" + _NUM + _SEP + _NUM + r"\s*\)\s*,?\s*\(\s*" + _NUM + _SEP + _NUM + r"\s*\)"
    ),  # (x1,y1),(x2,y2)
)
_CONVENTIONS = ("thousand", "normalized", "pixels", "resized")


def parse_box_answer(
    text: str,
    image_size: Sequence[float],
    convention: str = "thousand",
    resized_size: Sequence[float] | None = None,
) -> Box | None:
    """The first box in a model's answer, in original-image pixels, or ``None`` if there is none or it is bad.

    Recognised: a bare ``[x1, y1, x2, y2]`` (also the value of ``{"bbox_2d": [...]}``) and Qwen-VL's
    ``(x1,y1),(x2,y2)`` pairs, whichever comes first. ``convention`` is the model's: ``"thousand"`` (0–1000,
    Qwen2-VL), ``"normalized"`` (0–1), ``"pixels"`` (original-image pixels) or ``"resized"`` (pixels of the
    model's resized input, Qwen2.5-VL; pass that input's ``resized_size``). Inverted, empty or
    out-of-image boxes give ``None``; boxes partly outside are clamped to the image.

    >>> parse_box_answer('{"bbox_2d": [100, 200, 500, 600]}', (1000, 500)).to_list()
    [100.0, 100.0, 500.0, 300.0]
    """
    if convention not in _CONVENTIONS:
        raise ValueError(f"unknown box convention {convention!r}; expected one of {', '.join(_CONVENTIONS)}")
    if convention == "resized" and not resized_size:
        raise ValueError("box convention 'resized' needs the model's resized input size (resized_size)")
    found = [match for pattern in _BOX_PATTERNS if (match := pattern.search(str(text)))]
    if not found:
        return None
    first = min(found, key=lambda match: match.start())
    values = [float(v) for v in first.groups()]
    try:
        if convention == "resized":  # resized-input pixels -> original pixels
            values, convention = from_resized(values, image_size, resized_size).to_list(), "pixels"
        return parse_box(values, image_size, convention=convention, min_side=0)
    except BoxError:
        return None


def box_iou(prediction: Box | None, golds: Sequence[Box | Sequence[float]]) -> float:
    """The best IoU of ``prediction`` with any gold box (pixels); 0.0 for a missing prediction or no golds."""
    if prediction is None:
        return 0.0
    best = 0.0
    for gold in golds:
        gold_box = gold if isinstance(gold, Box) else Box(*gold)
        best = max(best, prediction.iou(gold_box))
    return best


def grounding_accuracy(
    pred_boxes: Sequence[Box | None],
    gold_boxes: Sequence[Box | Sequence[float] | Sequence[Sequence[float]]],
    threshold: float = 0.5,
) -> float:
    """Fraction of predictions whose IoU with their gold box is at least ``threshold`` (``None`` = a miss).

    Each gold entry is one box (a `Box` or ``[x1, y1, x2, y2]``) or a list of acceptable boxes (best IoU
    counts). An empty input gives 0.0.
    """
    if len(pred_boxes) != len(gold_boxes):
        raise ValueError(f"{len(pred_boxes)} predicted boxes for {len(gold_boxes)} gold boxes")
    if not pred_boxes:
        return 0.0
    hits = 0
    for prediction, gold in zip(pred_boxes, gold_boxes, strict=True):
        golds = [gold] if isinstance(gold, Box) or (gold and not isinstance(gold[0], (list, tuple, Box))) else gold
        hits += box_iou(prediction, golds) >= threshold
    return hits / len(pred_boxes)


# ---- per-row scoring ----------------------------------------------------------------------------------------
def scoring_mode(row: dict[str, Any]) -> str:
    """How a task row is scored: ``grounding``, ``yes_no``, ``vqa`` (soft accuracy), ``vqa_official``, ``choice``,
    ``caption`` or ``exact``.

    An explicit ``row["scoring"]`` wins (``choice``: multiple choice over ``row["options"]``, ``answers[0]``
    the correct letter). Otherwise: family ``grounding`` (or no answers but boxes) →
    IoU ≥ 0.5; references that are all yes/no → yes/no parsing; several references on a row not made by the
    world generator (``preset`` unset: VQA v2, TextVQA with their ten annotator answers) → VQA soft accuracy;
    else exact match against any reference (the world lists accepted synonyms, each worth full credit).
    """
    if row.get("scoring"):
        return str(row["scoring"])
    if row.get("family") == "caption" and row.get("objects") is not None:
        return "caption"
    answers = row.get("answers") or []
    if row.get("family") == "grounding" or (not answers and row.get("boxes")):
        return "grounding"
    if answers and all(normalize_answer(a) in ("yes", "no") for a in answers):
        return "yes_no"
    if len(answers) > 1 and not row.get("preset"):
        return "vqa"
    return "exact"


def score_answer(
    prediction: str,
    row: dict[str, Any],
    image_size: Sequence[float],
    box_convention: str = "thousand",
    resized_size: Sequence[float] | None = None,
):
    """``{"score": float in [0, 1], "mode": ..., ...}`` for one prediction on one task row.

    ``resized_size`` is the model's input size for ``box_convention="resized"`` (see `parse_box_answer`).
    Grounding adds ``iou`` and ``box`` (the parsed box in pixels, or None); yes/no adds ``parsed``.
    """
    mode = scoring_mode(row)
    answers = row.get("answers") or []
    if mode == "grounding":
        box = parse_box_answer(prediction, image_size, box_convention, resized_size)
        overlap = box_iou(box, row.get("boxes") or [])
        return {"score": float(overlap >= 0.5), "mode": mode, "iou": overlap, "box": box.to_list() if box else None}
    if mode == "yes_no":
        parsed = parse_yes_no(prediction)
        return {"score": float(parsed == parse_yes_no(answers[0])), "mode": mode, "parsed": parsed}
    if mode == "vqa":
        return {"score": vqa_soft_accuracy(prediction, answers), "mode": mode}
    if mode == "exact":
        return {"score": exact_match(prediction, answers), "mode": mode}
    if mode == "vqa_official":
        return {"score": vqa_official_accuracy(prediction, answers), "mode": mode}
    if mode == "choice":
        options = row.get("options") or []
        picked = parse_choice(prediction, options)
        return {"score": choice_match(prediction, options, answers[0]), "mode": mode, "choice": picked}
    if mode == "caption":
        from foveate.eval.captions import caption_metrics

        metrics = caption_metrics(prediction, row.get("objects") or [])
        return {"score": metrics["object_f1"], "mode": mode, **metrics}
    expected = "grounding, yes_no, vqa, vqa_official, choice, caption or exact"
    raise ValueError(f"unknown scoring mode {mode!r} (expected {expected})")
