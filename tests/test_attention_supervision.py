"""Attention supervision (rl.attention_supervision): evidence cells, per-row attention capture against eager
attention on a real tiny model, targets from a real collated batch, the loss moving attention, and a Trainer run."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from foveate.policies import attention_capture
from foveate.rl import attention_supervision
from foveate.rl.sft import ChatCollator, SFTRecipe, Stage, train_sft
from foveate.rl.sft_data import DataMix, example_stream


def test_evidence_cells_cover_overlapped_cells_and_a_tiny_boxs_centre() -> None:
    # A 300×300 image on a 3×3 grid: cells are 100 px squares.
    one_cell = attention_supervision.evidence_cells([[110, 110, 190, 190]], (300, 300), 3, 3).reshape(3, 3)
    assert one_cell.sum() == 1 and one_cell[1, 1]
    spanning = attention_supervision.evidence_cells([[50, 150, 250, 250]], (300, 300), 3, 3).reshape(3, 3)
    assert spanning[1:, :].all() and not spanning[0].any()
    sliver = attention_supervision.evidence_cells([[95, 10, 150, 60]], (300, 300), 3, 3).reshape(3, 3)
    assert sliver[0, 1] and not sliver[0, 0]  # 5 px of cell (0, 0) is under min_cover; the centre is in (0, 1)
    tiny = attention_supervision.evidence_cells([[280, 5, 290, 12]], (300, 300), 3, 3).reshape(3, 3)
    assert tiny.sum() == 1 and tiny[0, 2]  # 10×7 px covers 0.7 % of its cell: kept through its centre


def test_query_position_is_just_before_the_first_label() -> None:
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, 6, -100], [-100, -100, -100, -100]])
    assert attention_supervision.answer_query_positions(labels).tolist() == [1, 0, -1]


@pytest.fixture(scope="module")
def batch_and_model(tiny_model_dir: Path):
    from transformers import AutoModelForImageTextToText

    from foveate.policies.loading import load_processor

    processor = load_processor(tiny_model_dir)
    collator = ChatCollator(processor, max_length=512, attn_targets=True)
    mix = DataMix(formats={"qa": 1.0, "ground": 1.0}, presets={"simple": 1.0})
    examples = list(itertools.islice(example_stream(3, mix), 6))
    model = AutoModelForImageTextToText.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=attention_capture.register()
    )
    return examples, collator(examples), model


def test_targets_mark_the_scene_tokens_and_the_evidence_before_the_answer(batch_and_model) -> None:
    examples, batch, model = batch_and_model
    image_token = model.config.image_token_id
    merge = int(
        round(float((batch["image_grid_thw"][0, 1:].prod() / batch["attn_scene"][0].sum().clamp_min(1)) ** 0.5))
    )
    assert merge in (2, 3)  # the processor's merge size, read back from a row's token count
    assert batch["attn_query"].shape == (len(examples), 1)  # one supervised turn per single-turn example
    for row, example in enumerate(examples):
        query = int(batch["attn_query"][row, 0])
        if not example.get("evidence"):
            assert query == -1  # a "no" to an existence question has no evidence
            continue
        assert batch["labels"][row, query] == -100 and batch["labels"][row, query + 1] != -100
        scene = batch["attn_scene"][row]
        assert (batch["input_ids"][row][scene] == image_token).all()
        t, h, w = batch["image_grid_thw"][row].tolist()  # one image per example here
        assert int(scene.sum()) == (h // merge) * (w // merge)
        evidence = batch["attn_evidence"][row, 0]
        assert evidence.any() and not (evidence & ~scene).any()
        cells = attention_supervision.evidence_cells(
            example["evidence"], (example["scene"].width, example["scene"].height), h // merge, w // merge
        )
        assert int(evidence.sum()) == int(cells.sum())
    assert (batch["attn_query"] >= 0).sum() >= 3


def test_look_first_rows_are_supervised_where_the_thought_predicts_the_answer(tiny_model_dir: Path) -> None:
    from foveate.policies.loading import load_processor

    processor = load_processor(tiny_model_dir)
    tokenizer = processor.tokenizer
    collator = ChatCollator(processor, max_length=512, attn_targets=True)
    mix = DataMix(formats={"qa": 1.0}, presets={"simple": 1.0}, look_first=True, look_trim_object=True)
    examples = [e for e in itertools.islice(example_stream(3, mix), 12) if e.get("evidence")]
    batch = collator(examples)
    supervised = 0
    for row, example in enumerate(examples):
        query = int(batch["attn_query"][row, 0])
        if query < 0:
            continue
        supervised += 1
        thought, _, answer = example["messages"][-1]["content"].partition("</think>")
        answer_ids = tokenizer(" " + answer, add_special_tokens=False).input_ids
        # The token after the query is the answer's first token, inside the thought, after the referent's words.
        following = batch["input_ids"][row, query + 1 : query + 1 + len(answer_ids)].tolist()
        assert following == answer_ids
        assert batch["labels"][row, query] != -100  # the referent's last word is itself a labelled token
        last_piece = tokenizer.decode(batch["input_ids"][row, query]).strip()
        assert last_piece and thought.removesuffix(" " + answer).endswith(last_piece)
    assert supervised >= 5
    no_thought = torch.tensor([[-100, -100, 7, 8]])
    assert attention_supervision.look_answer_position(no_thought[0], thought_close_id=9, answer_length=1) == -1


def test_per_row_capture_equals_eager_attention_on_a_right_padded_batch(batch_and_model) -> None:
    _, batch, model = batch_and_model
    inputs = {
        k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    }
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: the padding path is exercised
    query = batch["attn_query"][:, 0].clamp_min(0)
    # Two positions per row (the [batch, n] form a chat's turns use), and one per row.
    positions = torch.stack([query, (query - 3).clamp_min(0)], dim=1)
    with torch.no_grad(), attention_capture.capture_attention([0, 1], query_offset=positions) as captured:
        model(**inputs)
    with torch.no_grad(), attention_capture.capture_attention([1], query_offset=query) as single:
        model(**inputs)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(attention_capture.ATTENTION_NAME)
    rows = torch.arange(len(positions))[:, None]
    for layer in (0, 1):
        expected = eager[layer][rows, :, positions, :].transpose(1, 2)  # [batch, heads, 2, keys]
        torch.testing.assert_close(
            captured.rows[layer], expected.float(), atol=1e-4, rtol=1e-3
        )  # SDPA vs eager rounding
    torch.testing.assert_close(single.rows[1], captured.rows[1][:, :, 0], atol=1e-6, rtol=1e-5)


def test_the_loss_moves_attention_onto_the_evidence(batch_and_model) -> None:
    _, batch, model = batch_and_model
    inputs = {
        k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    }
    targets = {k: batch[k] for k in attention_supervision.TARGET_KEYS}
    trained = type(model).from_pretrained(
        model.name_or_path, dtype=torch.float32, attn_implementation=attention_capture.ATTENTION_NAME
    )
    optimizer = torch.optim.Adam(trained.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        with attention_capture.capture_attention([1], query_offset=targets["attn_query"].clamp_min(0)) as captured:
            trained(**inputs)
        loss = attention_supervision.loss(captured.rows, **targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_loss_is_zero_without_supervised_rows() -> None:
    rows = {1: torch.softmax(torch.randn(2, 3, 10), -1)}
    none = torch.tensor([-1, -1])
    mask = torch.zeros(2, 10, dtype=torch.bool)
    assert attention_supervision.loss(rows, mask, mask, none).item() == 0.0
    # All the scene mass on the evidence: zero loss; half of it: log 2.
    scene = torch.zeros(2, 10, dtype=torch.bool)
    scene[:, :4] = True
    evidence = torch.zeros(2, 10, dtype=torch.bool)
    evidence[:, :2] = True
    half = {1: torch.tensor([[0.25, 0.25, 0.25, 0.25] + [0.0] * 6] * 2).unsqueeze(1).expand(2, 3, 10)}
    value = attention_supervision.loss(half, scene, evidence, torch.tensor([5, 5]))
    assert np.isclose(value.item(), np.log(2), atol=1e-5)


def test_a_stage_with_attention_supervision_trains_logs_and_saves_plain_sdpa(tmp_path: Path, quick_train) -> None:
    from transformers import AutoConfig

    from foveate.policies.tiny import TinyConfig

    train = quick_train(batch_size=4, attn_weight=1.0)
    mix = DataMix(formats={"qa": 1.0}, presets={"simple": 1.0})
    recipe = SFTRecipe(output_dir=str(tmp_path / "out"), model=TinyConfig(), save_dtype="float32",
                       stages=[Stage(mix, train)])  # fmt: skip
    out = train_sft(recipe, workdir=tmp_path / "work")
    config = json.loads((out / "config.json").read_text())
    assert attention_capture.ATTENTION_NAME not in json.dumps(config)
    assert AutoConfig.from_pretrained(out).model_type == "qwen2_vl"
    log = json.loads((out / "training_log.json").read_text())
    assert all(np.isfinite(row["loss"]) for row in log if "loss" in row)


def test_the_loss_is_the_log_of_the_head_mean_mass_on_the_evidence() -> None:
    scene = torch.zeros(1, 6, dtype=torch.bool)
    scene[0, :4] = True
    evidence = torch.zeros(1, 6, dtype=torch.bool)
    evidence[0, :2] = True
    # Head 0 looks only at the evidence, head 1 only at the rest of the scene: the mean mass is 0.5.
    rows = {1: torch.tensor([[[0.5, 0.5, 0, 0, 0, 0], [0, 0, 0.5, 0.5, 0, 0]]])}
    query = torch.tensor([5])
    assert np.isclose(attention_supervision.loss(rows, scene, evidence, query).item(), np.log(2), atol=1e-5)
