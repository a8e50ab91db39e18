"""`choice_logprobs` (policies/choices.py): several answers to one prompt scored with the prompt and each distinct
image computed once give the same log-probabilities as `answer_logprobs` row by row, on the real tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from foveate import protocol
from foveate.errors import PolicyError
from foveate.policies.base import WhiteBoxPolicy
from foveate.policies.batching import MicroBatcher
from foveate.policies.choices import common_prefix


def _crop(colour: str, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, colour)
    ImageDraw.Draw(image).ellipse((10, 10, size[0] // 2, size[1] // 2), fill="red")
    return image


def _ask(image: Image.Image, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def _rows_one_by_one(policy, conversations, choices) -> list[list[float]]:
    """The reference: one answer_logprobs call per (conversation, choice), so nothing is shared."""
    pairs = zip(conversations, choices, strict=True)
    return [[policy.answer_logprobs([c], [a])[0] for a in options] for c, options in pairs]


def _scored_sentences():
    """Two crops, three sentences each (a crop shown in several rows: the vision tower's features are shared), a
    third crop once; a new PIL object with the same pixels counts as the same crop."""
    first, second = _crop("blue", (200, 160)), _crop("green", (120, 240))
    same_as_first = first.copy()
    sentences = ["a red circle", "two blue squares on the left", "a large yellow star"]
    conversations = [_ask(image, f"Is there {s} in the image?") for image in (first, second) for s in sentences]
    conversations += [_ask(same_as_first, "Is there a cat?"), _ask(_crop("white", (90, 90)), "Is there a dog?")]
    return conversations, sentences


def test_yes_no_choices_equal_row_by_row_scores(tiny_policy) -> None:
    conversations, _ = _scored_sentences()
    choices = [["yes", "no"]] * len(conversations)
    shared = tiny_policy.choice_logprobs(conversations, choices)
    assert [len(row) for row in shared] == [2] * len(conversations)
    np.testing.assert_allclose(shared, _rows_one_by_one(tiny_policy, conversations, choices), rtol=1e-5, atol=1e-4)
    assert len({round(row[0], 4) for row in shared}) > 1  # the image and the question change the scores


def test_multi_token_choices_continue_from_the_shared_prefix(tiny_policy) -> None:
    """A look-first model's two answers share ``<think>{claim} `` and then differ for several tokens; choices of
    different lengths, three choices and a lone choice are scored the same as row by row."""
    conversations, sentences = _scored_sentences()
    claims = sentences * 2 + ["a cat", "a dog"]
    choices = [[protocol.look_answer([claim], word) for word in ("yes", "no")] for claim in claims]
    choices[1] = ["red", "a large orange square", "three circles"]
    choices[7] = ["there is nothing here at all"]
    conversations.append([{"role": "user", "content": "Is the sky green?"}])  # no image at all
    choices.append([protocol.look_answer(["the sky"], word) for word in ("yes", "no")])
    tokenizer = tiny_policy.tokenizer
    assert common_prefix([tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices[0]]) > 0
    shared = tiny_policy.choice_logprobs(conversations, choices)
    expected = _rows_one_by_one(tiny_policy, conversations, choices)
    for got, want in zip(shared, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert all(score < 0 for row in shared for score in row)


def test_answer_logprobs_with_repeated_images_equals_single_rows(tiny_policy) -> None:
    conversations, _ = _scored_sentences()
    answers = ["yes", "no", "a red circle", "yes", "no", "two", "yes", "no"]
    batched = tiny_policy.answer_logprobs(conversations, answers)
    single = [tiny_policy.answer_logprobs([c], [a])[0] for c, a in zip(conversations, answers, strict=True)]
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-4)


def test_the_batcher_forwards_choice_logprobs(tiny_policy) -> None:
    conversations, _ = _scored_sentences()
    with MicroBatcher(tiny_policy) as batcher:
        assert isinstance(batcher, WhiteBoxPolicy)
        got = batcher.choice_logprobs(conversations[:2], [["yes", "no"], ["red", "blue"]])
    want = tiny_policy.choice_logprobs(conversations[:2], [["yes", "no"], ["red", "blue"]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_choice_logprobs_argument_errors(tiny_policy) -> None:
    conversations, _ = _scored_sentences()
    with pytest.raises(PolicyError, match="one list of choices per conversation"):
        tiny_policy.choice_logprobs(conversations[:2], [["yes", "no"]])
    with pytest.raises(PolicyError, match="non-empty"):
        tiny_policy.choice_logprobs(conversations[:1], [["yes", ""]])
    with pytest.raises(PolicyError, match="non-empty"):
        tiny_policy.choice_logprobs(conversations[:1], [[]])


def test_common_prefix_leaves_every_choice_a_token() -> None:
    assert common_prefix([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert common_prefix([[7], [7, 8]]) == 0
    assert common_prefix([[1, 2], [1, 2]]) == 1
    assert common_prefix([[4, 5, 6]]) == 2


def test_rows_sharing_an_image_prefill_it_once(tiny_policy) -> None:
    """Rows showing the same crop (equal pixels) after the same template text reuse one prefill of it (one session
    per crop); rows whose crops never repeat take the one-forward path instead, and both equal row-by-row
    scoring (the tests above)."""
    conversations, _ = _scored_sentences()
    sessions = tiny_policy._image_prefix_sessions(conversations).sessions
    assert sessions is not None
    assert sessions[0] is sessions[1] is sessions[2] and sessions[3] is sessions[4] is sessions[5]
    assert sessions[6] is sessions[0] and sessions[3] is not sessions[0]  # a copy's pixels are the crop's
    assert sessions[7] is not None and all(sessions[7] is not other for other in sessions[:7])
    distinct = [_ask(_crop(colour, (100, 100)), "Is there a cat?") for colour in ("blue", "green")]
    assert tiny_policy._image_prefix_sessions(distinct) is None
    choices = [["yes", "no"]] * 2
    np.testing.assert_allclose(
        tiny_policy.choice_logprobs(distinct, choices),
        _rows_one_by_one(tiny_policy, distinct, choices),
        rtol=1e-5,
        atol=1e-4,
    )
