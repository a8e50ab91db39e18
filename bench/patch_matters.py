"""Patch Matters' wall time against one global caption (the ``direct`` strategy), on the same images, one run.

    python bench/patch_matters.py                      # demo model, 3 world:caption scenes, 160 new tokens
    python bench/patch_matters.py --model DIR --n 8 --max-new-tokens 256

For every image: ``direct`` (one greedy "Describe the image in detail." call), ``patch-matters`` (global caption,
grounding, 4-5 patches × 3 samples in one batched call, yes-likelihood scoring of doubtful sentences, merges) and
``agreement-only`` (patch-matters with ``keep=1``: only sentences ≥ 2 samples agree on, nothing scored), each run
through the strategy graph as a user would (`foveate.api.run_strategy`), interleaved per image so load drift hits
all three. After one warm-up of each (model, MiniLM and caches loaded). Prints seconds per image, the ratios to
direct, the model calls in each trace (a batched patch call counts once per patch) and the totals (target ≤ 3×;
the reference implementation makes about 22 sequential model calls per image).

Measured with the demo model, `python bench/patch_matters.py --n 3`, one run, 2 shared cores: direct 2.09 s for the
3 images, patch-matters 59.28 s (28.35×), agreement-only 12.45 s (5.95×); see README for where the time goes.
Since doubtful sentences are scored with `choice_logprobs` (one row per sentence, each crop encoded once per call),
`--n 2` back to back before / after on a busy machine: patch-matters 76.5 s → 35.2 s (7.94× → 3.21×; agreement-only
2.99× in the after-run) and 121.3 s → 52.3 s (6.84× → 5.19×); direct's time swung with the load.
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="VLM directory (default: the demo model)")
    parser.add_argument("--n", type=int, default=3, help="images (world:caption scenes)")
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
    graphs = {
        "direct": get_builder("direct")(),
        "patch-matters": get_builder("patch-matters")(),
        "agreement-only": get_builder(
            "patch-matters", {"keep": 1.0}
        )(),  # no sentence scored (configs/patch_matters.yaml)
    }
    rows = resolve_tasks("world:caption", n=args.n + 1).rows

    def run(name: str, row: dict) -> tuple[float, int]:
        inputs = {"image": store.put(load_image(row["image"])), "question": row["question"]}
        started = time.perf_counter()
        result = run_strategy(
            graphs[name], inputs, strategy="x", policy=policy, store=store, max_new_tokens=args.max_new_tokens
        )
        return time.perf_counter() - started, result.trace.model_calls

    for name in graphs:  # warm-up on an image outside the measured set
        run(name, rows[-1])
    table = Table(title=f"wall time / direct's (one global caption), {args.n} images, {args.max_new_tokens} new tokens")
    table.add_column("image")
    for name in graphs:
        table.add_column(f"{name} s", justify="right")
    for name in list(graphs)[1:]:
        table.add_column(f"{name} ×", justify="right")
    table.add_column("model calls", justify="right")
    totals = dict.fromkeys(graphs, 0.0)
    for row in rows[: args.n]:
        measured = {name: run(name, row) for name in graphs}  # interleaved per image
        for name, (seconds, _) in measured.items():
            totals[name] += seconds
        ratios = [f"{measured[name][0] / measured['direct'][0]:.2f}" for name in list(graphs)[1:]]
        calls = "/".join(str(calls) for _, calls in measured.values())
        table.add_row(row["scene_id"], *(f"{seconds:.2f}" for seconds, _ in measured.values()), *ratios, calls)
    ratios = [f"{totals[name] / totals['direct']:.2f}" for name in list(graphs)[1:]]
    table.add_row("all", *(f"{totals[name]:.2f}" for name in graphs), *ratios, "")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
