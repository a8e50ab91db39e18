"""Does a model bind the question to its object, or read some object? Its attribute answers, sorted by whose they are.

    python bench/binding.py DIR [DIR …] --preset simple --n 200

For each held-out attribute question (`qa` format, world seed 777, never a training seed), the model's greedy
first answer token (teacher-forced, like `bench/first_token.py`) is classed as ``right`` (the asked object's
colour or shape), ``another's`` (wrong, but the colour or shape of another object in the scene) or ``absent``
(an attribute no object in the scene has). Rows are split by the number of objects in the scene. A model that
reads the right kind of attribute from a random object scores ``right`` about 1/k of the time on k-object scenes
and puts nearly every miss in ``another's``; a model that binds stays right as k grows. ``right of named``
(right / (right + another's)) separates binding from reading: it is about 1/k for a model that reads a random
object, whatever its share of ``absent`` answers.
"""

from __future__ import annotations

import collections
import itertools
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from foveate.rl.answer_probe import answer_format, probe_parser, question_text, teacher_forced
from foveate.rl.sft import ChatCollator
from foveate.rl.sft_data import DataMix, example_stream
from foveate.world.describe import SIZE_WORDS


def answer_owners(
    model,
    collator: ChatCollator,
    preset: str,
    n: int,
    seed: int,
    by_reference: bool = False,
    answer_fields: dict[str, Any] | None = None,
) -> collections.Counter:
    """Counter of (kind, objects in the scene, "right" | "another's" | "absent") over n attribute questions.
    ``by_reference``: kinds also say what names the object beyond the default (a colour question names it by its
    shape, "the square"; a shape question by its colour, "the red object"): "color +size" is "the small square".
    ``answer_fields`` (`answer_probe.answer_format` of the model): a look-first model's thought is teacher-forced
    before the answer, in the form it was trained on."""
    mix = DataMix(formats={"qa": 1.0}, presets={preset: 1.0}, questions=("attribute",), **(answer_fields or {}))
    examples = list(itertools.islice(example_stream(seed, mix), n))
    tokenizer = collator.processor.tokenizer
    tally: collections.Counter = collections.Counter()
    for example, predicted, truth in teacher_forced(model, collator, examples):
        said, meant = (tokenizer.decode([int(ids[0])]).strip() for ids in (predicted, truth))
        question = question_text(example)
        kind = "color" if question.startswith("What color") else "shape"
        if by_reference:  # what names the object beyond the default (colour: its shape; shape: its colour)
            words = set(question.rstrip("?").split())
            kind += " +size" if words & set(SIZE_WORDS.values()) else ""
            kind += " +label" if "marked" in words else ""
        values = {getattr(obj, kind.split()[0]) for obj in example["scene"].objects}
        owner = "right" if said == meant else "another's" if said in values else "absent"
        tally[(kind, len(example["scene"].objects), owner)] += 1
    return tally


def main() -> None:
    from transformers import AutoModelForImageTextToText

    from foveate.policies.loading import load_processor

    parser = probe_parser(__doc__.split("\n\n")[0], 200, "attribute questions")
    parser.add_argument("--by-reference", action="store_true", help="split by what the question names its object by")
    args = parser.parse_args()
    torch.set_num_threads(2)
    table = Table(title=f"whose attribute the answer names ({args.preset}, first answer token)")
    table.add_column("model", no_wrap=True)
    # "right of named": right / (right + another's), which object is read when some object's attribute is named.
    for column in ("kind", "objects", "n", "right", "another's", "absent", "right of named", "1/objects"):
        table.add_column(column, justify="right")
    for directory in args.models:
        model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).eval()
        name = "/".join(Path(directory).parts[-2:])
        collator = ChatCollator(load_processor(directory), 512)
        fields = answer_format(directory)
        tally = answer_owners(model, collator, args.preset, args.n, args.seed, args.by_reference, fields)
        for kind, objects in sorted({(kind, objects) for kind, objects, _ in tally}):
            counts = [tally[(kind, objects, owner)] for owner in ("right", "another's", "absent")]
            shares = [f"{count / sum(counts):.2f}" for count in counts]
            bound = f"{counts[0] / (counts[0] + counts[1]):.2f}" if counts[0] + counts[1] else "-"
            table.add_row(name, kind, str(objects), str(sum(counts)), *shares, bound, f"{1 / objects:.2f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
