"""A real GRPO batch with a real tool turn (slow): TRL masks exactly the tool-returned tokens out of the loss.

A tiny Qwen2-VL is first taught, by a few hundred SFT steps on one trajectory, to answer the DeepEyes prompt with
a valid ``image_zoom_in_tool`` call and, after the crop, an ``<answer>``. GRPO then samples (temperature 0.05) with
the zoom environment; the batch the loss sees is recorded and its ``tool_mask`` checked against the tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow

CALL = {"bbox_2d": [0, 0, 500, 500]}


def memorise_trajectory(model_dir: Path, image: Image.Image, question: str) -> None:
    """SFT the tiny model on one zoom trajectory (tool schema in the system turn, as TRL renders GRPO prompts)."""
    from transformers import AutoModelForImageTextToText

    from foveate.policies.loading import load_processor
    from foveate.protocol import DEEPEYES_SUFFIX
    from foveate.rl.sft import ChatCollator
    from foveate.rl.zoom_env import zoom_tool_schema

    processor = load_processor(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    crop = image.crop((0, 0, image.width // 2, image.height // 2))
    call = {"type": "function", "function": {"name": "image_zoom_in_tool", "arguments": CALL}}
    example = {
        "tools": [zoom_tool_schema()],
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": question + DEEPEYES_SUFFIX}],
            },
            {"role": "assistant", "content": "<think>zoom</think>\n", "tool_calls": [call]},
            {"role": "tool", "content": [{"type": "image", "image": crop}]},
            {"role": "assistant", "content": "<think>seen</think>\n<answer>red</answer>"},
        ],
    }
    batch = ChatCollator(processor, max_length=1024)([example])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(300):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if loss.item() < 0.01:
            break
    model.save_pretrained(model_dir)


def test_tool_returned_tokens_are_masked(tmp_path):
    from foveate.policies.tiny import TinyConfig, build_tiny_model
    from foveate.rl.deepeyes_grpo import GRPORecipe, build_trainer

    image = Image.new("RGB", (448, 448), (200, 200, 200))
    image.paste((220, 30, 30), (40, 40, 120, 120))
    image.save(tmp_path / "scene.png")
    question = "What color is the square?"
    task = {"id": "t0", "image": "scene.png", "question": question, "answers": ["red"], "family": "attribute"}
    (tmp_path / "tasks.jsonl").write_text(json.dumps(task) + "\n")
    model_dir = build_tiny_model(tmp_path / "tiny", TinyConfig(), seed=0)
    memorise_trajectory(model_dir, image, question)

    recipe = GRPORecipe(
        model=str(model_dir), data=str(tmp_path / "tasks.jsonl"), n_items=1, batch_size=2, num_generations=2,
        max_completion_length=256, temperature=0.05, max_steps=1, save_steps=100, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    trainer = build_trainer(recipe, recipe.output_dir)
    seen = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    trainer.train()
    batch = seen[0]
    assert "tool_mask" in batch, "no rollout made a tool call: the memorised trajectory was not followed"
    tokenizer = trainer.processing_class.tokenizer
    zoomed = 0
    for row in range(batch["completion_ids"].shape[0]):
        ids = batch["completion_ids"][row][batch["completion_mask"][row].bool()]
        mask = batch["tool_mask"][row][batch["completion_mask"][row].bool()]
        if mask.all():
            continue
        zoomed += 1
        masked = tokenizer.decode(ids[mask == 0])
        kept = tokenizer.decode(ids[mask == 1])
        assert "<tool_response>" in masked and "<|image_pad|>" in masked  # the crop came back, masked
        assert "<tool_call>" in kept and "image_zoom_in_tool" in kept  # the model's own call is trained on
        assert "<answer>" in kept and "<tool_response>" not in kept  # so is its answer after the crop
        # The masked tokens are one contiguous block between the call and the answer.
        zeros = (mask == 0).nonzero().flatten()
        assert zeros[-1] - zeros[0] + 1 == len(zeros)
    assert zoomed >= 1
    records = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["tool_use_rate"] > 0
