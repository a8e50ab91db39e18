"""The SFT recipe: assistant-only labels, the example stream, the vision auxiliary targets, and a real (tiny)
Trainer run through `train_sft` with the auxiliary heads, saved as a plain Qwen2-VL checkpoint."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from aux_heads import check_needs_target, fit_on_batch
from PIL import Image

from foveate.errors import FoveateError
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
    assert shapes[0, 0] == vision_aux.CELL_SHAPE_CLASSES.index("square")
    # A triangle in half the cell covers about a quarter of it: below min_cover 0.3, and not empty -> ignored.
    assert colors[1, 1] == IGNORE and shapes[1, 1] == IGNORE
    assert colors[3, 3] == IGNORE  # a tiny object is never called background
    assert colors[0, 3] == 0 and shapes[2, 0] == 0  # empty cells are background
    big = WorldObject(id="o3", shape="triangle", color="red", size_class="large", box=[56, 56, 112, 112])
    colors, _ = vision_aux.cell_targets(_scene([big]), 4, 4)
    assert colors.reshape(4, 4)[1, 1] == vision_aux.COLOR_CLASSES.index("red")  # a triangle covers half its box


def test_the_shipped_heads_learn_from_a_batch_and_need_their_targets(collator: ChatCollator) -> None:
    """The demo recipe's heads (word-aligned, shape per object and per cell): the per-cell shape head's loss falls
    on a fixed batch, and the loss refuses a batch without its targets."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(collator.processor.tokenizer.name_or_path)
    heads = vision_aux.attach(model, "both", "all", collator.tokenizer)
    assert heads.cell_shape is not None and heads.cell_shape.token_ids.shape[0] == len(vision_aux.CELL_SHAPE_CLASSES)
    examples = list(itertools.islice(example_stream(0, DataMix(formats={"qa": 1.0}, presets={"simple": 1.0})), 4))
    batch = collator(examples)
    targets = {key: batch.pop(key) for key in vision_aux.TARGET_KEYS}
    assert (targets["aux_cell_shape"] > 0).any()

    def cell_shape_loss(merged: torch.Tensor) -> torch.Tensor:
        logits = heads.cell_shape(merged)
        return torch.nn.functional.cross_entropy(logits, targets["aux_cell_shape"], ignore_index=IGNORE)

    losses = fit_on_batch(model, heads, heads.cell_shape, batch, cell_shape_loss)
    assert losses[-1] < losses[0]
    check_needs_target(model, heads, batch, targets, "aux_cell_shape")


def test_object_members_label_objects_that_fill_some_cell() -> None:
    # 224 px scene, 4×4 grid of 56-px cells: a square over four cells' corners, a triangle covering a quarter of
    # one cell (about 1/8 of it: below min_cover, not labelled), a tiny circle (not labelled).
    square = WorldObject(id="o0", shape="square", color="blue", size_class="large", box=[28, 28, 84, 84])
    small = WorldObject(id="o1", shape="triangle", color="red", size_class="medium", box=[168, 0, 196, 28])
    tiny = WorldObject(id="o2", shape="circle", color="green", size_class="tiny", box=[180, 180, 186, 186])
    members, shapes = vision_aux.object_members(_scene([square, small, tiny]), 4, 4, min_cover=0.2)
    assert shapes.tolist() == [vision_aux.SHAPE_CLASSES.index("square")]
    assert np.flatnonzero(members[0]).tolist() == [0, 1, 4, 5]  # a quarter of each of four cells
    assert not vision_aux.object_members(_scene([square]), 4, 4, min_cover=0.3)[1].size  # 25 % < 30 %


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
    assert batch["aux_cell_shape"].shape == batch["aux_color"].shape
    members = batch["aux_members"].numpy()
    assert members.shape == (len(batch["aux_shape"]), sum(tokens_per_image)) and members.any(axis=1).all()
    member_spans = np.split(members, np.cumsum(tokens_per_image)[:-1], axis=1)
    assert not member_spans[1].any() and not member_spans[3].any()  # no object lives in a crop's tokens


def test_a_stage_lists_only_what_changes_and_inherits_the_rest(tmp_path: Path) -> None:
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        "data: {formats: {qa: 2.0, ground: 1.0}, presets: {simple: 1.0}}\n"
        "train: {max_steps: 50, learning_rate: 0.001, aux_weight: 0.5}\n"
        "stages:\n"
        "  - train: {vision_only: true, aux_weight: 1.0}\n"
        "    data: {one_per_scene: true}\n"
        "  - {}\n"
    )
    first, second = load_recipe(recipe_file).all_stages()
    assert first.train.vision_only and first.train.aux_weight == 1.0 and first.train.max_steps == 50
    assert first.data.one_per_scene and first.data.formats == {"qa": 2.0, "ground": 1.0}
    assert second.train == TrainConfig(max_steps=50, learning_rate=0.001, aux_weight=0.5)
    assert second.data == DataMix(formats={"qa": 2.0, "ground": 1.0}, presets={"simple": 1.0})


