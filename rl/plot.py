"""``foveate plot RUN_DIR``: PNG curves of a training run's metrics.jsonl (matplotlib, no display needed).

One PNG per group of related metrics (reward and its parts; tool use and accuracy; loss, KL and grad norm;
learning rate; DPO's reward margins and accuracies), each metric against the optimiser step, one line per stage for
runs with stages (VisRL DPO). A metric that never appears in the run is skipped; a group with none is not drawn.
"""

from __future__ import annotations

from pathlib import Path

from foveate.errors import FoveateError
from foveate.rl.runs import read_metrics

GROUPS = {
    "reward": ["reward", "rewards/accuracy_reward/mean", "rewards/format_reward/mean", "rewards/tool_reward/mean"],
    "tools": ["tool_use_rate", "tools/call_frequency", "tools/failure_frequency", "rewards/accuracy_reward/mean"],
    "loss": ["loss", "kl", "grad_norm", "entropy"],
    "lr": ["learning_rate"],
    "dpo": ["rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"],
}


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``plot-<group>.png`` files for a run (into ``out_dir``, default the run directory); return them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run_dir) if "train_runtime" not in r]
    if not records:
        raise FoveateError(f"{run_dir}: metrics.jsonl holds no step records yet")
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = sorted({r.get("stage", "") for r in records})
    written = []
    for group, names in GROUPS.items():
        present = [name for name in names if any(name in r for r in records)]
        if not present:
            continue
        figure, axes = plt.subplots(len(present), 1, figsize=(7, 2.2 * len(present)), squeeze=False)
        for axis, name in zip(axes[:, 0], present, strict=True):
            for stage in stages:
                points = [(r["step"], r[name]) for r in records if r.get("stage", "") == stage and name in r]
                if points:
                    steps, values = zip(*points, strict=True)
                    axis.plot(steps, values, marker=".", label=stage or None)
            axis.set_ylabel(name.replace("rewards/", "").replace("/mean", ""), fontsize=8)
            axis.grid(alpha=0.3)
            if len(stages) > 1:
                axis.legend(fontsize=7)
        axes[-1, 0].set_xlabel("step")
        figure.suptitle(f"{Path(run_dir).name}: {group}")
        figure.tight_layout()
        path = out / f"plot-{group}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written
