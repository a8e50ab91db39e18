"""The program stage with a given eyesight: world-derived visual programs vs asking the VLM directly.

    python bench/vpd_world.py [--n 40] [--preset large] [--seed 1000] [--model DIR]

On ``n`` held-out world items (eval seed 1000), each question is answered twice by the same VLM (default: the demo
model): directly (one batched greedy call over all items, look-first thought stripped), and by the program that
`rl.vpd_world.world_program` writes from the question's template, run in the sandbox with that VLM answering
``simple_query`` and its attention grounding ``find`` (`tools.grounding.AttentionGrounder`: "Is there a …?" then
a crop-sized window at the attention peak), OCR by PP-OCRv4. The programs are what a perfect programmer would
write, so the table isolates the tools: where the program column is lower, the eyesight's tools (its yes/no for
``find``, its attention windows, its reading of a crop) are the bottleneck. Prints per-family accuracy (the
evaluator's scoring), program failures and model-backed calls per program. Prints only.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections import defaultdict

from rich.console import Console
from rich.table import Table

from foveate.agents.oracle_crop import model_input_side
from foveate.api import make_policy
from foveate.eval.metrics import score_answer
from foveate.policies.base import SamplingParams
from foveate.protocol import strip_thought
from foveate.rl.vpd_world import world_program
from foveate.tools.grounding import AttentionGrounder
from foveate.tools.program import run_program
from foveate.world import iter_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--preset", default="large")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--model", default=None, help="model directory (default: the demo model)")
    args = parser.parse_args()
    os.environ.setdefault("FOVEATE_HOME", tempfile.mkdtemp(prefix="foveate-bench-"))
    policy = make_policy(args.model)
    items = list(iter_items(args.n, seed=args.seed, preset=args.preset))
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": row["question"]}]}]
        for image, _, row in items
    ]
    direct = [strip_thought(r.text) for r in policy.chat(conversations, SamplingParams(max_new_tokens=32))]
    grounder = AttentionGrounder(policy, box="window", input_side=model_input_side(policy), verify=True)
    stats: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (image, _, row), answer in zip(items, direct, strict=True):
        result = run_program(world_program(row["question"]), image, policy=policy, grounder=grounder, timeout_s=60)
        family = stats[row["family"]]
        family["n"] += 1
        family["direct"] += score_answer(answer, row, image.size)["score"]
        family["program"] += score_answer(result.answer, row, image.size)["score"] if result.ok else 0.0
        family["failed"] += not result.ok
        family["calls"] += result.calls
    table = Table(title=f"world programs vs direct on {args.n} {args.preset} items (seed {args.seed}), {policy.name}")
    for column in ("family", "n", "direct %", "program %", "program errors", "calls / program"):
        table.add_column(column, justify="left" if column == "family" else "right")
    totals = defaultdict(float)
    for name in sorted(stats) + ["all"]:
        row = stats[name] if name != "all" else totals
        if name != "all":
            for key, value in row.items():
                totals[key] += value
        n = row["n"] or 1
        table.add_row(name, f"{row['n']:.0f}", f"{100 * row['direct'] / n:.1f}", f"{100 * row['program'] / n:.1f}",
                      f"{row['failed']:.0f}", f"{row['calls'] / n:.1f}")  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