def test_a_retired_experiment_setting_loads_when_off_and_is_refused_when_on(tmp_path: Path) -> None:
    """A saved recipe (a model's foveate_recipe.json) lists every setting, retired ones at their "off" value."""
    off, on = tmp_path / "off.yaml", tmp_path / "on.yaml"
    off.write_text("model: {box_tokens: false}\ntrain: {aux_box: false, attn_away_layers: []}\n")
    assert load_recipe(off).train == TrainConfig()
    on.write_text("stages:\n  - train: {aux_size: true}\n")
    with pytest.raises(FoveateError, match="train.aux_size was an experiment's setting"):
        load_recipe(on)


def test_the_demo_recipe_pretrains_vision_then_widens_its_questions_stage_by_stage() -> None:
    """configs/demo.yaml as its header describes it: vision pretraining, colour on one object, every question on
    one object, 1-4 objects with attention supervision, the full mix, the focus stage, then zoom items, reworded
    questions and the role / program formats."""
    stages = load_recipe(Path(__file__).parents[1] / "configs" / "demo.yaml").all_stages()
    assert len(stages) == 7
    vision, colour, single, few, full, focus, zoom = stages
    assert vision.train.vision_only and vision.train.aux_weight > 0 and vision.data.one_per_scene
    assert colour.data.questions == ("attribute/color",) and colour.data.presets == {"single": 1.0}
    assert single.data.questions == () and single.data.presets == {"single": 1.0}
    assert few.train.attn_weight > 0 and few.train.attn_layers == [0] and few.data.chat_turns == 6
    assert not any(stage.train.attn_weight for stage in (vision, colour, single, full, focus))
    assert all(stage.data.look_first and stage.train.aux_shape == "both" for stage in stages)
    assert focus.data.family_weights["attribute"] > focus.data.family_weights["counting"]
    assert not focus.data.second_format and full.data.second_format
    assert zoom.data.presets["zoom"] > 0 and zoom.data.phrasings > 0 and zoom.data.crop_small_details
    assert {"proreason", "program", "qa_crop", "deepeyes", "visrl"} <= set(zoom.data.formats)
    # Each stage its own seed, so no two stages draw the same example stream.
    assert len({stage.train.seed for stage in stages}) == len(stages)


def test_train_sft_with_aux_heads_saves_a_plain_qwen2vl(tmp_path: Path, quick_train) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from foveate.policies.tiny import TinyConfig

    train = quick_train(aux_weight=1.0, learning_rate=1e-3)
    mix = DataMix(formats={"qa": 1.0, "ground": 1.0}, presets={"simple": 1.0})
    # The schedule spans 4 steps; stop_after_steps ends the stage after 2 (as a recorded time-limit stop would).
    vision_pretraining = TrainConfig(**{**train.__dict__, "vision_only": True, "max_steps": 4, "stop_after_steps": 2})
    recipe = SFTRecipe(
        output_dir=str(tmp_path / "out"),
        model=TinyConfig(),
        save_dtype="float32",
        # Stage 1 is vision pretraining (the aux loss alone), stage 2 plain language-model training.
        stages=[
            Stage(DataMix(formats={"qa": 1.0}, presets={"large": 1.0}, one_per_scene=True), vision_pretraining),
            Stage(mix, TrainConfig(**{**train.__dict__, "aux_weight": 0.0})),
        ],
    )
    out = train_sft(recipe, workdir=tmp_path / "work")
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert not [name for name in weights.keys() if "aux" in name]  # noqa: SIM118 (safe_open has no __iter__)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert not hasattr(model, "foveate_aux") and model.config.model_type == "qwen2_vl"
    stage1_log = json.loads((tmp_path / "work" / "stage1" / "training_log.json").read_text())
    assert len(stage1_log) == 3 and all(np.isfinite(row["loss"]) for row in stage1_log[:2])
    assert stage1_log[-1] == {"step": 2, "ended": True}
    # Stage 1 moved the vision tower (the aux heads' gradient reaches it) and nothing of the language model.
    initial = AutoModelForImageTextToText.from_pretrained(tmp_path / "work" / "stage1.work" / "init")
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "work" / "stage1")
    before = initial.model.visual.patch_embed.proj.weight
    assert not torch.equal(before, trained.model.visual.patch_embed.proj.weight)
    language_before = initial.model.language_model.state_dict()
    for name, weight in trained.model.language_model.state_dict().items():
        assert torch.equal(weight, language_before[name]), name


