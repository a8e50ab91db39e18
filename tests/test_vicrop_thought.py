"""ViCrop read inside a look-first model's thought (policies.look_first), on the real tiny Qwen2-VL.

The tiny test model has random weights and never writes a look-first reply, and no look-first demo model is
shipped (each takes over an hour to train), so the graph test fixes only the reply TEXT of the thought pass (a
subclass whose `chat` answers in the look-first form). Every attention map, probability and final answer still
comes from the real model's forward passes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scripted import twin
from test_vicrop import QUESTION, scene, user  # the scene and question ViCrop's own tests probe
from transformers import AutoModelForImageTextToText

from foveate.agents.state import FoveateContext
from foveate.agents.vicrop import build, resolve_layer
from foveate.agents.vicrop_config import load_vicrop_config
from foveate.errors import FoveateError
from foveate.policies.base import ChatResult, Completion
from foveate.policies.look_first import looks_first, thought_prefix
from foveate.policies.reply_probe import ReplyProbe
from foveate.policies.transformers_vlm import TransformersVLM
from foveate.tools.store import ImageStore

REPLY = "<think>the small circle red</think>red"


def test_thought_prefix_keeps_the_thought_up_to_its_answer() -> None:
    assert thought_prefix("<think>the red circle</think>circle") == "<think>the red"
    assert thought_prefix(" <think>a green star yes</think> yes\n") == "<think>a green star"
    not_look_first = [
        "blue",  # no thought
        "<think>the square</think>blue",  # the thought does not end with the answer
        "<think>blue</think>blue",  # nothing before the answer
        "<think>the square blue",  # cut off inside the thought
        "<think>I see it</think>\n<answer>blue</answer>",  # DeepEyes' format
    ]
    assert [thought_prefix(reply) for reply in not_look_first] == [None] * len(not_look_first)


def test_auto_follows_the_recipe_saved_with_the_model(tmp_path: Path, tiny_policy) -> None:
    recipe = {"data": {"look_first": False}, "stages": [{"data": {"look_first": True}}]}
    (tmp_path / "foveate_recipe.json").write_text(json.dumps(recipe))
    assert looks_first(tmp_path)  # the last stage's data mix decides
    assert not looks_first("Qwen/Qwen2-VL-2B-Instruct") and not looks_first(None)  # a hub id: no recipe here
    assert not tiny_policy.looks_first  # the tiny model was saved without one
    plain = tiny_policy.answer_starts([user(scene(), QUESTION)], look_first="auto")
    assert plain[0].text == "" and plain[0].reply is None  # nothing written before the answer: no model call
    with pytest.raises(FoveateError, match="look_first"):
        load_vicrop_config(look_first="sometimes")


def test_a_probe_with_a_suffix_reads_attention_at_the_suffixs_last_token(tiny_policy, tiny_model_dir) -> None:
    messages, suffix, layer = user(scene(), QUESTION), "<think>the small circle", 1
    probed = tiny_policy.attention_probe([messages], layer, suffixes=[suffix])[0]
    plain = tiny_policy.attention_probe([messages], layer)[0]
    text, images = tiny_policy.render(messages)
    batch = tiny_policy.encode([text + suffix], images)
    eager = AutoModelForImageTextToText.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        output = eager(**batch, output_attentions=True)
    image_tokens = batch["input_ids"][0] == tiny_policy.image_token_id
    expected = output.attentions[layer][0, :, -1, image_tokens].mean(0).numpy()
    np.testing.assert_allclose(probed.maps[0].values.ravel(), expected, atol=1e-5)
    assert np.isclose(probed.prob, float(torch.softmax(output.logits[0, -1], -1).max()), atol=1e-5)
    assert not np.allclose(probed.maps[0].values, plain.maps[0].values)  # not the last prompt token's map


class LookFirstReplies(TransformersVLM):
    """The real tiny policy whose greedy replies are written in the look-first form (see the module docstring):
    `chat` and `reply_probe` return REPLY, and `reply_probe` reads REPLY's positions by teacher forcing it (a suffix
    probe of the real model at each prefix). Every other call, and the answer with the crop, is the real model's."""

    def __new__(cls, policy):
        double = twin(cls, policy)
        double.real, double.chats = policy, 0
        return double

    def __init__(self, policy) -> None:  # the state is the real policy's (twin)
        pass

    def chat(self, conversations, params=None):
        self.chats += 1
        return [
            ChatResult([Completion(REPLY, 8)], r.prompt_tokens, r.latency_s)
            for r in self.real.chat(conversations, params)
        ]

    def reply_probe(self, conversations, layer, max_new_tokens, *, keep=None):
        self.chats += 1
        real = self.real.reply_probe(conversations, layer, max_new_tokens, keep=keep)  # the prompts' sessions
        return [self._forced(messages, layer, r) for messages, r in zip(conversations, real, strict=True)]

    def _forced(self, messages, layer, real):
        ids = self.real.tokenizer(REPLY, add_special_tokens=False)["input_ids"] + [self.real.end_token_ids[0]]
        suffixes = [self.real.decode_ids(ids[:k]) for k in range(len(ids))]
        probes = [self.real.attention_probe([messages], layer, suffixes=[suffix])[0] for suffix in suffixes]
        reply = ChatResult([Completion(REPLY, len(ids))], real.reply.prompt_tokens, real.reply.latency_s)
        forced = ReplyProbe(reply, ids, np.zeros((len(ids), 1)), [p.prob for p in probes], session=real.session)
        forced.maps_at = lambda position: probes[position].maps
        return forced


