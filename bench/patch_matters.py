"""Patch Matters' wall time against one global caption (the ``direct`` strategy), on the same images, one run.

    python bench/patch_matters.py                      # demo model, 3 world:caption scenes, 160 new tokens
    python bench/patch_matters.py --model DIR --n 8 --max-new-tokens 256

For every image: ``direct`` (one greedy "Describe the image in detail." call), ``patch-matters`` (global caption,
grounding, 4-5 patches × 3 samples in one batched call, yes-likelihood scoring of doubtful sentences, merges) and
``agreement-only`` (patch-matters with ``keep=1``: only sentences ≥ 2 samples agree on, nothing scored), each run
through the strategy graph as a user would, interleaved per image so load drift hits all three. After one warm-up
of each (model, MiniLM and caches loaded). Prints seconds per image, the ratios to direct, the model calls in each
trace (a batched patch call counts once per patch) and the totals (target ≤ 3×; the reference implementation
makes about 22 sequential model calls per image); then where patch-matters' time goes, node by node (each node's
seconds from LangGraph's stream of updates), as a multiple of direct's time. ``caption_global`` +
``caption_patches`` is the floor no change to grouping, scoring or merging can go below.

The results with the demo model are in the README (Patch Matters). Run it on an idle machine: other jobs on the
two cores change direct's 0.25 s far more, in proportion, than patch-matters' seconds.
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from foveate.trace import Trace


def timed_run(graph, inputs: dict, context) -> tuple[float, dict[str, float], int]:
    """Wall seconds of one run, seconds per node (the nodes run one after another: each update's time since the
    previous one) and the model calls in its trace."""
    nodes: dict[str, float] = {}
    steps: list[dict] = []
    started = last = time.perf_counter()
    for update in graph.stream(inputs, context=context, stream_mode="updates"):
        now = time.perf_counter()
        for node, values in update.items():
            nodes[node] = nodes.get(node, 0.0) + now - last
            steps += (values or {}).get("steps", [])
        last = now
    trace = Trace(strategy="bench", question=inputs["question"], image=inputs["image"], answer="", steps=steps)
    return time.perf_counter() - started, nodes, trace.model_calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="VLM directory (default: the demo model)")
    parser.add_argument("--n", type=int, default=3, help="images (world:caption scenes)")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    args = parser.parse_args()

    from foveate.agents import get_builder
    from foveate.agents.state import FoveateContext
    from foveate.api import DEMO_MODEL_DIR
    from foveate.eval.runner import resolve_tasks
    from foveate.policies.transformers_vlm import TransformersVLM
    from foveate.tools.images import load_image
    from foveate.tools.store import ImageStore

    policy = TransformersVLM(args.model or DEMO_MODEL_DIR)
    store = ImageStore()
    context = FoveateContext(policy=policy, store=store, max_new_tokens=args.max_new_tokens)
    graphs = {
        "direct": get_builder("direct")(),
        "patch-matters": get_builder("patch-matters")(),
        "agreement-only": get_builder("patch-matters", {"keep": 1.0})(),  # nothing scored (configs/patch_matters.yaml)
    }
    rows = resolve_tasks("world:caption", n=args.n + 1).rows

    def run(name: str, row: dict) -> tuple[float, dict[str, float], int]:
        inputs = {"image": store.put(load_image(row["image"])), "question": row["question"]}
        return timed_run(graphs[name], inputs, context)

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
    node_totals: dict[str, float] = {}
    for row in rows[: args.n]:
        measured = {name: run(name, row) for name in graphs}  # interleaved per image
        for name, (seconds, _, _) in measured.items():
            totals[name] += seconds
        for node, seconds in measured["patch-matters"][1].items():
            node_totals[node] = node_totals.get(node, 0.0) + seconds
        ratios = [f"{measured[name][0] / measured['direct'][0]:.2f}" for name in list(graphs)[1:]]
        calls = "/".join(str(calls) for *_, calls in measured.values())
        table.add_row(row["scene_id"], *(f"{seconds:.2f}" for seconds, _, _ in measured.values()), *ratios, calls)
    ratios = [f"{totals[name] / totals['direct']:.2f}" for name in list(graphs)[1:]]
    table.add_row("all", *(f"{totals[name]:.2f}" for name in graphs), *ratios, "")
    console = Console(width=160)
    console.print(table)
    console.print(node_table(node_totals, totals["direct"], args.n))


def node_table(node_totals: dict[str, float], direct_total: float, images: int) -> Table:
    """Where patch-matters' time goes: seconds per image and × direct's time, per node, and the floor."""
    table = Table(title="patch-matters, node by node (per image; × = a multiple of direct's time)")
    for column in ("node", "s / image", "× direct"):
        table.add_column(column, justify="left" if column == "node" else "right")
    for node, seconds in node_totals.items():
        table.add_row(node, f"{seconds / images:.3f}", f"{seconds / direct_total:.2f}")
    floor = node_totals.get("caption_global", 0.0) + node_totals.get("caption_patches", 0.0)
    table.add_row("floor: caption_global + caption_patches", f"{floor / images:.3f}", f"{floor / direct_total:.2f}")
    return table


if __name__ == "__main__":
    main()