def test_aligned_vision_pretraining_moves_only_the_tower_and_the_answer_words(tmp_path: Path, quick_train) -> None:
    from transformers import AutoModelForImageTextToText

    from foveate.policies.loading import load_processor

    train = quick_train(max_steps=1, learning_rate=1e-3, vision_only=True, aux_weight=1.0, aux_word_aligned="all")
    mix = DataMix(formats={"qa": 1.0}, presets={"large": 1.0}, one_per_scene=True)
    recipe = SFTRecipe(output_dir=str(tmp_path / "out"), save_dtype="float32", stages=[Stage(mix, train)])
    out = train_sft(recipe, workdir=tmp_path / "work")
    initial = AutoModelForImageTextToText.from_pretrained(tmp_path / "work" / "stage1.work" / "init")
    trained = AutoModelForImageTextToText.from_pretrained(out)
    tokenizer = load_processor(out).tokenizer
    words = vision_aux.word_ids(tokenizer, vision_aux.COLOR_CLASSES[1:] + vision_aux.SHAPE_CLASSES)
    embedding_before, embedding_after = initial.get_input_embeddings().weight, trained.get_input_embeddings().weight
    # The answer words move; every other row only by AdamW's weight decay (the tensor has a gradient), lr × 0.01.
    others = torch.ones(len(embedding_before), dtype=torch.bool)
    others[words] = False
    assert torch.allclose(embedding_after[others], embedding_before[others], rtol=1e-4, atol=0)
    assert not torch.allclose(embedding_after[words], embedding_before[words], rtol=1e-3, atol=0)
    language_before = initial.model.language_model.state_dict()
    for name, weight in trained.model.language_model.state_dict().items():
        if "embed_tokens" not in name:
            assert torch.equal(weight, language_before[name]), name


def test_one_per_scene_never_repeats_an_image() -> None:
    mix = DataMix(formats={"qa": 1.0, "ground": 1.0}, presets={"large": 1.0}, one_per_scene=True)
    scenes = [example["scene"].id for example in itertools.islice(example_stream(0, mix), 12)]
    assert len(set(scenes)) == 12
    repeated = [e["scene"].id for e in itertools.islice(example_stream(0, DataMix(presets={"large": 1.0})), 12)]
    assert len(set(repeated)) < 12  # the default: several examples per rendered scene


def test_question_kinds_filter_the_stream_by_family_or_subtype() -> None:
    colour = DataMix(formats={"qa": 1.0}, presets={"single": 1.0}, questions=("attribute/color",))
    questions = [e["messages"][0]["content"][-1]["text"] for e in itertools.islice(example_stream(0, colour), 8)]
    assert all(q.startswith("What color") for q in questions), questions
    either = DataMix(formats={"qa": 1.0}, presets={"single": 1.0}, questions=("attribute", "existence"))
    examples = itertools.islice(example_stream(0, either), 40)
    kinds = {example["messages"][0]["content"][-1]["text"].split()[0] for example in examples}
    assert kinds == {"What", "Is"}, kinds


