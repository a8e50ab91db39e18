"""Where did the zoom strategies look on `world:zoom`, and did looking there pay? Reads an eval's items file.

    foveate eval --task world:zoom --strategies direct,oracle-crop,vicrop-rel,vicrop-grad --n 60 --out z.json
    python bench/zoom_crops.py z.items.jsonl                # the same --seed as the eval (default 1000)

Per strategy: accuracy over all items, on open and multiple-choice questions, on colour and position references;
how many items had a crop (``crops``) and on how many a crop held the whole target box (``hit``); the mean crop
area as a fraction of the image; and accuracy on the items whose crop held the target (``acc|hit``) and on the
rest (``acc|miss``). A strategy's gain over direct is bounded by ``hit`` (localisation) times what the model reads
in a crop (oracle-crop's accuracy, whose crop always holds the target). Ground truth comes from regenerating the
preset's questions with the eval's seed (nothing is rendered).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from foveate.world import iter_scenes


def ground_truth(seed: int, ids: set[str]) -> dict[str, dict]:
    """Task rows of `world:zoom` (the fields this bench needs) by id, for the ids in an items file."""
    rows: dict[str, dict] = {}
    for scene, questions in iter_scenes(seed, "zoom"):
        for j, q in enumerate(questions):
            rows[f"{scene.id}-q{j}"] = {**q, "image_size": (scene.width, scene.height)}
        if ids <= rows.keys():
            return rows
        if len(rows) > 100 * len(ids) + 1000:
            raise SystemExit("items file ids are not world:zoom ids of this seed (pass the eval's --seed)")
    return rows


def _inside(crop: list[float], box: list[int]) -> bool:
    return crop[0] <= box[0] and crop[1] <= box[1] and crop[2] >= box[2] and crop[3] >= box[3]


def _pct(hits: float, n: int) -> str:
    return f"{100 * hits / n:.1f}" if n else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("items", type=Path, help="the eval's <out>.items.jsonl")
    parser.add_argument("--seed", type=int, default=1000, help="the eval's world seed")
    args = parser.parse_args()
    records = [json.loads(line) for line in args.items.read_text(encoding="utf-8").splitlines() if line.strip()]
    truth = ground_truth(args.seed, {r["id"] for r in records})
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[record["strategy"]].append(record)
    header = ["strategy", "n", "acc", "open", "choice", "color", "position", "crops", "hit", "crop area", "acc|hit"]
    lines = [[*header, "acc|miss"]]
    for strategy, mine in groups.items():
        cells = defaultdict(lambda: [0.0, 0])
        hit_n = crops = 0
        area = 0.0
        for record in mine:
            row = truth[record["id"]]
            score = float(record.get("score") or 0.0)
            width, height = row["image_size"]
            boxes = record.get("crop_boxes") or []
            hit = any(_inside(c, row["boxes"][0]) for c in boxes)
            crops += bool(boxes)
            hit_n += hit
            area += sum((c[2] - c[0]) * (c[3] - c[1]) / (width * height) for c in boxes[:1])
            fmt = "choice" if row["family"] == "choice" else "open"
            keys = ["all", fmt, row["reference"], "hit" if hit else "miss"]
            for key in keys:
                cells[key][0] += score
                cells[key][1] += 1
        acc = [_pct(*cells[k]) for k in ("all", "open", "choice", "color", "position")]
        lines.append(
            [strategy, str(len(mine)), *acc, str(crops), str(hit_n), f"{area / crops:.3f}" if crops else "-"]
            + [_pct(*cells["hit"]), _pct(*cells["miss"])]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        print("  ".join(cells))


if __name__ == "__main__":
    main()
