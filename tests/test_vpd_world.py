"""World-derived visual programs (rl/vpd_world.py): every world question gets a program that passes the sandbox's
static check, and with exact grounding the programs answer the families that need no VLM reading correctly.

`WorldFinder` reads the scene's exact objects: the test is about the programs' logic and the program machinery
(find, geometry, counting, OCR), not about grounding quality.
"""

from __future__ import annotations

from collections import Counter

import pytest

from foveate.eval.metrics import score_answer
from foveate.rl.vpd_world import world_program
from foveate.tools.boxes import Box
from foveate.tools.grounding import Grounding
from foveate.tools.program import run_program
from foveate.tools.sandbox import check_program
from foveate.world import COLORS, SHAPES, iter_items
from foveate.world.describe import SIZE_WORDS

SIZES = {word: size for size, word in SIZE_WORDS.items()}


class WorldFinder:
    """A scene's objects matching a phrase of size, colour and shape words ("medium-sized red crosses")."""

    def __init__(self, scene) -> None:
        self.scene = scene

    def ground(self, image, phrases):
        assert image.size == (self.scene.width, self.scene.height)  # find on the whole image only, here
        out = []
        for phrase in phrases:
            wanted = {}
            for word in phrase.split():
                plural = word[:-2] if word.endswith("ses") else word.removesuffix("s")  # crosses, squares
                singular = word if word in SHAPES else plural
                if word in SIZES:
                    wanted["size"] = SIZES[word]
                elif word in COLORS:
                    wanted["color"] = word
                elif singular in SHAPES:
                    wanted["shape"] = singular
            found = [o for o in self.scene.objects if all(o.attrs()[k] == v for k, v in wanted.items())]
            out.append([Grounding(Box(*o.box), 1.0, phrase) for o in found])
        return out


def test_every_world_question_gets_a_program_the_sandbox_accepts() -> None:
    families = Counter()
    for _, _, row in iter_items(120, seed=5, preset="large"):
        program = world_program(row["question"])
        assert program is not None, row["question"]
        check_program(program)
        families[row["family"]] += 1
    assert set(families) >= {"attribute", "existence", "counting", "relation", "comparison", "text"}
    assert world_program("Describe the image.") is None


@pytest.fixture(scope="module")
def world_items() -> list:
    return list(iter_items(240, seed=5, preset="large"))


@pytest.mark.parametrize("family", ["existence", "counting", "relation", "comparison"])
def test_with_exact_grounding_world_programs_answer_right(family: str, world_items: list) -> None:
    rows = [(image, scene, row) for image, scene, row in world_items if row["family"] == family]
    # Labelled referents and "the same colour/shape" need reading, not finding: left to the VLM.
    rows = [item for item in rows if "marked" not in item[2]["question"] and "same" not in item[2]["question"]][:6]
    assert rows
    for image, scene, row in rows:
        result = run_program(world_program(row["question"]), image, grounder=WorldFinder(scene))
        assert result.ok, (row["question"], result.error)
        assert score_answer(result.answer, row, image.size)["score"] == 1.0, (row["question"], result.answer)
