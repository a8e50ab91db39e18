"""DeepEyes GRPO: reinforce zooming with a tool on TRL's `GRPOTrainer` (RESEARCH.md §2).

    foveate train grpo --config configs/rl/deepeyes.yaml [--max-steps 3 --output-dir OUT] [--ray-workers 2]

Paper: "DeepEyes: Incentivizing 'Thinking with Images' via Reinforcement Learning". Each prompt is a task item in
the ``deepeyes`` strategy's format (image + question + ``protocol.DEEPEYES_SUFFIX``); TRL samples
``num_generations`` rollouts per prompt, each with its own `ZoomEnvironment`. The model's ``<tool_call>`` of
``image_zoom_in_tool`` runs `ZoomEnvironment.image_zoom_in_tool`, which crops the ORIGINAL image by DeepEyes'
validity rules with the very code the ``deepeyes`` strategy runs (``agents.zoom_tool.run_zoom``: the box in the
policy's convention, clipped to the image, short side > 30 px, aspect ≤ 100) and returns the crop as an image,
which TRL feeds to the next turn; refusals come back as text ``Error: …``. At most ``max_tool_turns`` (5) tool
turns per rollout (``GRPOConfig.max_tool_calling_iterations``). Tokens the tool returned are masked out of the
loss by TRL (its ``tool_mask``; `tests/test_rl_grpo.py` checks it on a real batch). Rewards: `rl.rewards`
(``0.8·acc + 0.2·fmt + 1.2·tool``, as ``reward_weights``; TRL logs each part).

Warm start (``warm_start`` / ``--warm-start configs/rl/deepeyes-warmstart.yaml``): sampled freely, the demo model
writes no valid tool call (RESEARCH.md §7), so every rollout of a group gets the same tool reward and GRPO has
nothing to reinforce; DeepEyes starts from a model that can call the tool. The warm start is an ``rl.sft`` run on
zoom trajectories built from world items with the ground-truth box (``rl.sft_data.deepeyes`` with
``deepeyes_tools``: the tool schema in a system turn, exactly as TRL renders GRPO prompts) into
``<output_dir>/warm-start``; GRPO then starts from that model.

Deviations from the paper: the demo model writes boxes in 0–1000 (``box_convention``), DeepEyes' Qwen2.5-VL in
pixels; TRL puts the tool's JSON schema in a system turn (the ``deepeyes`` strategy sends none, since the demo model
was trained without one); accuracy is the task's exact answer rule instead of an LLM judge; default learning rate and
batch sizes fit a 2-core CPU (the YAML says what to use on a GPU box).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from foveate.policies.base import check_box_convention
from foveate.protocol import DEEPEYES_SUFFIX
from foveate.rl import rewards
from foveate.rl.runs import (
    TRAIN_WORLD_SEED,
    MetricsCallback,
    RunRecipe,
    help_field,
    load_model_and_processor,
    load_rows,
    prepare_run_dir,
)
from foveate.rl.zoom_env import ZoomEnvironment, environment_factory, zoom_tool_schema  # noqa: F401 (re-exported)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # environment_factory is marked experimental in TRL 1.16


@dataclass
class GRPORecipe(RunRecipe):
    """A DeepEyes GRPO run (configs/rl/deepeyes.yaml). Every field has help text; CLI flags override."""

    seed: int = help_field(0, "seed of the trainer (sampling, shuffling, initialisation)")
    output_dir: str = help_field("runs/deepeyes-grpo", "run directory: checkpoints, model/, metrics.jsonl, config")
    max_steps: int = help_field(50, "optimiser steps")
    batch_size: int = help_field(4, "completions per device per step (a multiple of num_generations)")
    num_generations: int = help_field(4, "rollouts per prompt (DeepEyes: 16)")
    max_completion_length: int = help_field(128, "tokens per rollout, tool-returned tokens included")
    max_tool_turns: int = help_field(5, "tool turns per rollout (DeepEyes: 5)")
    temperature: float = help_field(1.0, "sampling temperature of the rollouts")
    learning_rate: float = help_field(1e-5, "peak learning rate (DeepEyes on Qwen2.5-VL-7B: 1e-6)")
    beta: float = help_field(0.0, "KL coefficient to the reference model (DeepEyes: 0, no KL)")
    box_convention: str = help_field("thousand", "how the model writes bbox_2d: thousand, normalized or pixels")
    use_vllm: bool = help_field(False, "generate rollouts with vLLM (GPU; pip install vllm)")
    warm_start: str | None = help_field(
        None,
        "an SFT recipe (configs/rl/deepeyes-warmstart.yaml) run first into <output_dir>/warm-start; GRPO starts there",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_box_convention(self.box_convention)
        if self.box_convention == "resized":
            raise ValueError("box_convention 'resized' needs a policy's resized input size; use pixels/thousand")
        if self.batch_size % self.num_generations:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of num_generations {self.num_generations}"
            )


def prompt_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Task rows → GRPO dataset rows: a conversational prompt in the ``deepeyes`` strategy's format, the image, and
    the columns the rewards read (answers, family, preset, boxes, image_size, and for multiple choice scoring and
    options: "" and [] on other rows, as a dataset column holds one type)."""
    from PIL import Image

    from foveate.tools.images import load_image

    out = []
    for row in rows:
        image = row["image"] if isinstance(row["image"], Image.Image) else load_image(row["image"])
        prompt = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": row["question"] + DEEPEYES_SUFFIX}],
            }
        ]
        out.append(
            {
                "prompt": prompt,
                "image": image,
                "answers": list(row["answers"]),
                "family": row.get("family") or "",
                "preset": row.get("preset") or "",
                "boxes": [list(map(float, b)) for b in row.get("boxes") or []],
                "image_size": list(image.size),
                "scoring": row.get("scoring") or "",
                "options": list(row.get("options") or []),
            }
        )
    return out


