"""Can the demo decoder learn to bind a question to one object at all? The same decoder on symbolic image tokens.

    python bench/binding_symbolic.py [--steps 900] [--shape-snr 1,0.5,0.25] [--seeds 0]

`bench/binding.py` shows the demo models read *some* object's colour rather than the asked one (right of named
0.58 / 0.44 / 0.37 on 2 / 3 / 4 objects). Two causes are possible: the decoder (3 layers × 192, 900 steps of
batch 16 at lr 1e-3) cannot learn the lookup in that budget, or the vision tokens do not carry the asked-about
property (a colour question names its object by shape, "the square") cleanly enough to match on. This bench
removes the vision tower: each of the 8×8 image slots is a fixed random vector for its object's colour plus one
for its shape (scaled by ``--shape-snr``) plus Gaussian noise, fed through a learned linear "merger" into the real
tiny Qwen2-VL decoder with the real multimodal rotary positions (2-D for slots, 1-D for text after them), then a
chat-like question: "what color is the square ?" (shape named, colour asked) or "what shape is the red object ?".
It trains the stage-4 mix (0.3 one-object scenes, 0.7 scenes of 1-4) from a fresh decoder and prints, per number of
objects, held-out accuracy. Deviation from the real model: no vision tower, objects are 1-4 whole slots, and the
decoder starts from scratch rather than from a model that already copies one object's colour.

Measured (seed 0, shape snr 1, noise 0.5; curves with ``--eval-every``, 100 questions per count, final rows 300),
accuracy on 1 / 2 / 3 / 4-object scenes (chance for a reader of a random object: 1 / 0.50 / 0.33 / 0.25):

=============================================================  =====  ===========================
variant (flags)                                                steps  1 / 2 / 3 / 4 objects
=============================================================  =====  ===========================
bare answer (default)                                          900    1.00 / 0.51 / 0.32 / 0.25
bare answer, ``--steps 3000`` (stopped at 2100)                2100   1.00 / 0.48 / 0.26 / 0.24
question before the slots (``--question-first``)               1500   1.00 / 0.49 / 0.30 / 0.25
answer predicted at the restated referent (``--restate``)      300    1.00 / 0.82 / 0.70 / 0.66
                                                               450    0.98 / 0.95 / 0.96 / 0.93
                                                               900    1.00 / 1.00 / 1.00 / 1.00
referent, then a separator, then the answer                    900    1.00 / 0.49 / 0.34 / 0.24
(``--restate separated``)
restated referent, shape half as strong (``--shape-snr 0.5``)  900    0.98 / 0.79 / 0.72 / 0.71
restated referent, shape at 1/4 (``--shape-snr 0.25``)         900    0.59 / 0.32 / 0.24 / 0.24
=============================================================  =====  ===========================

The decoder reads a random object until the answer is predicted at the referent's own word, so the lookup's query
is that word's embedding; any token between them (even one) brings the plateau back. `protocol.look_answer` is
the demo model's format built on this: ``<think>the red star blue</think>blue``. How cleanly the tokens carry the
attribute the referent is named by matters as much: at half strength the lookup is 0.79 / 0.72 / 0.71, at a
quarter (below the noise) neither the lookup nor shape reading is learned.
"""

from __future__ import annotations

import argparse
import random

import torch
from rich.console import Console
from rich.table import Table

COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond"]
WORDS = ["<s>", "<vs>", "<ve>", "<img>", "user", "assistant", "what", "color", "shape", "is", "the", "object", "?"]
VOCAB = {w: i for i, w in enumerate(WORDS + COLORS + SHAPES)}
GRID = 8


def build_decoder(seed: int, hidden: int = 192, layers: int = 3):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    head_dim = hidden // 6
    quarter = head_dim // 8
    rest = head_dim // 2 - quarter
    text = {
        "vocab_size": len(VOCAB),
        "hidden_size": hidden,
        "intermediate_size": 512,
        "num_hidden_layers": layers,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [quarter, rest // 2, rest - rest // 2],
        },
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": VOCAB["<s>"],
        "eos_token_id": VOCAB["<s>"],
        "pad_token_id": VOCAB["<s>"],
    }
    vision = {"depth": 1, "embed_dim": 32, "hidden_size": hidden, "num_heads": 2, "patch_size": 14}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    return Qwen2VLForConditionalGeneration(config)


def scene(rng: random.Random, single_share: float) -> list[tuple[int, int, list[int]]]:
    """Objects as (colour, shape, slot indices): distinct colours and shapes, each a 1×1 to 2×2 block of slots."""
    k = 1 if rng.random() < single_share else rng.randint(1, 4)
    colors, shapes = rng.sample(range(len(COLORS)), k), rng.sample(range(len(SHAPES)), k)
    used: set[int] = set()
    objects = []
    for color, shape in zip(colors, shapes, strict=True):
        while True:
            h, w = rng.randint(1, 2), rng.randint(1, 2)
            r, c = rng.randint(0, GRID - h), rng.randint(0, GRID - w)
            cells = [(r + i) * GRID + c + j for i in range(h) for j in range(w)]
            if not used & set(cells):
                break
        used |= set(cells)
        objects.append((color, shape, cells))
    return objects


def example(rng: random.Random, single_share: float) -> tuple[list, list[str], str]:
    objects = scene(rng, single_share)
    color, shape, _ = rng.choice(objects)
    if rng.random() < 0.5:
        return objects, ["what", "color", "is", "the", SHAPES[shape], "?"], COLORS[color]
    return objects, ["what", "shape", "is", "the", COLORS[color], "object", "?"], SHAPES[shape]


