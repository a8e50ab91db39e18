"""Does a look-first model name the right referent, and does its answer follow? Greedy generation, not teacher forcing.

    python bench/look_first.py DIR [--preset simple] [--n 200]

`bench/binding.py` teacher-forces the thought (``<think>the red star blue</think>blue``), so it measures the lookup
given the right referent. At inference the model writes the referent itself, copying it from the question; this
bench generates each held-out `qa` answer (world seed 777, never a training seed) through the policy that strategies
use and reports, per question family: how often the thought names exactly the question's referents
(`world.questions.referents`; for a model trained with ``existence_thought: percept``, an existence thought must
name what the colour's lookup finds, `rl.sft_data.existence_percept`), how often its first word is right (meaningful
for a percept existence thought only: the question's colour copied; a referent starts with "the" or "a"), how often
there is no complete thought (none, or no closing tag: then no answer either), how often the final answer repeats
the thought's answer, and the final answer's accuracy (`foveate.eval.metrics.score_answer`, as `foveate eval` scores
world rows: yes/no parsed, synonyms accepted).
"""

from __future__ import annotations

import argparse
import collections
import itertools

import torch
from rich.console import Console
from rich.table import Table

from foveate import protocol
from foveate.eval.metrics import score_answer
from foveate.policies.base import SamplingParams
from foveate.rl.answer_probe import answer_format
from foveate.rl.sft_data import existence_percept, key_phrase
from foveate.world import iter_scenes, render_scene
from foveate.world.questions import referents


def parse_reply(text: str) -> tuple[str | None, str | None, str]:
    """(referent text, answer inside the thought, final answer) of a look-first reply; None parts when absent."""
    final = protocol.strip_thought(text)
    stripped = text.strip()
    if not stripped.startswith(protocol.THOUGHT_OPEN) or protocol.THOUGHT_CLOSE not in stripped:
        return None, None, final
    thought = stripped[len(protocol.THOUGHT_OPEN) : stripped.index(protocol.THOUGHT_CLOSE)]
    named, _, inner = thought.rpartition(" ")
    return named, inner, final


def generated_rows(policy, preset: str, n: int, seed: int, batch_size: int = 16):
    """(scene, row, image size, reply text) for the first n non-grounding questions of the preset's held-out
    stream."""
    rows = (
        (scene, render_scene(scene), row)
        for scene, scene_rows in iter_scenes(seed, preset)
        for row in scene_rows
        if row["family"] != "grounding"
    )
    items = list(itertools.islice(rows, n))
    params = SamplingParams(max_new_tokens=48)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        chats = [
            [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": row["question"]}]}]
            for _, img, row in chunk
        ]
        for (scene, image, row), result in zip(chunk, policy.chat(chats, params), strict=True):
            yield scene, row, image.size, result.text


def expected_thought(scene, row, existence_thought: str, trim_object: bool = False) -> str:
    """What the thought should name: the question's referents (ending on their key word for a model trained
    with ``look_trim_object``, `rl.sft_data.key_phrase`), or for a percept-trained model's existence question
    what the colour's lookup finds (`rl.sft_data.existence_percept`)."""
    percept = existence_percept(row, scene) if existence_thought == "percept" else None
    phrases = referents(row["question"])
    return percept or "; ".join(key_phrase(phrase) if trim_object else phrase for phrase in phrases)


def main() -> None:
    from foveate.policies.transformers_vlm import TransformersVLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model directory")
    parser.add_argument("--preset", default="simple")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=777)
    args = parser.parse_args()
    torch.set_num_threads(2)
    policy = TransformersVLM(args.model)
    tally: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    fields = answer_format(args.model)
    for scene, row, image_size, text in generated_rows(policy, args.preset, args.n, args.seed):
        named, inner, final = parse_reply(text)
        counts = tally[row["family"]]
        counts["n"] += 1
        counts["no thought"] += named is None
        expected = expected_thought(scene, row, fields["existence_thought"], fields["look_trim_object"])
        counts["named right"] += named == expected
        # The thought's first word: for a percept existence thought, the question's colour copied.
        counts["first word right"] += named is not None and named.split()[:1] == expected.split()[:1]
        counts["final = thought"] += inner is not None and inner == final
        # "preset" marks a world row: its several answers are synonyms (exact match), not VQA annotators.
        counts["right"] += score_answer(final, {**row, "preset": args.preset}, image_size)["score"]
    table = Table(title=f"look-first replies of {args.model} ({args.preset}, greedy)")
    keys = ("no thought", "first word right", "named right", "final = thought", "right")
    for column in ("family", "n", *keys[:-1], "accuracy"):
        table.add_column(column, justify="right")
    for family, counts in sorted(tally.items()):
        shares = [counts[key] / counts["n"] for key in keys]
        table.add_row(family, str(counts["n"]), *(f"{share:.2f}" for share in shares))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
