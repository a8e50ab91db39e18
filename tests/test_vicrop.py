"""ViCrop on the real tiny Qwen2-VL (random weights): maps, grad-att, sessions, the graph and its trace. No mocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scripted import twin
from transformers import AutoModelForImageTextToText
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from foveate.agents import get_builder, strategy_names
from foveate.agents.state import FoveateContext
from foveate.agents.vicrop import (
    answer_many,
    build,
    generic_cache_key,
    load_vicrop_config,
    look_attention,
    look_pure_grad,
    resolve_layer,
)
from foveate.api import run_strategy
from foveate.errors import FoveateError, WhiteBoxUnsupported
from foveate.policies.base import ChatPolicy, ChatResult, Completion, SamplingParams
from foveate.policies.batching import MicroBatcher
from foveate.policies.transformers_vlm import TransformersVLM
from foveate.tools.store import ImageStore
from foveate.trace import render_html
from foveate.vicrop_calibrate import calibrate, evidence_mass

QUESTION = "What color is the small circle?"
GREEDY = SamplingParams(max_new_tokens=6)


def scene(size=(672, 672), dot=(400, 300)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, size[0] // 3, size[1] // 3), fill="blue")
    draw.ellipse((dot[0], dot[1], dot[0] + 16, dot[1] + 16), fill="red")
    return image


def user(*parts):
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p} for p in parts]
    return [{"role": "user", "content": content}]


def token_grid(size: tuple[int, int]) -> tuple[int, int]:
    """The merged token grid the tiny processor (56²..224² pixels) gives an image of ``size``."""
    height, width = smart_resize(size[1], size[0], factor=28, min_pixels=56 * 56, max_pixels=224 * 224)
    return height // 28, width // 28


@pytest.fixture()
def store(tmp_path):
    return ImageStore(tmp_path / "images")


# ---- maps ---------------------------------------------------------------------------------------------------
SQUARE, TALL, WIDE = (672, 672), (300, 900), (900, 300)
HUGE, TALL_HUGE = (2048, 2048), (600, 3000)
GRIDS = {
    SQUARE: token_grid(SQUARE),  # 8 × 8
    TALL: token_grid(TALL),
    WIDE: token_grid(WIDE),
    HUGE: (16, 16),  # high-res: 2 × 2 blocks of 1024², each 8 × 8
    TALL_HUGE: (3 * token_grid((600, 1000))[0], token_grid((600, 1000))[1]),  # 3 × 1 blocks, none empty
}
CASES = [("rel-att", size) for size in GRIDS] + [("grad-att", s) for s in (SQUARE, TALL, HUGE)]
CASES += [("pure-grad", s) for s in (WIDE, TALL_HUGE)]  # pixel gradients are the slow ones


@pytest.mark.parametrize("method, size", CASES)
def test_every_method_maps_onto_the_token_grid(tiny_policy, store, method, size):
    expected = GRIDS[size]
    image = scene(size, dot=(size[0] // 2, size[1] // 2))
    ref = store.put(image)
    options = load_vicrop_config(method=method, cache_generic=False, high_res_block=1024)  # the paper's split
    messages = user(image, QUESTION)
    if method == "pure-grad":
        look = look_pure_grad(tiny_policy, store, ref, messages, options, 0)
    else:
        look = look_attention(tiny_policy, store, [(ref, messages, 0)], options, 1)[0]
    assert look.heat.shape == expected
    assert np.isfinite(look.heat).all() and look.heat.max() > 0
    if method != "grad-att":
        assert look.generic.shape == expected


def test_grad_att_matches_eager_attention_gradients(tiny_policy, tiny_model_dir):
    """∂v/∂A from the SDPA substitution trick equals autograd through eager attention's weights."""
    conversation = user(scene(), QUESTION)
    probe = tiny_policy.attention_probe([conversation], 1, gradient=True)[0]
    plain = tiny_policy.attention_probe([conversation], 1)[0]
    assert probe.token_id == plain.token_id and probe.prob == pytest.approx(plain.prob, abs=1e-6)

    eager = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    batch, _ = tiny_policy.prepare([conversation])
    output = eager(**batch, output_attentions=True, use_cache=False)
    attention = output.attentions[1]
    attention.retain_grad()
    torch.log_softmax(output.logits[0, -1], dim=-1).max().backward()
    row, grad = attention[0, :, -1].detach(), attention.grad[0, :, -1]
    expected = (row * grad.clamp(min=0)).mean(dim=0)
    spans = tiny_policy.image_spans(batch["input_ids"], batch["image_grid_thw"], [1])[0]
    start, end, grid = spans[0]
    expected_map = expected[start:end].reshape(grid).numpy()
    assert np.abs(expected_map).max() > 0  # the gradient is not trivially zero
    np.testing.assert_allclose(probe.maps[0].values, expected_map, rtol=1e-3, atol=1e-7)


