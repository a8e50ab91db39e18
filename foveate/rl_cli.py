"""``foveate train grpo``, ``foveate train dpo`` and ``foveate plot``: the RL recipes' command line.

    foveate train grpo --config configs/rl/deepeyes.yaml [--model DIR_OR_ID] [--data world:small-detail|tasks.jsonl]
                       [--output-dir OUT] [--max-steps N] [--resume] [--ray-workers N] [--ray-address ADDR]
    foveate train dpo  --config configs/rl/visrl.yaml    (the same flags)
    foveate plot RUN_DIR                                   (writes RUN_DIR/plot-*.png)

Kept out of ``foveate/cli.py`` so the recipes' flags live beside each other; ``cli.py`` mounts these functions.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import typer

from foveate.errors import FoveateError


def _config_path(path: Path) -> Path:
    """A config path as given, else the packaged copy (``configs/rl/x.yaml`` works outside a checkout too)."""
    if path.exists() or path.is_absolute():
        return path
    packaged = resources.files("foveate.configs").joinpath(*Path(path).parts[1:])
    if Path(str(packaged)).is_file():
        return Path(str(packaged))
    raise FoveateError(f"config not found: {path}")


def _overrides(model, data, output_dir, max_steps, ray_workers, ray_address) -> dict:  # noqa: ANN001
    return {
        "model": model,
        "data": data,
        "output_dir": str(output_dir) if output_dir else None,
        "max_steps": max_steps,
        "ray_workers": ray_workers,
        "ray_address": ray_address,
    }


MODEL = typer.Option(None, "--model", "-m", help="model directory or cached Hub id (default: the config's, the demo)")
DATA = typer.Option(None, "--data", help="world:<preset> (training seed) or a tasks.jsonl (default: the config's)")
OUTPUT = typer.Option(None, "--output-dir", help="run directory (checkpoints, model/, metrics.jsonl, config.yaml)")
STEPS = typer.Option(None, "--max-steps", help="optimiser steps (DPO: of each stage)")
RESUME = typer.Option(False, "--resume", help="continue the run in --output-dir from its last checkpoint")
WORKERS = typer.Option(None, "--ray-workers", help="train on N Ray Train workers (0: in this process)")
ADDRESS = typer.Option(None, "--ray-address", help="an existing Ray cluster (e.g. 10.0.0.5:6379); default: local")


def train_grpo(
    config: Path = typer.Option(Path("configs/rl/deepeyes.yaml"), "--config", help="GRPO recipe YAML"),
    model: str = MODEL,
    data: str = DATA,
    output_dir: Path = OUTPUT,
    max_steps: int = STEPS,
    resume: bool = RESUME,
    ray_workers: int = WORKERS,
    ray_address: str = ADDRESS,
    warm_start: Path = typer.Option(
        None, "--warm-start", help="SFT recipe run first (configs/rl/deepeyes-warmstart.yaml)"
    ),
) -> None:
    """DeepEyes GRPO: reinforce zooming with image_zoom_in_tool (TRL GRPOTrainer; Ray Train with --ray-workers)."""
    from foveate.rl.deepeyes_grpo import GRPORecipe, train
    from foveate.rl.runs import load_config

    overrides = _overrides(model, data, output_dir, max_steps, ray_workers, ray_address)
    overrides["warm_start"] = str(_config_path(warm_start)) if warm_start else None
    recipe = load_config(GRPORecipe, _config_path(config), overrides)
    typer.echo(f"run written to {train(recipe, resume=resume)}")


def train_dpo(
    config: Path = typer.Option(Path("configs/rl/visrl.yaml"), "--config", help="DPO recipe YAML"),
    model: str = MODEL,
    data: str = DATA,
    output_dir: Path = OUTPUT,
    max_steps: int = STEPS,
    resume: bool = RESUME,
    ray_workers: int = WORKERS,
    ray_address: str = ADDRESS,
) -> None:
    """VisRL DPO: self-generated focus preferences, then two DPO stages (TRL DPOTrainer; Ray with --ray-workers)."""
    from foveate.rl.runs import load_config
    from foveate.rl.visrl_dpo import DPORecipe, train

    overrides = _overrides(model, data, output_dir, max_steps, ray_workers, ray_address)
    recipe = load_config(DPORecipe, _config_path(config), overrides)
    typer.echo(f"run written to {train(recipe, resume=resume)}")


def plot_command(
    run_dir: Path = typer.Argument(..., help="a training run directory (holds metrics.jsonl)"),
    out: Path = typer.Option(None, "--out", help="where to write the PNGs (default: RUN_DIR)"),
) -> None:
    """Write PNG curves of a training run's metrics (reward and parts, tool use, loss/KL, lr)."""
    from foveate.rl.plot import plot_run

    for path in plot_run(run_dir, out):
        typer.echo(str(path))
