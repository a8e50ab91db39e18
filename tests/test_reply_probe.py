"""`reply_probe` (policies.reply_probe) on the real tiny Qwen2-VL: the greedy reply `chat` gives, with the map and
probability a suffix probe would read at every position of it."""

from __future__ import annotations

import numpy as np
import pytest
from test_vicrop import QUESTION, scene, user

from foveate.errors import PolicyError
from foveate.policies.base import SamplingParams

LAYER = 1


def conversations():
    # Two prompts of different lengths, so the batch is left-padded.
    return [user(scene(), QUESTION), user(scene(dot=(100, 500)), "Is there a red dot in the lower left corner?")]


def test_the_reply_is_chats_greedy_reply(tiny_policy) -> None:
    replies = tiny_policy.reply_probe(conversations(), LAYER, 8)
    expected = tiny_policy.chat(conversations(), SamplingParams(max_new_tokens=8))
    assert [r.reply.text for r in replies] == [e.text for e in expected]
    assert [r.reply.prompt_tokens for r in replies] == [e.prompt_tokens for e in expected]
    for reply in replies:
        assert len(reply.rows) == len(reply.probs) == min(len(reply.token_ids), 8)
        assert all(0.0 < p <= 1.0 for p in reply.probs)


def test_every_position_reads_what_a_suffix_probe_reads(tiny_policy) -> None:
    tokenizer = tiny_policy.tokenizer
    for messages, reply in zip(conversations(), tiny_policy.reply_probe(conversations(), LAYER, 6), strict=True):
        prompt_text, images = tiny_policy.render(messages)
        compared = 0
        for position in range(len(reply.rows)):
            suffix = tiny_policy.decode_ids(reply.token_ids[:position])
            # A suffix probe re-tokenizes its text; compare where that gives back the reply's own tokens.
            ids = tokenizer(prompt_text + suffix, add_special_tokens=False)["input_ids"]
            if position and ids[-position:] != reply.token_ids[:position]:
                continue
            probe = tiny_policy.attention_probe([messages], LAYER, suffixes=[suffix])[0]
            read = tiny_policy.probe_result(reply, position)
            np.testing.assert_allclose(read.maps[0].values, probe.maps[0].values, atol=1e-5)
            assert read.maps[0].values.shape == probe.maps[0].values.shape
            assert np.isclose(read.prob, probe.prob, atol=1e-5) and read.token_id == probe.token_id
            compared += 1
        assert compared >= 2  # the last prompt token and at least one position inside the reply


def test_a_kept_session_is_the_prompts_cache(tiny_policy) -> None:
    messages = conversations()[0]
    reply = tiny_policy.reply_probe([messages], LAYER, 6, keep=[True])[0]
    assert reply.session is not None
    continued = tiny_policy.continue_probe([reply.session], SamplingParams(max_new_tokens=6))[0]
    assert continued.text == reply.reply.text  # decoding the kept prompt cache again gives the same reply
    tiny_policy.release_sessions([reply.session])


def test_position_after_finds_token_boundaries_only(tiny_policy) -> None:
    reply = tiny_policy.reply_probe([conversations()[0]], LAYER, 6)[0]
    decode = tiny_policy.decode_ids
    assert reply.position_after("", decode) == 0
    two = decode(reply.token_ids[:2])
    assert reply.position_after(two, decode) == 2
    assert reply.position_after(two + "\u2603never", decode) is None  # not a prefix of the reply


def test_bad_arguments_are_refused(tiny_policy) -> None:
    with pytest.raises(PolicyError, match="keep"):
        tiny_policy.reply_probe(conversations(), LAYER, 4, keep=[True])
    with pytest.raises(PolicyError, match="layer"):
        tiny_policy.reply_probe(conversations(), 99, 4)


def test_batches_are_split_like_chats(tiny_policy, monkeypatch) -> None:
    together = tiny_policy.reply_probe(conversations(), LAYER, 6)
    monkeypatch.setattr(tiny_policy, "max_batch_size", 1)
    apart = tiny_policy.reply_probe(conversations(), LAYER, 6)
    assert [r.reply.text for r in apart] == [r.reply.text for r in together]
    for one, other in zip(apart, together, strict=True):
        np.testing.assert_allclose(one.rows, other.rows[:, -one.rows.shape[1] :], atol=1e-5)  # left padding
