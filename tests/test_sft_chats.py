"""Multi-turn chats of one scene's questions (rl.sft_data.chat_examples): what joins a chat, what the stream
yields, and the per-turn attention targets of a real collated chat batch."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from foveate import protocol
from foveate.eval.metrics import choice_match
from foveate.rl import attention_supervision
from foveate.rl.sft import ChatCollator
from foveate.rl.sft_data import (
    CHAT_FORMATS,
    DataMix,
    chat_examples,
    example_stream,
    leaks,
    scene_examples,
    scene_rows,
)
from foveate.world import iter_scenes, render_scene
from foveate.world.scenes import SHAPES

CHAT_MIX = DataMix(
    formats={"qa": 3.0, "ground": 1.0},
    presets={"simple": 0.7, "single": 0.3},
    look_first=True,
    look_trim_object=True,
    chat_turns=6,
    scene_questions=(4, 8),
)


def _example(question: str, reply: str, form: str = "qa", evidence: list | None = None) -> dict:
    image = Image.new("RGB", (8, 8))
    user = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}
    example = {"messages": [user, {"role": "assistant", "content": reply}], "format": form, "scene": None}
    return example | {"evidence": evidence or [[0, 0, 4, 4]]}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")


def test_a_turn_whose_answer_the_chat_already_says_starts_another_chat() -> None:
    color = _example("What color is the square?", "<think>the square red</think>red")
    shape = _example("What shape is the red object?", "<think>the red square</think>square")
    assert leaks([color], shape)  # "square" was said
    assert leaks([color], _example("What color is the square?", "<think>the square red</think>red"))  # repeated
    exists = _example("Is there a red square in the image?", "<think>a red square yes</think>yes")
    assert leaks([color], exists)  # "red" and "square" were said: the chat tells that there is one
    assert not leaks([color], _example("Is there a blue star in the image?", "<think>a blue star no</think>no"))
    box = protocol.box_json([10, 10, 50, 50])
    ground = _example("Locate the square. Answer with its bounding box.", box, form="ground")
    assert not leaks([color], ground)
    assert leaks([ground], _example("Locate the red object. Answer with its bounding box.", box, form="ground"))
    chats = chat_examples([color, shape, ground, exists], max_turns=2)
    turns = [[_text(m) for m in chat["messages"] if m["role"] == "user"] for chat in chats]
    assert turns == [
        ["What color is the square?", "Locate the square. Answer with its bounding box."],
        ["What shape is the red object?"],
        ["Is there a red square in the image?"],
    ]
    first = chats[0]["messages"]
    assert sum(p["type"] == "image" for m in first if m["role"] == "user" for p in m["content"]) == 1
    assert chats[0]["format"] == "chat" and chats[1]["format"] == "qa"
    assert chats[0]["turn_evidence"] == [color["evidence"], ground["evidence"]]


def test_the_stream_asks_several_questions_per_scene_image_without_leaks() -> None:
    examples = list(itertools.islice(example_stream(5, CHAT_MIX), 120))
    chats = [e for e in examples if e["format"] == "chat"]
    assert len(chats) >= 20
    turn_counts = [len(e["turn_evidence"]) for e in examples if e["format"] in CHAT_FORMATS | {"chat"}]
    assert max(turn_counts) <= CHAT_MIX.chat_turns and np.mean(turn_counts) >= 2.0
    for chat in chats:
        messages = chat["messages"]
        replies = [m for m in messages if m["role"] == "assistant"]
        assert len(replies) == len(chat["turn_evidence"]) == len(messages) // 2
        images = [p for m in messages if m["role"] == "user" for p in m["content"] if p["type"] == "image"]
        assert len(images) == 1 and messages[0]["content"][0]["type"] == "image"
        questions = [_text(m) for m in messages if m["role"] == "user"]
        assert len(set(questions)) == len(questions)
        for turn in range(1, len(replies)):
            earlier = set().union(*(_words(_text(m)) for m in messages[: 2 * turn]))
            answer = protocol.strip_thought(replies[turn]["content"])
            if not answer.startswith("{"):
                assert not _words(answer) & earlier, (questions, answer)


def test_single_turn_mix_is_unchanged_and_bad_chat_settings_are_errors() -> None:
    plain = list(itertools.islice(example_stream(5, DataMix(formats={"qa": 1.0}, presets={"simple": 1.0})), 10))
    assert all(len(e["messages"]) == 2 and "turn_evidence" not in e for e in plain)
    with pytest.raises(ValueError, match="chat_turns"):
        DataMix(chat_turns=0)
    with pytest.raises(ValueError, match="scene_questions"):
        DataMix(scene_questions=(3, 2))


def test_family_weights_set_the_share_of_each_family_among_drawn_questions() -> None:
    mix = DataMix(formats={"qa": 1.0}, presets={"large": 1.0}, scene_questions=(6, 10))
    focused = dataclasses.replace(mix, family_weights={"attribute": 1.0, "counting": 1.0})
    kinds = {
        name: collections.Counter(row["family"] for row in _drawn_rows(stream_mix))
        for name, stream_mix in (("preset", mix), ("focused", focused))
    }
    assert set(kinds["focused"]) == {"attribute", "counting"}
    assert min(kinds["focused"].values()) >= 0.3 * sum(kinds["focused"].values())
    assert {"existence", "relation"} <= set(kinds["preset"])  # the preset's own weights ask every family
    with pytest.raises(ValueError, match="scene_questions"):
        DataMix(family_weights={"attribute": 1.0})
    with pytest.raises(ValueError, match="family_weights"):
        DataMix(scene_questions=(4, 8), family_weights={"atribute": 1.0})
    with pytest.raises(ValueError, match="family_weights"):
        DataMix(scene_questions=(4, 8), family_weights={"attribute": 0.0})


def _drawn_rows(mix: DataMix, scenes: int = 30) -> list[dict]:
    rng = random.Random(0)
    return [
        row
        for scene, rows in itertools.islice(iter_scenes(3, "large"), scenes)
        for row in scene_rows(scene, rows, "large", rng, mix)
    ]


def test_without_second_format_each_question_gets_one_example() -> None:
    formats = {"qa": 1.0, "qa_crop": 1.0}
    scene, rows = next(iter_scenes(3, "large"))
    image = render_scene(scene)
    for second, per_row in ((True, 2), (False, 1)):
        mix = DataMix(formats=formats, presets={"large": 1.0}, second_format=second)
        examples = list(scene_examples(image, scene, rows, random.Random(0), mix))
        assert len(examples) == per_row * len(rows)


def test_every_turn_of_a_chat_is_supervised_at_its_own_answer(tiny_model_dir: Path) -> None:
    from foveate.policies.loading import load_processor

    processor = load_processor(tiny_model_dir)
    tokenizer = processor.tokenizer
    examples = [e for e in itertools.islice(example_stream(5, CHAT_MIX), 40) if e["format"] == "chat"][:6]
    batch = ChatCollator(processor, max_length=512, attn_targets=True)(examples)
    query, evidence = batch["attn_query"], batch["attn_evidence"]
    assert query.shape[1] == max(len(e["turn_evidence"]) for e in examples)
    supervised = 0
    for row, example in enumerate(examples):
        replies = [m["content"] for m in example["messages"] if m["role"] == "assistant"]
        spans = attention_supervision.labelled_spans(batch["labels"][row])
        assert len(spans) == len(replies)
        for turn, (reply, boxes) in enumerate(zip(replies, example["turn_evidence"], strict=True)):
            position = int(query[row, turn])
            if not boxes:
                assert position == -1
                continue
            supervised += 1
            start, end = spans[turn]
            assert start - 1 <= position < end  # inside its own turn, never another's
            answer = protocol.strip_thought(reply)
            if reply.startswith(protocol.THOUGHT_OPEN):  # predicted inside the thought, after the referent
                answer_ids = tokenizer(" " + answer, add_special_tokens=False).input_ids
                assert batch["input_ids"][row, position + 1 : position + 1 + len(answer_ids)].tolist() == answer_ids
            else:  # a box: predicted by the token before the reply
                assert position == start - 1
            scene = example["scene"]
            h, w = (batch["image_grid_thw"][row, 1:] // processor.image_processor.merge_size).tolist()
            cells = attention_supervision.evidence_cells(boxes, (scene.width, scene.height), h, w)
            assert int(evidence[row, turn].sum()) == int(cells.sum())
            assert not (evidence[row, turn] & ~batch["attn_scene"][row]).any()
    assert supervised >= 10


def test_the_loss_over_turns_is_the_mean_of_each_turns_loss() -> None:
    torch.manual_seed(0)
    rows = torch.softmax(torch.randn(2, 3, 2, 12), -1)  # [batch, heads, turns, keys]
    scene = torch.zeros(2, 12, dtype=torch.bool)
    scene[:, 2:8] = True
    evidence = torch.zeros(2, 2, 12, dtype=torch.bool)
    evidence[:, 0, 2:4] = True
    evidence[:, 1, 5:8] = True
    query = torch.tensor([[9, 10], [9, -1]])
    both = attention_supervision.loss({0: rows}, scene, evidence, query).item()
    singles = []
    for r, t in ((0, 0), (0, 1), (1, 0)):  # the supervised (row, turn) pairs, one query each
        row = slice(r, r + 1)
        singles.append(attention_supervision.loss({0: rows[row, :, t]}, scene[row], evidence[row, t], query[row, t]))
    assert np.isclose(both, float(np.mean([s.item() for s in singles])), atol=1e-6)


def test_zoom_rows_train_look_first_answers_with_the_option_text_and_keep_their_own_questions() -> None:
    """The `zoom` preset's rows keep their V*-style questions under `scene_questions` (its generator is not the
    world's), and a multiple-choice row's target names the option's text after its referent, so the thought ends
    with the answer (what ViCrop's look-first probe needs) and `choice_match` accepts it."""
    mix = DataMix(
        formats={"qa": 1.0, "qa_crop": 1.0},
        presets={"zoom": 1.0},
        look_first=True,
        look_trim_object=True,
        chat_turns=6,
        scene_questions=(4, 8),
    )
    examples = list(itertools.islice(example_stream(3, mix), 40))
    choices = 0
    for example in examples:
        question = next(p["text"] for p in example["messages"][0]["content"] if p["type"] == "text")
        assert question.startswith("What shape is ")  # a zoom question, not one drawn anew by the world's generator
        reply = example["messages"][1]["content"]
        thought, answer = protocol.look_parts(reply)
        assert thought.endswith(" " + answer) and answer in SHAPES
        if "\n(A) " in question:
            choices += 1
            options = [line[4:] for line in question.splitlines() if line.startswith("(")]
            assert answer in options and choice_match(answer, options, answer) == 1.0
    assert choices > 5


def test_crop_small_details_asks_an_illegible_target_with_its_crop_only() -> None:
    """With `DataMix.crop_small_details` a small-detail row never becomes a qa example without its crop (the
    answer could only be guessed); other rows keep qa."""
    base = {"formats": {"qa": 1.0, "qa_crop": 1.0}, "presets": {"zoom": 0.5, "large": 0.5}, "look_first": True}
    for crop_small, expect_bare_small in ((False, True), (True, False)):
        mix = DataMix(**base, crop_small_details=crop_small)
        examples = list(itertools.islice(example_stream(5, mix), 120))
        bare = [e for e in examples if e["format"] == "qa"]
        small = [e for e in bare if e["scene"].width >= 1344]  # zoom canvases: 1344-2048 px, large ones 672
        assert bool(small) == expect_bare_small
        assert bare  # large rows keep their bare qa examples
