"""Where does the answer's lookup attend, and does that decide whether the answer is right?

    python bench/lookup_attention.py DIR [DIR …] [--preset simple] [--n 200] [--objects 2,3]

For held-out attribute questions (`qa` format, world seed 777) on scenes of ``--objects`` objects, the model's
answer is teacher-forced in the format it was trained on (`answer_probe.answer_format`) and, at the position that
predicts the answer's first token (`rl.attention_supervision.query_positions`: inside a look-first thought, the
referent's last word; else the last prompt token), each decoder layer's attention row is read (eager attention,
mean over heads) and renormalised over the scene image's tokens. The table gives, per layer, the share of that
mass on the asked object's cells (`attention_supervision.evidence_cells`, the same cells the attention loss
targets) and on the other objects' cells, split by whether the first answer token is right. ``cells`` is the
share of the grid the asked object covers: what a lookup that ignores the question would put there.

Measured (``--n 200``, 2-3 objects) on the stage-4 models of configs/probes/demo-v9.yaml and demo-v10.yaml
(attention share on the asked object / on the other objects; ``cells``, the asked object's share of the grid, is
0.08-0.11 in every row):

============  =====================  =============  =============  =============
model         asks, answers (n)      layer 0        layer 1        layer 2
============  =====================  =============  =============  =============
v9 stage 4    colour, right (55)     0.58 / 0.30    0.16 / 0.14    0.28 / 0.19
v9 stage 4    colour, wrong (41)     0.21 / 0.64    0.10 / 0.19    0.21 / 0.36
v9 stage 4    shape, right (34)      0.04 / 0.04    0.13 / 0.15    0.15 / 0.12
v9 stage 4    shape, wrong (70)      0.04 / 0.06    0.12 / 0.18    0.11 / 0.18
v10 stage 4   colour, right (58)     0.66 / 0.27    0.18 / 0.15    0.16 / 0.14
v10 stage 4   colour, wrong (38)     0.27 / 0.56    0.11 / 0.20    0.12 / 0.27
v10 stage 4   shape, right (38)      0.04 / 0.04    0.20 / 0.24    0.34 / 0.33
v10 stage 4   shape, wrong (66)      0.04 / 0.06    0.18 / 0.26    0.26 / 0.42
============  =====================  =============  =============  =============

A colour question is looked up in layer 0 at its shape word ("the square"): right answers come from a lookup
on the asked object, wrong ones from a lookup on another. A shape question's colour word ("the red") does not
look anything up in layer 0 (0.04 on any object: its attention stays on the background), and no later layer
picks the asked object out of the others.
"""

from __future__ import annotations

import collections
import itertools
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from foveate.rl.answer_probe import MODEL_INPUTS, answer_format, probe_parser, question_text
from foveate.rl.attention_supervision import evidence_cells
from foveate.rl.sft import ChatCollator
from foveate.rl.sft_data import DataMix, example_stream


def other_objects_cells(example: dict, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """[cells] bool in raster order, like the batch's ``attn_evidence`` on the scene: the cells of the scene's
    objects other than the asked one (`attention_supervision.evidence_cells` of their boxes)."""
    scene = example["scene"]
    boxes = [list(obj.box) for obj in scene.objects if list(obj.box) not in example["evidence"]]
    _, height, width = (int(v) for v in grid_thw)
    return torch.from_numpy(evidence_cells(boxes, (scene.width, scene.height), height // merge, width // merge))


def lookup_shares(model, collator: ChatCollator, examples: list[dict]) -> dict[tuple, list[float]]:
    """(layer, "asked" | "others", kind, "right" | "wrong") → per-question attention shares, kind "color" or
    "shape" (what the question asks); ("cells", "asked", …) → the asked object's share of the grid."""
    shares: dict[tuple, list[float]] = collections.defaultdict(list)
    merge = collator.processor.image_processor.merge_size
    for start in range(0, len(examples), 10):
        chunk = examples[start : start + 10]
        batch = collator(chunk)
        with torch.no_grad():
            output = model(**{key: batch[key] for key in MODEL_INPUTS if key in batch}, output_attentions=True)
        for row in range(len(chunk)):
            query = int(batch["attn_query"][row, 0])  # single-turn examples: one supervised turn
            if query < 0:
                continue
            kind = "color" if question_text(chunk[row]).startswith("What color") else "shape"
            outcome = (
                "right"
                if int(output.logits[row, query].argmax()) == int(batch["input_ids"][row, query + 1])
                else "wrong"
            )
            scene = batch["attn_scene"][row]
            asked = batch["attn_evidence"][row, 0][scene]
            rest = other_objects_cells(chunk[row], batch["image_grid_thw"][row], merge) & ~asked
            shares[("cells", "asked", kind, outcome)].append(float(asked.float().mean()))
            for layer, attention in enumerate(output.attentions):
                on_scene = attention[row, :, query, scene].mean(0)
                on_scene = on_scene / on_scene.sum()
                shares[(layer, "asked", kind, outcome)].append(float(on_scene[asked].sum()))
                shares[(layer, "others", kind, outcome)].append(float(on_scene[rest].sum()))
    return shares


def main() -> None:
    from transformers import AutoModelForImageTextToText

    from foveate.policies.loading import load_processor

    parser = probe_parser(__doc__.split("\n\n")[0], 200, "attribute questions on scenes of --objects objects")
    parser.add_argument("--objects", default="2,3", help="object counts of the scenes kept")
    args = parser.parse_args()
    counts = {int(k) for k in args.objects.split(",")}
    torch.set_num_threads(2)
    table = Table(title=f"attention at the answer's lookup position ({args.preset}, scenes of {args.objects} objects)")
    for column in ("model", "layer", "asks", "answers", "n", "asked", "others", "cells"):
        table.add_column(column, justify="right")
    for directory in args.models:
        model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
        collator = ChatCollator(load_processor(directory), 512, attn_targets=True)
        mix = DataMix(
            formats={"qa": 1.0}, presets={args.preset: 1.0}, questions=("attribute",), **answer_format(directory)
        )
        stream = (e for e in example_stream(args.seed, mix) if len(e["scene"].objects) in counts and e.get("evidence"))
        shares = lookup_shares(model.eval(), collator, list(itertools.islice(stream, args.n)))
        name = "/".join(Path(directory).parts[-2:])
        for layer in range(model.config.text_config.num_hidden_layers):
            for kind, outcome in itertools.product(("color", "shape"), ("right", "wrong")):
                asked, others = (shares[(layer, part, kind, outcome)] for part in ("asked", "others"))
                cells = shares[("cells", "asked", kind, outcome)]
                if asked:
                    table.add_row(
                        name, str(layer), kind, outcome, str(len(asked)),
                        *(f"{np.mean(values):.2f}" for values in (asked, others, cells)),
                    )  # fmt: skip
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