class LookFirstChatOnly(LookFirstReplies):
    """A backend that does not record replies: the reply is written with `chat`, then probed with its thought as a
    suffix."""

    records_replies = False


@pytest.mark.parametrize("gate", [None, 1e-9])
@pytest.mark.parametrize("wrapper", [LookFirstReplies, LookFirstChatOnly])
def test_look_first_vicrop_reads_its_map_inside_the_thought(tiny_policy, tmp_path, gate, wrapper) -> None:
    store = ImageStore(tmp_path / "images")
    ref = store.put(scene())
    policy = wrapper(tiny_policy)
    config = {"configurable": {"vicrop": {"look_first": "on", "gate": gate, "reuse_prefix": True}}}
    context = FoveateContext(policy=policy, store=store, max_new_tokens=32)
    state = build().invoke({"image": ref, "question": QUESTION}, config=config, context=context)
    assert policy.chats == 1  # one greedy reply, its thought kept up to the answer
    calls = [s for s in state["steps"] if s["kind"] == "model_call"]
    written = calls[0]  # the greedy reply is the first model call
    assert written["purpose"] == "thought" and written["outputs"] == [REPLY]
    in_reply = wrapper is LookFirstReplies  # the probe was recorded while the reply was decoded
    look = written if in_reply else calls[1]
    assert look["node"] == "look" and look["thought"] == "<think>the small circle"
    question_map = next(s for s in state["steps"] if s.get("map_kind") == "attention")
    layer = resolve_layer(load_vicrop_config().layer, tiny_policy)  # configs/vicrop.yaml's
    expected = tiny_policy.attention_probe([user(store.get(ref), QUESTION)], layer, suffixes=[look["thought"]])[0]
    np.testing.assert_allclose(question_map["values"], expected.maps[0].values, atol=1e-5)
    assert np.isclose(look["confidence"], expected.prob, atol=1e-5)  # the probability of the answer in the thought
    nodes = [s["node"] for s in state["steps"] if s["kind"] == "answer"]
    assert nodes == ["answer"] and state["answer"] is not None
    if gate and in_reply:  # the finished reply is the answer: no other model call, no crop
        assert state["answer"] == "red" and len(calls) == 1
    if gate:
        assert not any(s["kind"] == "crop" for s in state["steps"])
    else:  # reply (+ probe), generic prompt, answer with the crop
        assert [c.get("purpose") for c in calls] == ["thought", "generic", None] if in_reply else len(calls) == 3


@pytest.mark.parametrize("wrapper", [LookFirstReplies, LookFirstChatOnly])
def test_answer_many_answers_gated_questions_with_the_finished_reply(tiny_policy, tmp_path, wrapper) -> None:
    from foveate.agents.vicrop import answer_many

    store = ImageStore(tmp_path / "images")
    options = load_vicrop_config(look_first="on", gate=1e-9)  # every question gated
    policy = wrapper(tiny_policy)
    out = answer_many(policy, store, [(scene(), QUESTION)], options, max_new_tokens=32)
    # The reply the thought came from is the model's answer to the question as asked: no second decode.
    assert out[0]["answer"] == "red" and out[0]["box"] is None and policy.chats == 1


def test_a_blocked_high_resolution_image_probes_every_block_after_the_one_thought(tiny_policy, tmp_path) -> None:
    from foveate.agents.vicrop import look_attention, user_turn
    from foveate.tools.saliency import split_blocks, tile_maps

    store = ImageStore(tmp_path / "images")
    image = scene(size=(1344, 1344), dot=(900, 700))
    ref = store.put(image)
    policy = LookFirstReplies(tiny_policy)
    options = load_vicrop_config(look_first="on", method="grad-att", high_res_block=1024)  # grad-att: no generic
    look = look_attention(policy, store, [(ref, user(image, QUESTION), 0)], options, 1)[0]
    assert policy.chats == 1 and look.thought == "<think>the small circle"  # one reply, on the whole image
    blocks, layout = split_blocks(image.size, options.high_res_block)
    assert layout == (2, 2)
    crops = [image.crop(tuple(int(v) for v in block.to_list())) for block in blocks]
    rows = tiny_policy.attention_probe(
        [user_turn(crop, QUESTION) for crop in crops], 1, gradient=True, suffixes=[look.thought] * len(crops)
    )
    np.testing.assert_allclose(look.heat, tile_maps([r.maps[0].values for r in rows], layout), atol=1e-5)


