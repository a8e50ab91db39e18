"""Patch Matters' wall time against one global caption (the ``direct`` strategy), on the same images, one run.

    python bench/patch_matters.py                      # demo model, 4 world:caption scenes, 160 new tokens
    python bench/patch_matters.py --model DIR --n 8 --max-new-tokens 256

For every image: ``direct`` (one greedy "Describe the image in detail." call) and ``patch-matters`` (global
caption, grounding, 4-5 patches × 3 samples in one batched call, scoring, merges), each run through the strategy
graph as a user would (`foveate.api.run_strategy`), interleaved per image so load drift hits both. After one
warm-up of each (model, MiniLM and caches loaded). Prints seconds per image, the ratio, the model calls each made
(batched calls count once per conversation in the trace), and the total ratio (target ≤ 3×; the reference
implementation makes about 22 sequential model calls per image).
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="VLM directory (default: the demo model)")
    parser.add_argument("--n", type=int, default=4, help="images (world:caption scenes)")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    args = parser.parse_args()

    from foveate.agents import get_builder
    from foveate.api import DEMO_MODEL_DIR, run_strategy
    from foveate.eval.runner import resolve_tasks
    from foveate.policies.transformers_vlm import TransformersVLM
    from foveate.tools.images import load_image
    from foveate.tools.store import ImageStore

    policy = TransformersVLM(args.model or DEMO_MODEL_DIR)
    store = ImageStore()
    graphs = {name: get_builder(name)() for name in ("direct", "patch-matters")}
    rows = resolve_tasks("world:caption", n=args.n + 1).rows

    def run(name: str, row: dict) -> tuple[float, int]:
        inputs = {"image": store.put(load_image(row["image"])), "question": row["question"]}
        started = time.perf_counter()
        result = run_strategy(
            graphs[name], inputs, strategy=name, policy=policy, store=store, max_new_tokens=args.max_new_tokens
        )
        return time.perf_counter() - started, result.trace.model_calls

    for name in graphs:  # warm-up on an image outside the measured set
        run(name, rows[-1])
    table = Table(title=f"patch-matters / direct wall time, {args.n} images, {args.max_new_tokens} new tokens")
    for header in ("image", "direct s", "patch-matters s", "ratio", "direct calls", "patch-matters calls"):
        table.add_column(header, justify="left" if header == "image" else "right")
    totals = {name: 0.0 for name in graphs}
    for row in rows[: args.n]:
        (direct_s, direct_calls), (pm_s, pm_calls) = run("direct", row), run("patch-matters", row)
        totals["direct"] += direct_s
        totals["patch-matters"] += pm_s
        table.add_row(
            row["scene_id"],
            f"{direct_s:.2f}",
            f"{pm_s:.2f}",
            f"{pm_s / direct_s:.2f}×",
            str(direct_calls),
            str(pm_calls),
        )
    ratio = totals["patch-matters"] / totals["direct"]
    table.add_row("all", f"{totals['direct']:.2f}", f"{totals['patch-matters']:.2f}", f"{ratio:.2f}×", "", "")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
