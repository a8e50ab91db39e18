"""The SFT recipe: assistant-only labels, the example stream, the vision auxiliary targets, and a real (tiny)
Trainer run through `train_sft` with the auxiliary heads, saved as a plain Qwen2-VL checkpoint."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from foveate.rl import vision_aux
from foveate.rl.sft import IGNORE, ChatCollator, SFTRecipe, Stage, TrainConfig, load_recipe, train_sft
from foveate.rl.sft_data import DataMix, example_stream
from foveate.world.scenes import Scene, WorldObject


@pytest.fixture(scope="module")
def collator(tiny_model_dir: Path) -> ChatCollator:
    from foveate.policies.loading import load_processor

    return ChatCollator(load_processor(tiny_model_dir), max_length=512, aux_targets=True)


def _scene(objects: list[WorldObject]) -> Scene:
    return Scene(id="s", width=224, height=224, background="light gray", clutter="none", objects=objects)


def test_labels_cover_assistant_turns_only(collator: ChatCollator) -> None:
    image = Image.new("RGB", (224, 224), "red")
    chat = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What color?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the shape?"},
        {"role": "assistant", "content": "circle"},
    ]
    batch = collator([{"messages": chat}])
    labelled = batch["input_ids"][0][batch["labels"][0] != IGNORE]
    assert collator.tokenizer.decode(labelled) == "red<|im_end|>circle<|im_end|>"


def test_one_format_mix_streams_and_is_seeded() -> None:
    mix = DataMix(formats={"qa": 1.0}, presets={"single": 1.0})
    first = list(itertools.islice(example_stream(3, mix), 6))
    again = list(itertools.islice(example_stream(3, mix), 6))
    assert {example["format"] for example in first} == {"qa"}
    assert [e["messages"][0]["content"][-1]["text"] for e in first] == [
        e["messages"][0]["content"][-1]["text"] for e in again
    ]
    assert all(isinstance(example["scene"], Scene) and len(example["scene"].objects) == 1 for example in first)


def test_cell_targets_label_covered_empty_and_ambiguous_cells() -> None:
    # 224 px scene, 4×4 grid of 56-px cells: a square filling cell (0, 0) and half of cell (1, 1)'s width, and a
    # tiny circle inside cell (3, 3).
    square = WorldObject(id="o0", shape="square", color="blue", size_class="large", box=[0, 0, 56, 56])
    half = WorldObject(id="o1", shape="triangle", color="red", size_class="medium", box=[56, 56, 84, 112])
    tiny = WorldObject(id="o2", shape="circle", color="green", size_class="tiny", box=[180, 180, 186, 186])
    colors, shapes = vision_aux.cell_targets(_scene([square, half, tiny]), 4, 4)
    colors, shapes = colors.reshape(4, 4), shapes.reshape(4, 4)
    assert colors[0, 0] == vision_aux.COLOR_CLASSES.index("blue")
    assert shapes[0, 0] == vision_aux.SHAPE_CLASSES.index("square")
    # A triangle in half the cell covers about a quarter of it: below min_cover 0.3, and not empty -> ignored.
    assert colors[1, 1] == IGNORE and shapes[1, 1] == IGNORE
    assert colors[3, 3] == IGNORE  # a tiny object is never called background
    assert colors[0, 3] == 0 and shapes[2, 0] == 0  # empty cells are background
    big = WorldObject(id="o3", shape="triangle", color="red", size_class="large", box=[56, 56, 112, 112])
    colors, _ = vision_aux.cell_targets(_scene([big]), 4, 4)
    assert colors.reshape(4, 4)[1, 1] == vision_aux.COLOR_CLASSES.index("red")  # a triangle covers half its box


def test_batch_targets_follow_the_processor_grid_and_skip_crops(collator: ChatCollator) -> None:
    mix = DataMix(formats={"qa_crop": 1.0}, presets={"simple": 1.0})
    examples = list(itertools.islice(example_stream(0, mix), 2))
    batch = collator(examples)
    grid = batch["image_grid_thw"]
    tokens_per_image = (grid.prod(dim=1) // 4).tolist()
    assert batch["aux_color"].shape[0] == sum(tokens_per_image) == (batch["input_ids"] == 5).sum()
    # images: scene, crop, scene, crop -> the crops' tokens are all ignored, the scenes' are not.
    spans = np.split(batch["aux_color"].numpy(), np.cumsum(tokens_per_image)[:-1])
    assert [bool((span != IGNORE).any()) for span in spans] == [True, False, True, False]


def test_recipe_stage_overrides_and_demo_recipe_parses(tmp_path: Path) -> None:
    recipe = load_recipe(Path(__file__).parents[1] / "configs" / "demo.yaml")
    first, last = recipe.all_stages()[0], recipe.all_stages()[-1]
    assert first.train.aux_weight > 0 and "single" in first.data.presets
    assert last.train.max_steps == recipe.train.max_steps and last.data.formats == recipe.data.formats


def test_train_sft_with_aux_heads_saves_a_plain_qwen2vl(tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from foveate.policies.tiny import TinyConfig

    train = TrainConfig(
        max_steps=2,
        batch_size=2,
        warmup_steps=0,
        logging_steps=1,
        dataloader_workers=0,
        aux_weight=1.0,
        learning_rate=1e-3,
    )
    mix = DataMix(formats={"qa": 1.0, "ground": 1.0}, presets={"simple": 1.0})
    recipe = SFTRecipe(
        output_dir=str(tmp_path / "out"),
        model=TinyConfig(),
        save_dtype="float32",
        stages=[Stage(mix, train), Stage(mix, TrainConfig(**{**train.__dict__, "aux_weight": 0.0}))],
    )
    out = train_sft(recipe, workdir=tmp_path / "work")
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert not [name for name in weights.keys() if "aux" in name]  # noqa: SIM118 (safe_open has no __iter__)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert not hasattr(model, "foveate_aux") and model.config.model_type == "qwen2_vl"
    stage1_log = json.loads((tmp_path / "work" / "stage1" / "training_log.json").read_text())
    assert len(stage1_log) == 2 and all(np.isfinite(row["loss"]) for row in stage1_log)
    # The stage-1 weights moved (the aux heads' gradient reaches the vision tower).
    initial = AutoModelForImageTextToText.from_pretrained(tmp_path / "work" / "stage1.work" / "init")
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "work" / "stage1")
    before = initial.model.visual.patch_embed.proj.weight
    assert not torch.equal(before, trained.model.visual.patch_embed.proj.weight)


def test_aux_loss_balances_object_and_background_cells() -> None:
    heads = vision_aux.VisionAuxHeads(hidden_size=4)
    torch.manual_seed(0)
    features = torch.randn(5, 4)
    colors = torch.tensor([0, 0, 0, 3, IGNORE])  # three background cells, one object cell, one ignored
    shapes = torch.tensor([0, 0, 0, 2, IGNORE])
    per_cell = [
        torch.nn.functional.cross_entropy(head(features[:4]), targets[:4], reduction="none")
        for head, targets in ((heads.color, colors), (heads.shape, shapes))
    ]
    heads.merged = features
    plain = heads.loss(colors, shapes)
    assert plain.item() == pytest.approx(sum(cells.mean().item() for cells in per_cell), rel=1e-5)
    heads.merged = features
    balanced = heads.loss(colors, shapes, background_weight=0.25)
    expected = sum(cells[3].item() + 0.25 * cells[:3].mean().item() for cells in per_cell)
    assert balanced.item() == pytest.approx(expected, rel=1e-5)
    heads.merged = features
    nothing = torch.full((5,), IGNORE)
    assert heads.loss(nothing, nothing, background_weight=0.25).item() == 0.0  # no NaN from an empty mean
    with pytest.raises(RuntimeError, match="do not match"):
        heads.loss(colors, shapes)  # the merged tokens are consumed by each loss