def grpo_args(recipe: GRPORecipe, output_dir: str, on_ray: bool = False):
    """TRL's `GRPOConfig` for the recipe (CPU-safe defaults; bf16/vLLM only when the recipe asks)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir,
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.batch_size,
        num_generations=recipe.num_generations,
        max_completion_length=recipe.max_completion_length,
        max_tool_calling_iterations=recipe.max_tool_turns,
        temperature=recipe.temperature,
        learning_rate=recipe.learning_rate,
        beta=recipe.beta,
        reward_weights=list(rewards.WEIGHTS.values()),
        logging_steps=recipe.logging_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        seed=recipe.seed,
        bf16=recipe.bf16,
        use_cpu=not recipe.use_gpu,
        use_vllm=recipe.use_vllm,
        report_to=[],
        disable_tqdm=False,
        ddp_find_unused_parameters=False if on_ray else None,
        dataloader_num_workers=0,
    )


def build_trainer(recipe: GRPORecipe, output_dir: str, on_ray: bool = False, callbacks: list | None = None):
    """The `GRPOTrainer` of a run (model, processor, dataset, environment, rewards, callbacks)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    model, processor = load_model_and_processor(recipe.model, tool_calling=True)
    rows = load_rows(recipe.data, recipe.n_items, TRAIN_WORLD_SEED, recipe.families or None)
    dataset = Dataset.from_list(prompt_rows(rows))
    return GRPOTrainer(
        model=model,
        reward_funcs=list(rewards.REWARD_FUNCS),
        args=grpo_args(recipe, output_dir, on_ray),
        train_dataset=dataset,
        processing_class=processor,
        environment_factory=environment_factory(recipe.box_convention),
        callbacks=[MetricsCallback(output_dir), *(callbacks or [])],
    )


def train_worker(config: dict[str, Any]) -> None:
    """Train (or resume) one run in this process; on Ray, every worker runs this with the same config."""
    from foveate.rl.ray_train import RankZeroReport, resume_checkpoint

    config = dict(config)
    output_dir, on_ray, resume = config.pop("output_dir"), config.pop("on_ray", False), config.pop("resume", False)
    recipe = GRPORecipe(**config)
    trainer = build_trainer(recipe, output_dir, on_ray, [RankZeroReport()] if on_ray else None)
    with resume_checkpoint(output_dir, resume, on_ray) as checkpoint:
        trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.is_world_process_zero():
        trainer.save_model(str(Path(output_dir) / "model"))


def warm_start(recipe: GRPORecipe, out: Path) -> str:
    """Run the warm-start SFT recipe from ``recipe.model`` into ``<out>/warm-start`` (once; reused on resume)."""
    from foveate.rl.sft import load_recipe, train_sft

    target = out / "warm-start"
    if not (target / "config.json").is_file():
        sft = load_recipe(recipe.warm_start)
        sft.output_dir, sft.init_from = str(target), sft.init_from or recipe.model
        train_sft(sft)
    return str(target)


def train(recipe: GRPORecipe, resume: bool = False) -> Path:
    """Run a recipe locally or on Ray Train (``ray_workers`` ≥ 1); returns the run directory."""
    out = prepare_run_dir(recipe.output_dir, recipe, resume)
    if recipe.warm_start:
        recipe = replace(recipe, model=warm_start(recipe, out), warm_start=None)
    from foveate.rl.ray_train import train_here_or_on_ray

    return train_here_or_on_ray(train_worker, recipe, out, resume, name="deepeyes-grpo")