class SymbolicBatcher:
    """Turns examples into (inputs_embeds, position_ids (3, B, L), answer ids) for the decoder."""

    def __init__(
        self,
        model,
        hidden: int,
        shape_snr: float,
        noise: float,
        seed: int,
        question_first: bool = False,
        restate: bool | str = False,
    ):
        self.question_first, self.restate = question_first, restate
        generator = torch.Generator().manual_seed(seed + 1000)
        self.color_vectors = torch.randn(len(COLORS), hidden, generator=generator)
        self.shape_vectors = torch.randn(len(SHAPES), hidden, generator=generator) * shape_snr
        self.noise, self.generator = noise, generator
        self.merger = torch.nn.Linear(hidden, hidden)  # stands in for the vision merger: trained with the decoder
        self.embed = model.get_input_embeddings()

    def slots(self, objects) -> torch.Tensor:
        features = torch.randn(GRID * GRID, self.color_vectors.shape[1], generator=self.generator) * self.noise
        for color, shape, cells in objects:
            features[cells] += self.color_vectors[color] + self.shape_vectors[shape]
        return self.merger(features)

    def __call__(self, batch):
        rows, positions, answers = [], [], []
        for objects, question, answer in batch:
            before = [VOCAB[w] for w in ("<s>", "user", *(question if self.question_first else ()), "<vs>")]
            after = [VOCAB[w] for w in ["<ve>", *(() if self.question_first else question), "<s>", "assistant"]]
            # The answer turn restates the question's referent word ("square") before the answer is predicted.
            after += [VOCAB[question[-2] if question[-2] != "object" else question[-3]]] if self.restate else []
            # ... and a separator (like "</think>") after it, so the answer is not predicted at the referent itself.
            after += [VOCAB["is"]] if self.restate == "separated" else []
            rows.append(
                torch.cat([self.embed(torch.tensor(before)), self.slots(objects), self.embed(torch.tensor(after))])
            )
            grid = torch.arange(GRID * GRID)
            image = torch.stack([torch.zeros_like(grid), grid // GRID, grid % GRID]) + len(before)
            start = len(before) + GRID
            text_after = torch.arange(start, start + len(after)).expand(3, -1)
            positions.append(torch.cat([torch.arange(len(before)).expand(3, -1), image, text_after], dim=1))
            answers.append(VOCAB[answer])
        length = max(r.shape[0] for r in rows)
        # Left padding keeps every answer position last; padded slots are masked out.
        embeds = torch.stack([torch.cat([r.new_zeros(length - r.shape[0], r.shape[1]), r]) for r in rows])
        pos = torch.stack([torch.cat([p.new_zeros(3, length - p.shape[1]), p], dim=1) for p in positions], dim=1)
        mask = torch.stack([torch.cat([torch.zeros(length - r.shape[0]), torch.ones(r.shape[0])]) for r in rows]).long()
        return embeds, pos, mask, torch.tensor(answers)


def logits_at_end(model, embeds, pos, mask) -> torch.Tensor:
    return model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask).logits[:, -1]


def held_out_accuracy(model, batcher, seed: int, n: int) -> dict[int, float]:
    """Accuracy on n fresh questions per number of objects (1-4), from a generator seed training never uses."""
    held_out, scores = random.Random(777 + seed), {}
    with torch.no_grad():
        for k in (1, 2, 3, 4):
            batch = []
            while len(batch) < n:
                item = example(held_out, 0.0)
                batch += [item] if len(item[0]) == k else []
            embeds, pos, mask, answers = batcher(batch)
            scores[k] = (logits_at_end(model, embeds, pos, mask).argmax(-1) == answers).float().mean().item()
    return scores


def run(args, shape_snr: float, seed: int, console: Console) -> dict[int, float]:
    model = build_decoder(seed, args.hidden, args.layers)
    batcher = SymbolicBatcher(model, args.hidden, shape_snr, args.noise, seed, args.question_first, args.restate)
    params = list(model.parameters()) + list(batcher.merger.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 30))
    rng = random.Random(seed)
    for step in range(1, args.steps + 1):
        embeds, pos, mask, answers = batcher([example(rng, args.single_share) for _ in range(16)])
        loss = torch.nn.functional.cross_entropy(logits_at_end(model, embeds, pos, mask), answers)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            curve = held_out_accuracy(model, batcher, seed, 100)
            console.print(f"snr {shape_snr:g} seed {seed} step {step}: " + " ".join(f"{curve[k]:.2f}" for k in curve))
    return held_out_accuracy(model, batcher, seed, args.n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--shape-snr", default="1,0.5,0.25", help="scale of the shape vector against the colour one")
    parser.add_argument("--noise", type=float, default=0.5, help="std of the per-slot Gaussian noise")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--single-share", type=float, default=0.3, help="share of one-object training scenes")
    parser.add_argument("--question-first", action="store_true", help="the question before the image slots")
    parser.add_argument(
        "--restate",
        nargs="?",
        const=True,
        default=False,
        help="the answer turn repeats the referent word first "
        "(`--restate separated`: then a separator token, so the answer is predicted one token after the referent)",
    )
    parser.add_argument("--eval-every", type=int, default=0, help="print held-out accuracy every N steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=300, help="held-out questions per number of objects")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    table = Table(
        title=f"held-out accuracy after {args.steps} steps (symbolic image tokens, {args.layers}×{args.hidden})"
    )
    for column in ("shape snr", "seed", "1 object", "2", "3", "4"):
        table.add_column(column, justify="right")
    for snr in (float(s) for s in args.shape_snr.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            scores = run(args, snr, seed, console)
            table.add_row(f"{snr:g}", str(seed), *(f"{scores[k]:.2f}" for k in (1, 2, 3, 4)))
    console.print(table)


if __name__ == "__main__":
    main()
