"""GRPO rollout generation: one batched call for all rollouts vs one rollout at a time (completions/s).

    python bench/grpo_rollouts.py [--model DIR] [--prompts 4] [--generations 4] [--tokens 64]

Builds the DeepEyes GRPO trainer of ``configs/rl/deepeyes.yaml`` (TRL ``GRPOTrainer`` with the zoom environment,
the demo model by default) on ``--prompts`` world:small-detail items and generates their rollouts the way a GRPO
step does (``GRPOTrainer._generate_and_score_completions``: sampling, tool turns, rewards): once with all
``prompts × generations`` rollouts in one padded batch (TRL's default), once one prompt's group at a time
(``--generations`` rollouts per call) and once one rollout per call (the trainer's ``num_generations`` set to 1
after construction, so its advantage step accepts a single row; the advantages are meaningless, the generation is
what is timed). Each is run twice after a warm-up;
the table shows the tokens generated (sampling differs between runs, so lengths do too), completions per second of
wall and of process CPU time (on a shared machine wall time mostly measures the neighbours) and the ratio of the
batched run's rate to each. Takes a few minutes on 2 cores. Prints only.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from rich.console import Console
from rich.table import Table
from timing import timed  # bench/timing.py

from foveate.rl.deepeyes_grpo import GRPORecipe, build_trainer
from foveate.rl.runs import load_config

REPEATS = 2


def rollouts(trainer, rows: list[dict], group: int) -> tuple[int, int]:
    """Generate (and score) the rollouts of ``rows`` in calls of ``group`` rollouts; return (rollouts, tokens
    generated, padding excluded)."""
    made = tokens = 0
    for start in range(0, len(rows), group):
        out = trainer._generate_and_score_completions(rows[start : start + group])
        made += len(out["completion_ids"])
        tokens += int(out["completion_mask"].sum())
    return made, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    options = parser.parse_args()
    os.environ.setdefault("FOVEATE_HOME", tempfile.mkdtemp(prefix="foveate-bench-"))
    total = options.prompts * options.generations
    settings = {"n_items": options.prompts, "max_completion_length": options.tokens, "model": options.model}
    recipe = load_config(
        GRPORecipe,
        "configs/rl/deepeyes.yaml",
        {**settings, "num_generations": options.generations, "batch_size": total, "output_dir": tempfile.mkdtemp()},
    )
    trainer = build_trainer(recipe, recipe.output_dir)
    dataset = list(trainer.train_dataset)
    rows = [row for row in dataset[: options.prompts] for _ in range(options.generations)]  # as TRL's sampler repeats
    results = []
    for name, group in (
        ("all rollouts in one batch", total),
        ("one prompt's group per call", options.generations),
        ("one rollout per call", 1),
    ):
        # The group size the advantage step reshapes by (TRL reads the eval one when the model is not training).
        trainer.num_generations = trainer.num_generations_eval = min(group, options.generations)
        rollouts(trainer, rows[:group], group)  # warm-up
        runs = [timed(lambda group=group: rollouts(trainer, rows, group)) for _ in range(REPEATS)]
        made, tokens = runs[0][2]
        results.append((name, made, tokens, made / min(r[0] for r in runs), made / min(r[1] for r in runs)))
    table = Table(title=f"GRPO rollouts on {recipe.model} ({options.tokens} new tokens max, best of {REPEATS})")
    columns = ("rollouts", "completions", "tokens", "per s wall", "per s CPU", "batched/this wall", "batched/this CPU")
    for column in columns:
        table.add_column(column)
    wall, cpu = results[0][3], results[0][4]
    for name, made, tokens, per_wall, per_cpu in results:
        ratios = f"{wall / per_wall:.2f}x", f"{cpu / per_cpu:.2f}x"
        table.add_row(name, str(made), str(tokens), f"{per_wall:.2f}", f"{per_cpu:.2f}", *ratios)
    Console().print(table)


if __name__ == "__main__":
    main()
