"""Visual programs written from the world's question templates: what a programmer should write for each family.

The world knows each question's structure (`foveate.world.questions.referents`), so a program that answers it with
the ViperGPT API can be written without a language model — and without the answer: the program only says which
tools to call on which referents. Uses: a reference programmer for measuring the program stage with a given
eyesight (``bench/vpd_world.py``), and the target format for teaching a small model to write programs (RESEARCH.md
§6, issue 35 part 5).

    >>> print(world_program("Is there a blue triangle in the image?"))
    def execute_command(image_patch):
        return bool_to_yesno(image_patch.exists('blue triangle'))
    <BLANKLINE>
"""

from __future__ import annotations

import re

from foveate.world.questions import referents

_RELATION = re.compile(r"Is the .+? (to the left of|to the right of|above|below) the .+\?")
_COMPARE = {
    "to the left of": "a.horizontal_center < b.horizontal_center",
    "to the right of": "a.horizontal_center > b.horizontal_center",
    "above": "a.vertical_center < b.vertical_center",
    "below": "a.vertical_center > b.vertical_center",
}


def _name(phrase: str) -> str:
    """``the medium-sized square`` → ``medium-sized square`` (what ``find`` is asked for)."""
    return re.sub(r"^(the|a|an) ", "", phrase.strip())


def _body(question: str, found: list[str]) -> list[str] | None:
    q = repr(question)
    if question.startswith(("What color is", "What shape is")):
        name = repr(_name(found[0]))
        return [
            f"patches = image_patch.find({name})",
            "patch = patches[0] if patches else image_patch",
            f"return patch.simple_query({q})",
        ]
    if question.startswith("Is there"):
        return [f"return bool_to_yesno(image_patch.exists({_name(found[0])!r}))"]
    if question.startswith("How many"):
        return [f"return str(image_patch.count({_name(found[0])!r}))"]
    if question.startswith("What is written"):
        name = repr(_name(found[0]))
        return [
            f"patches = image_patch.find({name})",
            "if not patches:",
            "    return image_patch.ocr()",
            "p = patches[0]",
            "return image_patch.crop(p.left - p.width, p.upper - p.height, p.right + 2 * p.width, "
            "p.lower + p.height).ocr()",
        ]
    relation = _RELATION.fullmatch(question)
    if relation and len(found) == 2:
        a, b = (repr(_name(phrase)) for phrase in found)
        return [
            f"found_a, found_b = image_patch.find({a}), image_patch.find({b})",
            "if not found_a or not found_b:",
            f"    return image_patch.simple_query({q})",
            "a, b = found_a[0], found_b[0]",
            f"return bool_to_yesno({_COMPARE[relation.group(1)]})",
        ]
    if question.startswith("Which is larger") and len(found) == 2:
        a, b = (repr(_name(phrase)) for phrase in found)
        return [
            f"found_a, found_b = image_patch.find({a}), image_patch.find({b})",
            "if not found_a or not found_b:",
            f"    return image_patch.simple_query({q})",
            "area_a = found_a[0].width * found_a[0].height",
            "area_b = found_b[0].width * found_b[0].height",
            f"return {found[0]!r} if area_a > area_b else {found[1]!r}",
        ]
    same = re.fullmatch(r"Is the .+? the same (color|shape) as the .+\?", question)
    if same and len(found) == 2:
        attribute = same.group(1)
        a, b = (repr(_name(phrase)) for phrase in found)
        return [
            f"found_a, found_b = image_patch.find({a}), image_patch.find({b})",
            "if not found_a or not found_b:",
            f"    return image_patch.simple_query({q})",
            f"first = found_a[0].simple_query('What {attribute} is the {{}}?'.replace('{{}}', {a}))",
            f"second = found_b[0].simple_query('What {attribute} is the {{}}?'.replace('{{}}', {b}))",
            "return bool_to_yesno(first == second)",
        ]
    return None


def world_program(question: str) -> str | None:
    """The program for a world question (None for text that is not one of the world's templates)."""
    found = referents(question)
    body = _body(question.strip(), found) if found else None
    if body is None:
        return None
    return "def execute_command(image_patch):\n" + "".join(f"    {line}\n" for line in body)
