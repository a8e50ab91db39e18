"""Does a look-first model copy the question's referent into its thought? Teacher-forced, per kind of word.

    python bench/thought_copy.py DIR [--preset large] [--n 150] [--context]

`bench/look_first.py` generates whole replies and counts referents named exactly; this bench finds WHICH words go
wrong. For each held-out attribute / relation / comparison question (world seed 777, never a training seed) the
right look-first reply (`rl.sft_data.short_answer`) is fed to the model, and at every token of the thought the
model's argmax is compared with the reply's token: the referent's words by kind (article, size, colour, shape,
other) and the answer inside the thought. Each question is run twice in the same batch of work: with its scene,
and with a plain grey image of the same size. When copying fails as often on the grey image, the fault is the text
copy, not a competing percept. ``--context`` splits each kind by the kind of the word before it ("colour after
size": the "purple" of "the medium-sized purple"; a word split into several tokens counts as "other").
"""

from __future__ import annotations

import argparse
import collections
import itertools

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from foveate.rl.answer_probe import answer_format
from foveate.rl.sft_data import DataMix, short_answer
from foveate.world import iter_scenes, render_scene
from foveate.world.scenes import COLORS, SHAPES, SIZE_CLASSES

FAMILIES = ("attribute", "relation", "comparison")
SIZE_WORDS = {*SIZE_CLASSES, "medium-sized"}


def word_kind(token_text: str) -> str:
    word = token_text.strip().strip(";")
    if word in SIZE_WORDS or word.startswith("medium"):
        return "size"
    if word in COLORS:
        return "colour"
    if word in SHAPES:
        return "shape"
    return "article" if word in ("the", "a") else "other"


def copy_hits(policy, image, question: str, reply: str) -> list[tuple[str, str, bool]]:
    """(kind, the previous token's kind, argmax right) for every token of ``reply``'s thought after ``<think>``,
    teacher-forced."""
    thought = reply[: reply.index("</think>")]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    text, images = policy.render(messages)
    lengths = [policy.encode([text + part], images)["input_ids"].shape[1] for part in ("", thought.rsplit(" ", 1)[0])]
    batch = policy.encode([text + thought], images)
    with torch.no_grad():
        logits = policy.model(**batch).logits[0]
    ids = batch["input_ids"][0]
    kinds = [word_kind(policy.tokenizer.decode([int(token)])) for token in ids]
    hits = []
    for position in range(lengths[0] + 1, ids.shape[0]):  # from the token after <think>
        kind = kinds[position] if position < lengths[1] else "ANSWER"
        hits.append((kind, kinds[position - 1], bool(logits[position - 1].argmax() == ids[position])))
    return hits


def main() -> None:
    from foveate.policies.transformers_vlm import TransformersVLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model directory (trained look-first)")
    parser.add_argument("--preset", default="large")
    parser.add_argument("--n", type=int, default=150, help="questions")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--context", action="store_true", help="split each kind by the previous word's kind")
    args = parser.parse_args()
    torch.set_num_threads(2)
    policy = TransformersVLM(args.model)
    fields = answer_format(args.model)
    mix = DataMix(look_first=True, look_trim_object=fields["look_trim_object"])
    rows = ((s, r) for s, rs in iter_scenes(args.seed, args.preset) for r in rs if r["family"] in FAMILIES)
    tally: dict[tuple[str, str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    for scene, row in itertools.islice(rows, args.n):
        image = render_scene(scene)
        reply = short_answer(row, mix, scene)
        for shown, picture in (("scene", image), ("grey", Image.new("RGB", image.size, (128, 128, 128)))):
            for kind, before, right in copy_hits(policy, picture, row["question"], reply):
                kind = f"{kind} after {before}" if args.context and kind != "ANSWER" else kind
                counts = tally[(row["family"], kind, shown)]
                counts[0] += right
                counts[1] += 1
    table = Table(title=f"thought tokens right, teacher-forced ({args.model}, {args.preset}, n {args.n})")
    for column in ("family", "word", "tokens", "with the scene", "grey image"):
        table.add_column(column, justify="right")
    for family, kind in sorted({(f, k) for f, k, _ in tally}):
        scene_counts, grey_counts = tally[(family, kind, "scene")], tally[(family, kind, "grey")]
        share = [f"{c[0] / c[1]:.2f}" if c[1] else "–" for c in (scene_counts, grey_counts)]
        table.add_row(family, kind, str(scene_counts[1]), *share)
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