def test_probe_maps_equal_image_attention(tiny_policy):
    conversations = [user(scene(), QUESTION), user(scene((400, 300)), "Write a general description of the image.")]
    probes = tiny_policy.attention_probe(conversations, [0, 1])
    reference = tiny_policy.image_attention(conversations, [0, 1])
    for probe, maps in zip(probes, reference, strict=True):
        np.testing.assert_allclose(probe.maps[0].values, maps[0].values, rtol=1e-5, atol=1e-8)
        assert 0 < probe.prob <= 1


# ---- sessions: prefix reuse ---------------------------------------------------------------------------------
def test_sessions_reuse_the_prefix_exactly(tiny_policy):
    image = scene()
    question = user(image, QUESTION)
    answer = user(image, image.crop((300, 200, 524, 424)), QUESTION)
    probe = tiny_policy.attention_probe([question, user(image, "Describe.")], 1, keep=[True, False])
    session = probe[0].session
    assert session is not None and probe[1].session is None
    # the answer pass's logits equal a fresh forward while prefilling only the crop and the question
    with torch.no_grad():
        batch, _ = tiny_policy.prepare([answer])
        fresh = tiny_policy.model(**batch, use_cache=False).logits[:, -1].float()
        reused, _, prompt_tokens, _ = tiny_policy._prefill_with_prefix([answer], [session])
    torch.testing.assert_close(reused, fresh, rtol=1e-4, atol=1e-4)
    assert prompt_tokens == [batch["input_ids"].shape[1]]
    # decoding from the session equals ordinary greedy chat, alone and in a batch with rows without a session
    expected = [r.text for r in tiny_policy.chat([answer, question], GREEDY)]
    assert [r.text for r in tiny_policy.chat_with_prefix([answer, question], [session, None], GREEDY)] == expected
    assert tiny_policy.continue_probe([session], GREEDY)[0].text == expected[1]
    # a probe can reuse the session too: the generic prompt's map without a second pass over the image
    generic = user(image, "Write a general description of the image.")
    reusing = tiny_policy.attention_probe([generic, question], [0, 1], sessions=[session, None])
    fresh_probe = tiny_policy.attention_probe([generic, question], [0, 1])
    for got, want in zip(reusing, fresh_probe, strict=True):
        np.testing.assert_allclose(got.maps[0].values, want.maps[0].values, rtol=1e-4, atol=1e-7)
        assert got.token_id == want.token_id and got.prob == pytest.approx(want.prob, abs=1e-5)
    # a different image at the same place is re-encoded, not reused
    other = user(scene(dot=(100, 500)), QUESTION)
    assert tiny_policy.chat_with_prefix([other], [session], GREEDY)[0].text == tiny_policy.chat([other], GREEDY)[0].text
    tiny_policy.release_sessions([session])
    with pytest.raises(FoveateError, match="session"):
        tiny_policy.continue_probe([session], GREEDY)


# ---- the graph ----------------------------------------------------------------------------------------------
def _images_in(step):
    return [p["ref"] for m in step["prompt"] for p in m["content"] if isinstance(p, dict) and p.get("type") == "image"]


def test_registered_names():
    for name in (
        "vicrop-rel",
        "vicrop-grad",
        "vicrop-puregrad",
        "vicrop-carve",
        "vicrop-rel-gate",
        "vicrop-rel-blocks",
    ):
        assert name in strategy_names()
        assert callable(get_builder(name))
    with pytest.raises(FoveateError, match="unknown ViCrop method"):
        build(method="sideways")


@pytest.mark.parametrize("name", ["vicrop-rel", "vicrop-grad", "vicrop-puregrad"])
def test_graph_appends_the_crop_and_traces_every_step(tiny_policy, store, name):
    ref = store.put(scene())
    result = run(name, {"image": ref, "question": QUESTION}, tiny_policy, store)
    steps = result.trace.steps
    kinds = [s["kind"] for s in steps]
    assert kinds[0] == "model_call" and kinds[-3:] == ["crop", "model_call", "answer"] and "map" in kinds
    heat = [s for s in steps if s["kind"] == "map"][-1]
    assert heat["map_kind"] == load_vicrop_config(**get_builder(name).keywords).method
    assert np.asarray(heat["values"]).shape == (8, 8) and heat["image"] == ref
    crop = steps[-3]
    x1, y1, x2, y2 = crop["box"]
    assert x2 - x1 == y2 - y1 and 224 <= x2 - x1 <= 448  # an s·r square, s = 224
    assert _images_in(steps[-2]) == [ref, crop["crop"]]  # original first, then the crop
    assert result.answer == steps[-1]["text"] and result.trace.boxes == [crop["box"]]
    page = render_html(result.trace, store)  # heat-map over the image, the box and the crop, all embedded
    assert f"{heat['map_kind']} map" in page and page.count("data:image/png;base64") >= 4


