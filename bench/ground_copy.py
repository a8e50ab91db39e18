"""Does a model draw the asked object's box, or one box for everything? Grounding per scene kind.

    python bench/ground_copy.py DIR [--presets single,simple,large] [--n 60]

For held-out scenes (seed 999) of each preset, asks the training format's grounding question about one uniquely
described medium/large object ("Locate the red star. …", `rl.sft_data.ground`), decodes greedily and scores the
first box of the reply (`foveate.eval.metrics.parse_box_answer`): accuracy at IoU ≥ 0.5, mean IoU, the mean
distance of an edge from the truth in thousandths of the image side (over parsed boxes), and how many distinct
boxes the model wrote. A model that has not learned to copy a box from its vision tokens writes the
same prior box for every question (distinct ≈ 1) whatever the scene; one that copies scores first on `single`
(one object: no binding needed), then on `simple` (1-4 objects), then on `large`. `foveate eval --task
world:grounding` is the benchmark; this separates copying from binding.

Measured (``--n 40``; acc@0.5 / mean IoU / distinct boxes on single, simple, large):

| model | single | simple | large |
|---|---|---|---|
| demo-v18 (configs/probes/demo-v18.yaml) | 0.00 / 0.03 / 3 | 0.00 / 0.05 / 6 | 0.00 / 0.06 / 5 |
| v18 + 1300 vision-only box steps + 400 grounding steps | 0.03 / 0.04 / 25 | 0.00 / 0.04 / 35 | 0.00 / 0.06 / 36 |

Neither copies: the extra grounding steps only vary the box, unrelated to the object even alone in its scene.
"""

from __future__ import annotations

import argparse
import itertools
import random

import torch
from rich.console import Console
from rich.table import Table

from foveate.eval.metrics import parse_box_answer
from foveate.protocol import strip_thought
from foveate.rl.box_aux import BOX_STEP
from foveate.rl.sft_data import DataMix, ground
from foveate.tools.boxes import Box, iou
from foveate.world import iter_scenes, render_scene


@torch.no_grad()
def measure(model, processor, preset: str, n: int) -> dict[str, float]:
    mix = DataMix(box_step=BOX_STEP)
    rng = random.Random(0)
    ious, boxes, edge_errors = [], set(), []
    for scene, _rows in itertools.islice(iter_scenes(999, preset), 4 * n):
        if len(ious) == n:
            break
        image = render_scene(scene)
        example = ground(image, scene, rng, mix=mix)
        target = None if example is None else next(o for o in scene.objects if o.box == example["evidence"][0])
        if target is None or target.size_class not in ("medium", "large"):  # tiny targets: not this bench's question
            continue
        truth = Box(*target.box)
        text = processor.apply_chat_template(example["messages"][:1], tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=48, do_sample=False)
        reply = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        box = parse_box_answer(strip_thought(reply), image.size, "thousand")
        boxes.add(None if box is None else (box.x1, box.y1, box.x2, box.y2))
        ious.append(0.0 if box is None else iou(box, truth))
        if box is not None:  # how far each edge lands, in thousandths of the image side
            sides = (image.width, image.height) * 2
            pairs = zip((box.x1, box.y1, box.x2, box.y2), target.box, sides, strict=True)
            edge_errors.append(sum(abs(a - b) * 1000 / side for a, b, side in pairs) / 4)
    return {
        "n": len(ious),
        "acc": sum(v >= 0.5 for v in ious) / max(1, len(ious)),
        "iou": sum(ious) / max(1, len(ious)),
        "distinct": len(boxes),
        "edge_error": sum(edge_errors) / len(edge_errors) if edge_errors else float("nan"),
    }


def main() -> None:
    from transformers import AutoModelForImageTextToText

    from foveate.policies.loading import load_processor

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="+", help="model directories")
    parser.add_argument("--presets", default="single,simple,large")
    parser.add_argument("--n", type=int, default=60, help="questions per preset")
    args = parser.parse_args()
    torch.manual_seed(0)
    table = Table(title=f"grounding by scene kind (held-out seed 999, {args.n} per preset)")
    for column in ("model", "preset", "n", "acc@0.5", "mean IoU", "edge error ‰", "distinct boxes"):
        table.add_column(column, justify="right" if column not in ("model", "preset") else "left")
    for directory in args.model:
        model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).eval()
        processor = load_processor(directory)
        for preset in args.presets.split(","):
            row = measure(model, processor, preset, args.n)
            scores = f"{row['acc']:.2f}", f"{row['iou']:.2f}", f"{row['edge_error']:.0f}"
            table.add_row(directory, preset, str(row["n"]), *scores, str(row["distinct"]))
    Console().print(table)


if __name__ == "__main__":
    main()
