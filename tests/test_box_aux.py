"""The per-cell box head (rl.box_aux): snapped coordinates, per-cell edge targets, one token per coordinate with
`TinyConfig.box_tokens`, and a head whose loss falls on a fixed batch."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from aux_heads import check_needs_target, fit_on_batch

from foveate.rl import box_aux, vision_aux
from foveate.rl.sft import IGNORE, ChatCollator
from foveate.rl.sft_data import DataMix, example_stream, ground
from foveate.world import iter_scenes, render_scene
from foveate.world.scenes import Scene, WorldObject


def _scene(objects: list[WorldObject]) -> Scene:
    return Scene(id="s", width=224, height=224, background="light gray", clutter="none", objects=objects)


@pytest.mark.parametrize(
    ("box", "snapped"),
    [
        ([101, 209, 489, 731], [100, 200, 480, 740]),  # nearest multiple of 20
        ([500, 500, 505, 508], [500, 500, 520, 520]),  # a tiny box keeps one step of width and height
        ([995, 0, 1000, 4], [980, 0, 1000, 20]),  # ... and stays inside 0-1000 at the far edge
    ],
)
def test_snap_thousand_rounds_to_steps_and_never_collapses(box: list[int], snapped: list[int]) -> None:
    assert box_aux.snap_thousand(box, 20) == snapped


def test_cell_boxes_label_owned_cells_with_their_objects_edges() -> None:
    # 224 px scene, 4×4 grid of 56-px cells: a square filling cells (0, 0)-(1, 1), and a triangle covering a
    # quarter of one cell (below min_cover: its cell is not labelled).
    square = WorldObject(id="o0", shape="square", color="blue", size_class="large", box=[0, 0, 112, 112])
    small = WorldObject(id="o1", shape="triangle", color="red", size_class="small", box=[168, 168, 196, 224])
    scene = _scene([square, small])
    coverage = vision_aux.cell_coverage(scene, 4, 4)
    targets = box_aux.cell_boxes(scene, coverage).reshape(4, 4, 4)
    assert targets[0, 0].tolist() == targets[1, 1].tolist() == [0, 0, 25, 25]  # 112 / 224 = 500 thousandths
    owners = vision_aux.cell_owners(coverage, 2).reshape(4, 4)
    assert ((targets[..., 0] != IGNORE) == (owners >= 0)).all()  # the aux labels' ownership rule
    assert (targets[3, 3] == IGNORE).all()
    # In a crop the box is relative to the window and clipped to it.
    window = (56, 56, 168, 168)
    cropped = box_aux.cell_boxes(scene, vision_aux.cell_coverage(scene, 2, 2, window), window).reshape(2, 2, 4)
    assert cropped[0, 0].tolist() == [0, 0, 25, 25]  # the square's visible part: window pixels 0-56 of 112


def test_default_tokenizer_splits_coordinates_and_box_tokens_makes_each_one_token(tiny_model_dir: Path) -> None:
    from foveate.policies.loading import load_processor
    from foveate.policies.tiny import build_tokenizer

    with pytest.raises(ValueError, match="box_tokens"):
        box_aux.coordinate_ids(load_processor(tiny_model_dir).tokenizer)
    tokenizer = build_tokenizer(box_tokens=True)
    ids = box_aux.coordinate_ids(tokenizer)
    assert [len(set(row)) for row in ids] == [box_aux.BOX_BINS] * 4
    assert ids[1] == ids[2] == ids[3] != ids[0]  # y1, x2, y2 follow a space; x1 follows "["
    answer = '{"bbox_2d": [120, 340, 560, 1000]}'
    pieces = tokenizer.tokenize(answer)
    numbers = pieces[pieces.index("Ġ[") + 1 :]  # after "bbox_2d", whose "2" is a token of its own
    assert [p for p in numbers if p.strip("Ġ").isdigit()] == ["120", "Ġ340", "Ġ560", "Ġ1000"]
    # The answer words the word-aligned colour and shape heads need stay single tokens.
    vision_aux.word_ids(tokenizer, vision_aux.COLOR_CLASSES)
    vision_aux.word_ids(tokenizer, vision_aux.SHAPE_CLASSES)


def test_box_step_writes_grounding_answers_in_steps() -> None:
    rng = random.Random(0)
    for scene, _rows in itertools.islice(iter_scenes(5, "large"), 6):
        example = ground(render_scene(scene), scene, rng, mix=DataMix(box_step=20))
        box = json.loads(example["messages"][-1]["content"])["bbox_2d"]
        assert all(value % 20 == 0 and 0 <= value <= 1000 for value in box)
        assert box[0] < box[2] and box[1] < box[3]


@pytest.fixture(scope="module")
def box_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from foveate.policies.tiny import TinyConfig, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("box") / "tiny", TinyConfig(box_tokens=True), seed=0)


@pytest.mark.parametrize("aligned", ["all", "none"])
def test_a_box_head_learns_from_a_batch_and_needs_its_targets(box_model: Path, aligned: str) -> None:
    from transformers import AutoModelForImageTextToText

    from foveate.policies.loading import load_processor

    processor = load_processor(box_model)
    collator = ChatCollator(processor, max_length=512, aux_targets=True)
    model = AutoModelForImageTextToText.from_pretrained(box_model)
    heads = vision_aux.attach(model, "object", aligned, processor.tokenizer, box=True)
    assert heads.box.aligned == (aligned == "all")
    if aligned == "all":  # TrainConfig.aux_box_linear: a linear box head beside word-aligned colour / shape heads
        linear = vision_aux.attach(model, "object", "all", processor.tokenizer, box="linear")
        assert not linear.box.aligned and isinstance(linear.color, vision_aux.WordAlignedHead)
        vision_aux.detach(model)
        heads = vision_aux.attach(model, "object", aligned, processor.tokenizer, box=True)
    examples = list(itertools.islice(example_stream(0, DataMix(formats={"qa": 1.0}, presets={"simple": 1.0})), 4))
    batch = collator(examples)
    assert batch["aux_box"].shape == (batch["aux_color"].shape[0], 4)
    labelled = batch["aux_box"][:, 0] != IGNORE
    assert labelled.any() and ((batch["aux_color"] > 0) | ~labelled).all()  # boxes only on object cells
    targets = {key: batch.pop(key) for key in vision_aux.TARGET_KEYS}
    losses = fit_on_batch(model, heads, heads.box, batch, lambda merged: heads.box.loss(merged, targets["aux_box"]))
    assert losses[-1] < losses[0]  # the box head alone: its loss must fall on a fixed batch
    assert np.isclose(losses[0], np.log(box_aux.BOX_BINS), atol=1.5)  # starts near chance over 51 bins
    check_needs_target(model, heads, batch, targets, "aux_box")
    model(**batch)  # TrainConfig.aux_box_only: the box term alone, logged like the full loss's
    alone = heads.box_only_loss(**targets)
    assert np.isclose(alone.item(), heads.parts["box"]) and alone.requires_grad


def test_an_empty_box_batch_costs_nothing() -> None:
    head = box_aux.BoxHead(16)
    features = torch.randn(5, 16, requires_grad=True)
    loss = head.loss(features, torch.full((5, 4), IGNORE))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph, so a batch without objects does not break the step


def test_a_look_first_box_answer_is_looked_up_at_its_referents_last_word(box_model: Path) -> None:
    from foveate.policies.loading import load_processor

    processor = load_processor(box_model)
    collator = ChatCollator(processor, max_length=512, attn_targets=True)
    mix = DataMix(box_step=20, ground_look_first=True, look_trim_object=True)
    scene, _rows = next(iter(iter_scenes(5, "large")))
    example = ground(render_scene(scene), scene, random.Random(1), mix=mix) | {"scene": scene}  # as streamed
    reply = example["messages"][-1]["content"]
    thought = reply[len("<think>") : reply.index("</think>")]
    assert reply.startswith("<think>the ") and json.loads(reply.split("</think>")[1])["bbox_2d"]
    batch = collator([example])
    position = int(batch["attn_query"][0, 0])
    # The query is the thought's last word, whose output is "</think>": the referent's own word keys the lookup.
    assert processor.tokenizer.decode(batch["input_ids"][0, position]).strip() == thought.split()[-1]
    assert processor.tokenizer.decode(batch["input_ids"][0, position + 1]) == "</think>"
    assert batch["attn_evidence"][0, 0].any()


def test_box_only_needs_a_box_head() -> None:
    heads = vision_aux.VisionAuxHeads(16)
    heads.merged = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match="aux_box: true"):
        heads.box_only_loss(aux_box=torch.full((3, 4), IGNORE))