@pytest.mark.parametrize("name, grid", [("vicrop-rel", (8, 8)), ("vicrop-rel-blocks", GRIDS[HUGE])])
def test_only_vicrop_rel_blocks_maps_a_large_image_in_blocks(tiny_policy, store, name, grid):
    # vicrop-rel maps a 2048-px image whole at the model's input size; vicrop-rel-blocks (the paper's split for
    # V*) maps 2 × 2 blocks of 1024 px at that size each and tiles the maps
    ref = store.put(scene(HUGE, dot=(1500, 600)))
    steps = run(name, {"image": ref, "question": QUESTION}, tiny_policy, store).trace.steps
    heat = [s for s in steps if s["kind"] == "map"][-1]
    assert np.asarray(heat["values"]).shape == grid


def test_generic_map_is_cached_per_image(tiny_policy, store):
    ref = store.put(scene())
    options = load_vicrop_config()
    key = generic_cache_key(tiny_policy, options, resolve_layer(options.layer, tiny_policy), (1, 1))
    assert store.get_array(ref, key) is None
    first = run("vicrop-rel", {"image": ref, "question": QUESTION}, tiny_policy, store)
    cached = store.get_array(ref, key)
    assert cached is not None and cached.shape == (8, 8)
    second = run("vicrop-rel", {"image": ref, "question": "How many squares are there?"}, tiny_policy, store)
    probes = [result.trace.steps[0] for result in (first, second)]
    assert [p["rows"] for p in probes] == [2, 1]  # question + generic, then the question alone
    assert [p["generic_cached"] for p in probes] == [False, True]
    generic_maps = [s for s in second.trace.steps if s.get("map_kind") == "generic"]
    np.testing.assert_allclose(generic_maps[0]["values"], cached, atol=1e-6)


def test_carve_replaces_the_image_with_a_masked_one(tiny_policy, store):
    ref = store.put(scene())
    result = run("vicrop-carve", {"image": ref, "question": QUESTION}, tiny_policy, store)
    crop, call = result.trace.steps[-3], result.trace.steps[-2]
    assert crop["box"] == [0, 0, 672, 672] and crop["crop"] != ref
    assert _images_in(call) == [crop["crop"]]  # the masked image alone
    assert store.get(crop["crop"]).size == (672, 672)


def test_gate_answers_from_the_question_pass(tiny_policy, store):
    ref = store.put(scene())
    inputs = {"image": ref, "question": QUESTION}
    direct = run("direct", inputs, tiny_policy, store)
    config = {"configurable": {"vicrop": {"gate": 1e-9}}}  # per-call options: the gate always fires
    state = build().invoke(inputs, config=config, context=_context(tiny_policy, store))
    kinds = [s["kind"] for s in state["steps"]]
    assert "crop" not in kinds and state["steps"][-2].get("gated") is True
    assert not [s for s in state["steps"] if s.get("map_kind") == "generic"]  # gated before the generic pass
    assert state["answer"] == direct.answer  # decoded from the probe's cache: the same greedy answer
    never = build().invoke(
        inputs, config={"configurable": {"vicrop": {"gate": 1.0}}}, context=_context(tiny_policy, store)
    )
    assert "crop" in [s["kind"] for s in never["steps"]]


def _context(policy, store):
    return FoveateContext(policy=policy, store=store, max_new_tokens=6)


def run(name, inputs, policy, store):
    return run_strategy(get_builder(name)(), inputs, strategy=name, policy=policy, store=store, max_new_tokens=6)


def test_per_call_method_and_micro_batcher(tiny_policy, store):
    ref = store.put(scene())
    with MicroBatcher(tiny_policy) as batcher:
        config = {"configurable": {"vicrop": {"method": "grad-att", "layer": -1}}}
        state = build().invoke({"image": ref, "question": QUESTION}, config=config, context=_context(batcher, store))
    heat = [s for s in state["steps"] if s["kind"] == "map"][-1]
    assert heat["map_kind"] == "grad-att" and heat["layer"] == tiny_policy.num_layers - 1


def test_black_box_policy_is_refused_clearly(store):
    class Http(ChatPolicy):
        name = "http-model"

        def chat(self, conversations, params=None):
            return [ChatResult([Completion("red", 1)], 1, 0.0) for _ in conversations]

    with pytest.raises(WhiteBoxUnsupported, match="attention maps"):
        run("vicrop-rel", {"image": store.put(scene()), "question": QUESTION}, Http(), store)


