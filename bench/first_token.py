"""First-token accuracy of a model on held-out world questions, per question kind — a 40-second probe of what
a training stage taught, before the full `foveate eval`.

    python bench/first_token.py foveate/assets/models/demo.work/stage1 --presets single,simple

Teacher-forced: each question of the preset's `qa` stream (seed 777, never a training seed) is rendered with
the model's chat template and the answer's first token is compared with the model's most likely next token
(``first``); ``answer`` asks the same of every answer token and the closing <|im_end|>, i.e. greedy decoding
would write exactly the answer. The two differ where the tokenizer splits an answer word: tokenizers of tiny
models built before `policies.tiny.corpus_lines` learned bare words split "star" and "square" (and "blue",
"brown", "black") into pieces with the same first token, so their ``first`` overstates what the model knows.
Kinds: color / shape (attribute), exist, count, other.
"""

from __future__ import annotations

import argparse
import collections
import itertools
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from foveate.rl.answer_probe import answer_format, question_text, teacher_forced
from foveate.rl.sft import ChatCollator
from foveate.rl.sft_data import DataMix, example_stream

KINDS = (("What color", "color"), ("What shape", "shape"), ("Is there", "exist"), ("How many", "count"))


def kind_of(question: str) -> str:
    return next((kind for prefix, kind in KINDS if question.startswith(prefix)), "other")


def first_token_accuracy(
    model, collator: ChatCollator, preset: str, n: int, seed: int, answer_fields: dict[str, Any] | None = None
) -> dict[str, list[tuple[bool, bool]]]:
    """Per question kind: (first answer token right, every answer token right) for each question (after the
    teacher-forced thought of a look-first model; ``answer_fields``: `answer_probe.answer_format` of the model)."""
    mix = DataMix(formats={"qa": 1.0}, presets={preset: 1.0}, **(answer_fields or {}))
    examples = list(itertools.islice(example_stream(seed, mix), n))
    hits: dict[str, list[tuple[bool, bool]]] = collections.defaultdict(list)
    for example, predicted, truth in teacher_forced(model, collator, examples, chunk_size=25):
        correct = predicted == truth
        hits[kind_of(question_text(example))].append((bool(correct[0]), bool(correct.all())))
    return hits


def main() -> None:
    from transformers import AutoModelForImageTextToText

    from foveate.policies.loading import load_processor

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model directory")
    parser.add_argument("--presets", default="single,simple", help="comma-separated world presets")
    parser.add_argument("--n", type=int, default=300, help="questions per preset")
    parser.add_argument("--seed", type=int, default=777, help="world stream seed (training streams use 0-2)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    collator = ChatCollator(load_processor(args.model), max_length=512)
    table = Table(title=f"first-token accuracy of {args.model}")
    for column in ("preset", "kind", "first", "answer", "n"):
        table.add_column(column, justify="right")
    for preset in args.presets.split(","):
        for kind, hits in sorted(
            first_token_accuracy(model, collator, preset, args.n, args.seed, answer_format(args.model)).items()
        ):
            first, whole = (sum(hit[i] for hit in hits) / len(hits) for i in (0, 1))
            table.add_row(preset, kind, f"{first:.2f}", f"{whole:.2f}", str(len(hits)))
    Console().print(table)


if __name__ == "__main__":
    main()