def test_a_question_kind_no_scene_asks_is_an_error_not_a_hang(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown question families"):
        next(example_stream(0, DataMix(questions=("colour",))))
    misspelt = tmp_path / "recipe.yaml"  # a recipe fails when it is read, before any stage trains
    misspelt.write_text("stages:\n  - {}\n  - data: {questions: [atribute/color]}\n")
    with pytest.raises(FoveateError, match="bad recipe .*unknown question families"):
        load_recipe(misspelt)
    with pytest.raises(ValueError, match="no question of kinds"):
        next(example_stream(0, DataMix(presets={"single": 1.0}, questions=("attribute/colour",))))


def test_vision_only_needs_the_aux_loss(tmp_path: Path) -> None:
    recipe = SFTRecipe(output_dir=str(tmp_path / "out"), train=TrainConfig(vision_only=True, max_steps=1))
    with pytest.raises(FoveateError, match="aux_weight"):
        train_sft(recipe, workdir=tmp_path / "work")


def test_aux_loss_balances_colour_cells_and_max_pools_shape_per_object() -> None:
    heads = vision_aux.VisionAuxHeads(hidden_size=4)
    torch.manual_seed(0)
    features = torch.randn(5, 4)
    colors = torch.tensor([0, 0, 0, 3, IGNORE])  # three background cells, one object cell, one ignored
    members = torch.tensor([[False, False, False, True, True], [True, True, False, False, False]])
    shapes = torch.tensor([2, 5])
    no_objects = (torch.zeros((0, 5), dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    per_cell = torch.nn.functional.cross_entropy(heads.color(features[:4]), colors[:4], reduction="none")
    pooled = torch.stack([features[3:].amax(dim=0), features[:2].amax(dim=0)])
    shape_loss = torch.nn.functional.cross_entropy(heads.shape(pooled), shapes).item()
    heads.merged = features
    assert heads.loss(colors, *no_objects).item() == pytest.approx(per_cell.mean().item(), rel=1e-5)
    heads.merged = features
    balanced = heads.loss(colors, members, shapes, background_weight=0.25)
    expected = per_cell[3].item() + 0.25 * per_cell[:3].mean().item() + shape_loss
    assert balanced.item() == pytest.approx(expected, rel=1e-5)
    heads.merged = features
    nothing = torch.full((5,), IGNORE)
    assert heads.loss(nothing, *no_objects, background_weight=0.25).item() == 0.0  # no NaN from an empty mean
    with pytest.raises(RuntimeError, match="do not match"):
        heads.loss(colors, members, shapes)  # the merged tokens are consumed by each loss


def test_per_cell_shape_labels_balance_like_colour() -> None:
    heads = vision_aux.VisionAuxHeads(hidden_size=4, shape_labels="cell")
    torch.manual_seed(0)
    features = torch.randn(5, 4)
    colors = torch.tensor([0, 0, 0, 3, IGNORE])
    cell_shapes = torch.tensor([0, 0, 0, 2, IGNORE])
    no_objects = (torch.zeros((0, 5), dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    per_cell = [
        torch.nn.functional.cross_entropy(head(features[:4]), targets[:4], reduction="none")
        for head, targets in ((heads.color, colors), (heads.shape, cell_shapes))
    ]
    heads.merged = features
    balanced = heads.loss(colors, *no_objects, aux_cell_shape=cell_shapes, background_weight=0.25)
    expected = sum(cells[3].item() + 0.25 * cells[:3].mean().item() for cells in per_cell)
    assert balanced.item() == pytest.approx(expected, rel=1e-5)
    assert heads.shape.out_features == len(vision_aux.CELL_SHAPE_CLASSES)
    with pytest.raises(ValueError, match="shape_labels"):
        vision_aux.VisionAuxHeads(hidden_size=4, shape_labels="pixel")


def test_both_shape_labels_add_the_per_cell_term_to_the_per_object_one() -> None:
    torch.manual_seed(0)
    features = torch.randn(5, 4)
    colors = torch.tensor([0, 0, 0, 3, IGNORE])
    cell_shapes = torch.tensor([0, 0, 0, 2, IGNORE])
    members, shapes = torch.tensor([[False, False, False, True, True]]), torch.tensor([1])
    both = vision_aux.VisionAuxHeads(hidden_size=4, shape_labels="both")
    assert both.shape.out_features == len(vision_aux.SHAPE_CLASSES)
    assert both.cell_shape.out_features == len(vision_aux.CELL_SHAPE_CLASSES)

    def balanced_cells(head, targets):
        per_cell = torch.nn.functional.cross_entropy(head(features[:4]), targets[:4], reduction="none")
        return per_cell[3].item() + 0.25 * per_cell[:3].mean().item()

    object_term = torch.nn.functional.cross_entropy(both.shape(features[3:].amax(dim=0, keepdim=True)), shapes)
    expected = balanced_cells(both.color, colors) + balanced_cells(both.cell_shape, cell_shapes) + object_term.item()
    both.merged = features
    loss = both.loss(colors, members, shapes, aux_cell_shape=cell_shapes, background_weight=0.25)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    both.merged = features
    with pytest.raises(RuntimeError, match="aux_cell_shape"):
        both.loss(colors, members, shapes)


def test_a_three_by_three_merge_keeps_64_tokens_at_336_px(tmp_path: Path) -> None:
    """TinyConfig.merge_size reaches the vision config, the processor and the aux targets alike."""
    from transformers import AutoModelForImageTextToText

    from foveate.policies.loading import load_processor
    from foveate.policies.tiny import TinyConfig, build_tiny_model

    model_dir = build_tiny_model(tmp_path / "m3", TinyConfig(max_pixels=336 * 336, merge_size=3), seed=0)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = load_processor(model_dir)
    assert model.config.vision_config.spatial_merge_size == processor.image_processor.merge_size == 3
    collator = ChatCollator(processor, max_length=512, aux_targets=True)
    examples = list(itertools.islice(example_stream(0, DataMix(formats={"qa": 1.0}, presets={"simple": 1.0})), 2))
    batch = collator(examples)
    assert batch["image_grid_thw"].tolist() == [[1, 24, 24]] * 2  # a 672-px scene at 336 px: 24×24 patches
    assert (batch["input_ids"] == 5).sum(dim=1).tolist() == [64, 64]
    assert batch["aux_color"].shape[0] == 128 and (batch["aux_color"] != IGNORE).any()
    vision_aux.attach(model)
    targets = {key: batch.pop(key) for key in vision_aux.TARGET_KEYS}
    loss = model(**batch).loss + model.foveate_aux.loss(**targets)
    assert torch.isfinite(loss)


def test_a_question_first_model_sees_its_question_before_its_images(tmp_path: Path) -> None:
    """TinyConfig.question_first: training and inference both render a user turn's text before its images."""
    from transformers import AutoModelForImageTextToText

    from foveate.policies.loading import load_processor
    from foveate.policies.tiny import TinyConfig, build_tiny_model
    from foveate.policies.transformers_vlm import TransformersVLM

    model_dir = build_tiny_model(tmp_path / "qf", TinyConfig(question_first=True), seed=0)
    processor = load_processor(model_dir)
    image_pad, vision_start = processor.tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>"])
    mix = DataMix(formats={"qa_crop": 1.0}, presets={"simple": 1.0})
    examples = list(itertools.islice(example_stream(0, mix), 2))
    batch = ChatCollator(processor, max_length=512)(examples)
    for row, example in zip(batch["input_ids"].tolist(), examples, strict=True):
        question = example["messages"][-2]["content"][-1]["text"]  # the user turn: [scene, crop, question]
        question_ids = processor.tokenizer(question, add_special_tokens=False)["input_ids"]
        starts = [i for i in range(len(row)) if row[i : i + len(question_ids)] == question_ids]
        assert len(starts) == 1 and starts[0] + len(question_ids) == row.index(vision_start), "question, then images"
        assert sum(token == image_pad for token in row) > 0
    labelled = batch["labels"][0][batch["labels"][0] != IGNORE].tolist()
    assert processor.tokenizer.decode(labelled[:-1]) == examples[0]["messages"][-1]["content"]
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    assert torch.isfinite(model(**batch).loss)
    # The saved template is the one inference uses; a default model keeps the image first.
    policy = TransformersVLM(model_dir)
    question = examples[0]["messages"][-2]["content"][-1]["text"]
    prompt = policy.processor.apply_chat_template(examples[0]["messages"][:-1], tokenize=False)
    assert prompt.index(question) < prompt.index("<|vision_start|>")
    default = load_processor(build_tiny_model(tmp_path / "if", TinyConfig(), seed=0))
    default_prompt = default.apply_chat_template(examples[0]["messages"][:-1], tokenize=False)
    assert default_prompt.index("<|vision_start|>") < default_prompt.index(question)


def test_word_aligned_heads_score_classes_by_the_answer_words_embeddings(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from foveate.policies.tiny import build_tokenizer

    tokenizer = build_tokenizer()  # a fresh build: bare answer words are single tokens
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    heads = vision_aux.attach(model, aligned="all", tokenizer=tokenizer)
    embedding = model.get_input_embeddings()
    red = vision_aux.COLOR_CLASSES.index("red")
    red_word = embedding.weight[tokenizer("red", add_special_tokens=False)["input_ids"][0]]
    assert heads.color(red_word[None]).argmax().item() == red  # the word's own embedding scores its class
    # The shared embedding is not a parameter of the heads (saved or optimised twice), but the loss reaches it.
    assert all(parameter is not embedding.weight for parameter in heads.parameters())
    heads.merged = torch.stack([red_word.detach()] * 2)
    loss = heads.loss(torch.tensor([red, 0]), torch.zeros((0, 2), dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert embedding.weight.grad is not None and embedding.weight.grad.abs().sum() > 0
    shape_only = vision_aux.VisionAuxHeads(
        model.config.text_config.hidden_size, embedding=embedding, tokenizer=tokenizer, aligned="shape"
    )
    assert isinstance(shape_only.color, torch.nn.Linear) and isinstance(shape_only.shape, vision_aux.WordAlignedHead)
    # "both" with aligned heads: the per-cell shape head scores cells by the shape words too ("star" scores star).
    both = vision_aux.VisionAuxHeads(
        model.config.text_config.hidden_size, "both", embedding=embedding, tokenizer=tokenizer, aligned="all"
    )
    star = vision_aux.CELL_SHAPE_CLASSES.index("star")
    star_word = embedding.weight[tokenizer("star", add_special_tokens=False)["input_ids"][0]]
    assert isinstance(both.cell_shape, vision_aux.WordAlignedHead)
    assert both.cell_shape(star_word[None]).argmax().item() == star
    # A tokenizer that splits an answer word cannot align it: a clear error, not a silent first-piece match.
    split = build_tokenizer(bare_words=False)  # the v1 demo model's tokenizer
    with pytest.raises(ValueError, match="one token per class word"):
        vision_aux.word_ids(split, vision_aux.SHAPE_CLASSES)


def test_question_aligned_heads_pull_the_question_words_too(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from foveate.policies.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    heads = vision_aux.attach(model, aligned="question", tokenizer=tokenizer)
    embedding = model.get_input_embeddings()
    question_ids = vision_aux.question_word_ids(tokenizer, vision_aux.COLOR_CLASSES)
    red = vision_aux.COLOR_CLASSES.index("red")
    assert question_ids[0] is None and question_ids[red] == tokenizer(" red", add_special_tokens=False)["input_ids"]
    # A word of several tokens is scored by the mean of their embeddings.
    several = next(k for k, ids in enumerate(question_ids) if ids and len(ids) > 1)
    mean_word = embedding.weight[question_ids[several]].mean(dim=0)
    assert heads.question_heads[0](mean_word[None]).argmax().item() == several
    heads.merged = torch.stack([embedding.weight[question_ids[red][0]].detach()] * 2)
    loss = heads.loss(torch.tensor([red, 0]), torch.zeros((0, 2), dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    loss.backward()
    gradient = embedding.weight.grad.abs().sum(dim=1)
    answer_red = tokenizer("red", add_special_tokens=False)["input_ids"][0]
    assert gradient[question_ids[red][0]] > 0 and gradient[answer_red] > 0  # both spellings of "red" move


def test_demo_recipe_rebuilds_the_shipped_tokenizer() -> None:
    """configs/demo.yaml rebuilds the shipped demo model's tokenizer, vocabulary for vocabulary."""
    from foveate.policies.tiny import build_tokenizer

    recipe = load_recipe(Path(__file__).parents[1] / "configs" / "demo.yaml")
    rebuilt = build_tokenizer(recipe.model.vocab_size, recipe.model.bare_words)
    shipped = json.loads((Path(__file__).parents[1] / "foveate/assets/models/demo/tokenizer.json").read_text())
    assert json.loads(rebuilt.backend_tokenizer.to_str())["model"]["vocab"] == shipped["model"]["vocab"]
    assert len(build_tokenizer()("star", add_special_tokens=False)["input_ids"]) == 1  # the default learns "star"
    assert len(rebuilt("star", add_special_tokens=False)["input_ids"]) == 1  # one token per answer word (v6 on)


def test_cell_coverage_counts_each_cells_pixels_like_a_per_cell_loop() -> None:
    scene = next(example_stream(3, DataMix(formats={"qa": 1.0}, presets={"cluttered": 1.0})))["scene"]
    crop = vision_aux.object_index_map(scene)  # 7 × 9 cells: sides that do not divide evenly into the grid
    coverage = vision_aux.cell_coverage(scene, 7, 9)
    rows = np.linspace(0, crop.shape[0], 8).round().astype(int)
    cols = np.linspace(0, crop.shape[1], 10).round().astype(int)
    n_objects = len(scene.objects)
    assert n_objects > 1 and coverage.shape == (n_objects + 1, 7, 9)
    for i in range(7):
        for j in range(9):
            cell = crop[rows[i] : rows[i + 1], cols[j] : cols[j + 1]]
            expected = [(cell == k).mean() for k in range(n_objects)] + [(cell == -1).mean()]
            np.testing.assert_allclose(coverage[:, i, j], expected)


def test_look_first_answers_name_their_referents_and_probes_skip_the_thought(
    collator: ChatCollator, tiny_model_dir: Path
) -> None:
    from transformers import AutoModelForImageTextToText

    from foveate.rl.answer_probe import teacher_forced

    mix = DataMix(formats={"qa": 1.0, "qa_crop": 1.0}, presets={"simple": 1.0}, look_first=True)
    examples = [e for e in itertools.islice(example_stream(0, mix), 40) if "Locate" not in str(e["messages"][0])]
    for example in examples:
        question = example["messages"][0]["content"][-1]["text"]
        answer = example["messages"][-1]["content"]
        thought, _, bare = answer.partition("</think>")
        assert thought.startswith("<think>the ") or thought.startswith("<think>a ") or "How many" in question
        assert thought.endswith(" " + bare) and bare and "<" not in bare
        phrases = thought.removeprefix("<think>").removesuffix(" " + bare).split("; ")
        assert all(phrase in question for phrase in phrases)
    plain = next(example_stream(0, dataclasses.replace(mix, look_first=False)))
    assert "<think>" not in plain["messages"][-1]["content"]
    # Teacher-forced probes return the answer's tokens inside the thought: those predicted from the referent.
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    for example, predicted, truth in teacher_forced(model, collator, examples[:5]):
        assert predicted.shape == truth.shape
        bare = example["messages"][-1]["content"].partition("</think>")[2]
        assert collator.tokenizer.decode(truth) == " " + bare


def test_existence_percept_names_what_the_colour_lookup_finds() -> None:
    from foveate.rl.sft_data import existence_percept, short_answer

    small_circle = WorldObject(id="o0", shape="circle", color="green", size_class="medium", box=[0, 0, 90, 90])
    big_square = WorldObject(id="o1", shape="square", color="green", size_class="large", box=[100, 100, 300, 300])
    red_star = WorldObject(id="o2", shape="star", color="red", size_class="medium", box=[400, 400, 500, 500])
    scene = _scene([small_circle, big_square, red_star])

    def asked(question: str, family: str = "existence") -> dict:
        return {"question": question, "family": family}

    # A match wins over a larger object of the colour; otherwise the largest one of the colour; else "none".
    assert existence_percept(asked("Is there a green circle in the image?"), scene) == "green circle"
    assert existence_percept(asked("Is there a green star in the image?"), scene) == "green square"
    assert existence_percept(asked("Is there an orange star in the image?"), scene) == "orange none"
    assert existence_percept(asked("What color is the star?", "attribute"), scene) is None
    row = {"question": "Is there a green star in the image?", "answers": ["no"], "family": "existence"}
    percept = DataMix(look_first=True, existence_thought="percept")
    assert short_answer(row, percept, scene) == "<think>green square no</think>no"
    assert short_answer(row, DataMix(look_first=True), scene) == "<think>a green star no</think>no"
    assert short_answer(row, dataclasses.replace(percept, look_first=False), scene) == "no"
    with pytest.raises(ValueError, match="no existence percept"):
        short_answer(row, percept)  # no scene: never a silent referent thought instead
    with pytest.raises(ValueError, match="existence_thought"):
        DataMix(existence_thought="percepts")


def test_percept_stream_and_probe_format_follow_the_saved_recipe(tmp_path: Path) -> None:
    from foveate.rl.answer_probe import answer_format
    from foveate.rl.sft_data import existence_percept

    mix = DataMix(formats={"qa": 1.0}, presets={"simple": 1.0}, look_first=True, existence_thought="percept")
    existence = [e for e in itertools.islice(example_stream(0, mix), 200) if "Is there" in str(e["messages"][0])]
    assert len(existence) > 10
    for example in existence:
        question = example["messages"][0]["content"][-1]["text"]
        thought, _, answer = example["messages"][-1]["content"].partition("</think>")
        percept = existence_percept({"question": question, "family": "existence"}, example["scene"])
        assert thought == f"<think>{percept} {answer}"
        # The percept decides the answer: "yes" exactly when it names the question's shape.
        assert (answer == "yes") == (percept.split()[1] == question.split()[4])
    recipe = SFTRecipe(data=mix)
    (tmp_path / "foveate_recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), default=list))
    assert answer_format(tmp_path) == {"look_first": True, "existence_thought": "percept", "look_trim_object": False}
    assert answer_format(tmp_path / "missing") == {
        "look_first": False,
        "existence_thought": "referent",
        "look_trim_object": False,
    }


def test_trimmed_thoughts_end_on_the_word_the_answer_is_looked_up_by(tmp_path: Path) -> None:
    from foveate.rl.answer_probe import answer_format
    from foveate.rl.sft_data import key_phrase, short_answer

    assert key_phrase("the tiny red object") == "the tiny red"
    for kept in ("the square", 'the object marked "B"', "the object", "a green star", "blue objects"):
        assert key_phrase(kept) == kept
    row = {"question": "What shape is the red object?", "answers": ["circle"], "family": "attribute"}
    trimmed = DataMix(look_first=True, look_trim_object=True)
    assert short_answer(row, trimmed) == "<think>the red circle</think>circle"
    assert short_answer(row, DataMix(look_first=True)) == "<think>the red object circle</think>circle"
    # Over a stream: no thought keeps a trailing "object", and only that word differs from the untrimmed format.
    untrimmed = dataclasses.replace(trimmed, look_trim_object=False, formats={"qa": 1.0}, presets={"simple": 1.0})
    pairs = zip(
        itertools.islice(example_stream(0, dataclasses.replace(untrimmed, look_trim_object=True)), 200),
        itertools.islice(example_stream(0, untrimmed), 200),
        strict=True,
    )
    changed = 0
    for new, old in pairs:
        new_answer, old_answer = new["messages"][-1]["content"], old["messages"][-1]["content"]
        thought, _, bare = new_answer.removeprefix("<think>").partition("</think>")
        assert not any(phrase.endswith(" object") for phrase in thought.removesuffix(" " + bare).split("; "))
        removed = collections.Counter(old_answer.split()) - collections.Counter(new_answer.split())
        assert set(removed) <= {"object"} and not collections.Counter(new_answer.split()) - collections.Counter(
            old_answer.split()
        )
        changed += new_answer != old_answer
    assert changed > 10
    (tmp_path / "foveate_recipe.json").write_text(json.dumps({"data": dataclasses.asdict(trimmed)}, default=list))
    assert answer_format(tmp_path)["look_trim_object"] is True


def test_copy_examples_ask_the_previous_scenes_question_and_supervise_only_the_referent(collator) -> None:
    from foveate.world.questions import referents

    mix = DataMix(formats={"qa": 1.0, "copy": 1.0}, presets={"default": 1.0}, look_first=True, look_trim_object=True)
    examples = list(itertools.islice(example_stream(3, mix), 40))
    copies = [e for e in examples if e["format"] == "copy"]
    assert copies and all(e["open_reply"] for e in copies)
    for example in copies:
        question = example["messages"][0]["content"][-1]["text"]
        thought = example["messages"][1]["content"]
        # the question was asked of an earlier scene: its qa example came before, with another image
        earlier = next(
            e for e in examples if e["format"] == "qa" and e["messages"][0]["content"][-1]["text"] == question
        )
        assert earlier["scene"] is not example["scene"]
        assert thought.startswith("<think>") and "</think>" not in thought
        assert referents(question)[0].split()[:2] == thought.removeprefix("<think>").split()[:2]
    batch = collator(copies[:2])
    for row, example in enumerate(copies[:2]):
        labelled = batch["input_ids"][row][batch["labels"][row] != IGNORE]
        assert collator.tokenizer.decode(labelled) == example["messages"][1]["content"]  # no <|im_end|> target


def test_copy_needs_look_first_thoughts() -> None:
    with pytest.raises(ValueError, match="look_first"):
        DataMix(formats={"qa": 1.0, "copy": 1.0}, look_first=False)


def test_the_demo_recipe_rebuilds_bit_identical_weights(tmp_path: Path) -> None:
    """Two runs of configs/demo.yaml's vision stage, its attention-supervised chat stage and its focus stage (two
    steps each, with the recipe's dataloader worker) save the same weights: a rebuild differs only if the code or the
    recipe does."""
    from safetensors.torch import load_file

    demo = load_recipe(Path(__file__).parents[1] / "configs" / "demo.yaml")
    vision, *_, focus = demo.all_stages()
    chats = next(stage for stage in demo.all_stages() if stage.train.attn_weight)
    assert vision.train.vision_only and chats.data.chat_turns > 1 and focus.data.family_weights
    short = {"max_steps": 2, "stop_after_steps": None, "batch_size": 2, "warmup_steps": 0, "logging_steps": 1}
    stages = [Stage(stage.data, dataclasses.replace(stage.train, **short)) for stage in (vision, chats, focus)]
    weights = []
    for run in ("first", "second"):
        recipe = dataclasses.replace(demo, output_dir=str(tmp_path / run), stages=stages, save_dtype="float32")
        weights.append(load_file(train_sft(recipe, workdir=tmp_path / f"{run}.work") / "model.safetensors"))
    first, second = weights
    assert first.keys() == second.keys()
    assert not [name for name in first if not torch.equal(first[name], second[name])]
    initial = load_file(tmp_path / "first.work" / "stage1.work" / "init" / "model.safetensors")
    assert any(not torch.equal(initial[name], first[name]) for name in first)  # the runs trained something


def test_a_rebuild_never_writes_into_the_shipped_model_unless_told(tmp_path: Path) -> None:
    from foveate.api import DEMO_MODEL_DIR
    from foveate.cli import sft_output_dir

    shipped, default = DEMO_MODEL_DIR.resolve(), tmp_path / "models" / "demo-rebuild"
    assert sft_output_dir(None, None, False, default) == default  # configs/demo.yaml names no output_dir
    assert sft_output_dir("runs/v20", None, False, default) == Path("runs/v20")
    assert sft_output_dir("runs/v20", tmp_path / "x", False, default) == tmp_path / "x"
    with pytest.raises(FoveateError, match="--replace-shipped"):
        sft_output_dir(str(DEMO_MODEL_DIR), None, False, default)  # an old recipe naming the shipped directory
    assert sft_output_dir(str(DEMO_MODEL_DIR), None, True, default) == shipped
    assert sft_output_dir(None, DEMO_MODEL_DIR, False, default) == DEMO_MODEL_DIR  # named explicitly
    with pytest.raises(FoveateError, match="contradicts"):
        sft_output_dir(None, tmp_path / "x", True, default)
    assert load_recipe(Path(__file__).parents[1] / "configs" / "demo.yaml").output_dir is None


@pytest.mark.slow  # a one-step Trainer run through the CLI: about 15 s
def test_train_sft_writes_under_foveate_home_by_default(tmp_path: Path, monkeypatch, capsys) -> None:
    from foveate.cli import main

    recipe = tmp_path / "smoke.yaml"
    recipe.write_text(
        "save_dtype: float32\n"
        "data: {formats: {qa: 1.0}, presets: {single: 1.0}}\n"
        "train: {max_steps: 1, batch_size: 2, warmup_steps: 0, logging_steps: 1, dataloader_workers: 0}\n"
    )
    monkeypatch.setenv("FOVEATE_HOME", str(tmp_path / "home"))
    main(["train", "sft", "--config", str(recipe)])
    written = tmp_path / "home" / "models" / "smoke-rebuild"
    assert (written / "config.json").is_file() and (written / "foveate_recipe.json").is_file()
    assert f"model written to {written}" in capsys.readouterr().out