def test_calibration_measures_evidence_mass(tiny_policy, store, tmp_path):
    values = np.zeros((8, 8))
    values[3, 4] = 1.0  # cell x 336..420, y 252..336 of a 672² image
    assert evidence_mass(values, (672, 672), [[336, 252, 420, 336]]) == pytest.approx(1.0)
    assert evidence_mass(values, (672, 672), [[336, 252, 378, 336]]) == pytest.approx(0.5)
    path = tmp_path / "scene.png"
    scene().save(path)
    rows = [{"image": str(path), "question": QUESTION, "boxes": [[400, 300, 416, 316]]}]
    report = calibrate(tiny_policy, rows, store=store)
    assert [entry["layer"] for entry in report] == list(range(tiny_policy.num_layers))
    assert all(0 <= entry["evidence_mass"] <= 1 and entry["n"] == 1 for entry in report)


def test_answer_many_batches_several_questions_like_the_graph(tiny_policy, store):
    items = [(scene(), QUESTION), (scene(dot=(100, 500)), "Is it red?")]
    batched = answer_many(tiny_policy, store, items, max_new_tokens=6)
    for (image, question), got in zip(items, batched, strict=True):
        state = build().invoke({"image": store.put(image), "question": question}, context=_context(tiny_policy, store))
        assert got["answer"] == state["answer"]
        assert got["box"] == state["crop_box"]
    gated = answer_many(tiny_policy, store, items, load_vicrop_config(gate=1e-9), max_new_tokens=6)
    assert all(g["box"] is None for g in gated)
    assert [g["answer"] for g in gated] == [r.text.strip() for r in tiny_policy.chat([user(*i) for i in items], GREEDY)]


def test_block_generic_rows_reusing_the_block_caches_equal_a_fresh_pass(tiny_policy, store):
    # A blocked image's generic rows reuse each block's question cache (only the generic prompt is prefilled);
    # the maps must equal those of the batched pass without reuse.
    class Recording(TransformersVLM):
        def attention_probe(self, conversations, layer, **kwargs):
            self.reused.append(sum(s is not None for s in kwargs.get("sessions") or []))
            return super().attention_probe(conversations, layer, **kwargs)

    image = scene(HUGE, dot=(1500, 600))
    ref = store.put(image)
    looks, passes = [], []
    for reuse in (True, False):
        policy = twin(Recording, tiny_policy)
        policy.reused = []
        options = load_vicrop_config(cache_generic=False, reuse_prefix=reuse, high_res_block=1024)
        looks.append(look_attention(policy, store, [(ref, user(image, QUESTION), 0)], options, 1)[0])
        passes.append(policy.reused)
    assert passes == [[0, 4], [0]]  # four block rows reused their caches; without reuse one batched pass
    assert looks[0].generic.shape == GRIDS[HUGE]
    for field in ("generic", "question", "heat"):
        np.testing.assert_allclose(getattr(looks[0], field), getattr(looks[1], field), rtol=1e-4, atol=1e-6)


def test_a_reply_start_is_prefilled_and_continued_greedily(tiny_policy):
    # chat_with_prefix(starts=…) continues text taken as written by the model: the same as greedy generation
    # over the rendered prompt with that text appended, with or without a session for the shared image.
    image = scene()
    question = user(image, QUESTION)
    answer = user(image, image.crop((300, 200, 524, 424)), QUESTION)
    start = "<think>the small circle"
    text, images = tiny_policy.render(answer)
    batch = tiny_policy.encode([text + start], images)
    with torch.no_grad():
        generated = tiny_policy.model.generate(**batch, max_new_tokens=6, do_sample=False)
    continued = tiny_policy._completion(generated[0, batch["input_ids"].shape[1] :].tolist(), GREEDY)
    session = tiny_policy.attention_probe([question], 1, keep=[True])[0].session
    with_session = tiny_policy.chat_with_prefix([answer], [session], GREEDY, starts=[start])[0]
    without = tiny_policy.chat_with_prefix([answer, question], [None, None], GREEDY, starts=[start, ""])
    assert with_session.text == without[0].text == start + continued.text
    assert with_session.completion_tokens == continued.completion_tokens  # the start is not counted again
    assert without[1].text == tiny_policy.chat([question], GREEDY)[0].text  # rows without a start are unchanged
    with pytest.raises(FoveateError, match="greedy"):
        tiny_policy.chat_with_prefix([answer], [None], SamplingParams(max_new_tokens=4, temperature=0.7), [start])
    with pytest.raises(FoveateError, match="stop"):  # a stop string would have to see the start too
        tiny_policy.chat_with_prefix([answer], [None], SamplingParams(max_new_tokens=4, stop=["x"]), [start])