def test_a_reply_answers_only_a_caller_that_would_get_exactly_it() -> None:
    from foveate.policies.base import SamplingParams, answers_as_asked

    reply = ChatResult([Completion(REPLY, 10)], 80, 0.1)
    assert answers_as_asked(reply, SamplingParams(max_new_tokens=10))
    assert not answers_as_asked(reply, SamplingParams(max_new_tokens=9))  # the caller's budget would cut it
    assert not answers_as_asked(reply, SamplingParams(max_new_tokens=32, stop=["</think>"]))
    assert not answers_as_asked(reply, SamplingParams(max_new_tokens=32, temperature=0.7))
    assert not answers_as_asked(ChatResult([Completion(REPLY[:12], 24, "length")], 80, 0.1), SamplingParams())
    assert not answers_as_asked(None, SamplingParams())


@pytest.mark.parametrize("gate", [1e-9, 1.0])
def test_the_gate_answers_a_blocked_image_from_its_whole_image_reply(tiny_policy, tmp_path, gate) -> None:
    class Counting(LookFirstReplies):
        probes = 0

        def attention_probe(self, *args, **kwargs):
            self.probes += 1
            return self.real.attention_probe(*args, **kwargs)

    store = ImageStore(tmp_path / "images")
    image = scene(size=(1344, 1344), dot=(900, 700))
    ref = store.put(image)
    policy = Counting(tiny_policy)
    config = {"configurable": {"vicrop": {"look_first": "on", "gate": gate, "high_res_block": 1024}}}
    context = FoveateContext(policy=policy, store=store, max_new_tokens=32)
    state = build().invoke({"image": ref, "question": QUESTION}, config=config, context=context)
    calls = [s for s in state["steps"] if s["kind"] == "model_call"]
    assert policy.chats == 1 and 0 < state["confidence"] < 1.0  # read inside the whole-image reply
    if gate < 1:  # sure enough: the reply answers, no block is probed, no crop
        assert policy.probes == 0 and len(calls) == 1 and state["answer"] == "red"
        assert not any(s["kind"] == "crop" for s in state["steps"])
        layer = resolve_layer(load_vicrop_config().layer, tiny_policy)
        whole = tiny_policy.attention_probe([user(image, QUESTION)], layer, suffixes=["<think>the small circle"])[0]
        heat = next(s for s in state["steps"] if s.get("map_kind") == "attention")["values"]
        np.testing.assert_allclose(heat, whole.maps[0].values, atol=1e-5)  # the reply's whole-image map
    else:  # the four blocks (and their generic rows) are probed, then the crop is answered
        assert policy.probes == 2 and any(s["kind"] == "crop" for s in state["steps"])


def test_the_gate_calibration_reads_the_gates_own_confidence(tiny_policy, tmp_path) -> None:
    # For a look-first model the gate reads p(answer) inside the reply, not p("<think>") at the prompt's end (near 1
    # on every question), and a gated question's answer is the reply itself.
    from foveate.vicrop_calibrate import gate_report

    path = tmp_path / "scene.png"
    scene().save(path)
    rows = [{"image": str(path), "question": QUESTION, "answers": ["red"], "family": "attribute"}]
    options = load_vicrop_config(look_first="on")
    layer = resolve_layer(options.layer, tiny_policy)
    expected = tiny_policy.attention_probe([user(scene(), QUESTION)], layer, suffixes=["<think>the small circle"])[0]
    below, above = expected.prob * 0.99, min(expected.prob * 1.01, 1.0)
    report = gate_report(LookFirstReplies(tiny_policy), rows, (below, above), options=options)
    assert [entry["gated"] for entry in report] == [1.0, 0.0]
    assert report[0]["accuracy_gated"] == 1.0 and report[1]["accuracy_rest"] == 1.0  # "red", the reply's answer


def test_the_gate_calibration_of_a_plain_model_reads_the_last_prompt_token(tiny_policy, tmp_path) -> None:
    # Not look-first: p(first answer token) at the last prompt token, and the answer decoded from that pass's cache.
    from foveate.policies.base import SamplingParams
    from foveate.vicrop_calibrate import gate_report

    path = tmp_path / "scene.png"
    scene().save(path)
    options = load_vicrop_config(look_first="off")
    layer = resolve_layer(options.layer, tiny_policy)
    expected = tiny_policy.attention_probe([user(scene(), QUESTION)], layer)[0]
    direct = tiny_policy.chat([user(scene(), QUESTION)], SamplingParams(max_new_tokens=16))[0].text.strip()
    rows = [{"image": str(path), "question": QUESTION, "answers": [direct], "family": "attribute"}]
    below, above = expected.prob * 0.99, min(expected.prob * 1.01, 1.0)
    report = gate_report(tiny_policy, rows, (below, above), store=ImageStore(tmp_path / "images"), options=options)
    assert [entry["gated"] for entry in report] == [1.0, 0.0]
    assert report[0]["accuracy_gated"] == 1.0 and report[1]["accuracy_rest"] == 1.0  # direct's own answer
