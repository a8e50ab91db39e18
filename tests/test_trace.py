"""Trace steps, the JSON round-trip and the self-contained HTML export (``foveate.trace``)."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from foveate.policies.base import ChatResult, Completion
from foveate.tools.store import ImageStore
from foveate.trace import (
    Trace,
    answer_step,
    crop_step,
    heatmap_image,
    map_step,
    model_call_step,
    render_html,
    tool_call_step,
)


@pytest.fixture
def store(tmp_path) -> ImageStore:
    return ImageStore(tmp_path / "images")


@pytest.fixture
def refs(store) -> dict[str, str]:
    scene = Image.new("RGB", (200, 100), "white")
    scene.paste("red", (10, 20, 40, 60))
    crop = scene.crop((10, 20, 40, 60))
    return {"scene": store.put(scene), "crop": store.put(crop)}


def _result(*texts: str, prompt_tokens: int = 90) -> ChatResult:
    completions = [Completion(text=t, completion_tokens=len(t.split()), finish_reason="stop") for t in texts]
    return ChatResult(completions=completions, prompt_tokens=prompt_tokens, latency_s=0.123456, model="tiny")


def _sample_trace(refs: dict[str, str], question: str = "What is in the <script>alert(1)</script> box?") -> Trace:
    prompt = [
        {"role": "user", "content": [{"type": "image", "ref": refs["scene"]}, {"type": "text", "text": question}]}
    ]
    steps = [
        model_call_step("locate", prompt, _result('{"bbox_2d": [10, 20, 40, 60]}')),
        crop_step("crop", refs["scene"], [10, 20, 40, 60], refs["crop"], reason="model asked <zoom>"),
        tool_call_step("tools", "image_zoom_in_tool", {"bbox_2d": [10, 20, 40, 60]}, result=refs["crop"]),
        tool_call_step("tools", "ocr", {"box": [0, 0, 1, 1]}, error="no text <found>"),
        map_step("attend", refs["scene"], np.array([[0.9, 0.1], [0.0, 0.0]], dtype=np.float32), "rel-att", layer=1),
        crop_step("crop", refs["scene"], [100.5, 10, 190, 90], refs["crop"]),
        model_call_step("answer", prompt, _result("a red box & more", "red")),
        answer_step("answer", "a red box & more"),
    ]
    return Trace(
        strategy="vicrop", question=question, image=refs["scene"], answer="a red box & more", steps=steps, model="tiny"
    )


# ---- steps ---------------------------------------------------------------------------------------------
def test_step_constructors():
    result = _result("one two", "three")
    step = model_call_step("answer", [{"role": "user", "content": "hi"}], result, temperature=0.7)
    assert step == {
        "kind": "model_call",
        "node": "answer",
        "prompt": [{"role": "user", "content": "hi"}],
        "outputs": ["one two", "three"],
        "prompt_tokens": 90,
        "completion_tokens": 3,
        "latency_s": 0.1235,
        "model": "tiny",
        "temperature": 0.7,
    }
    assert crop_step("n", "sha256:a", [1, 2, 3, 4], "sha256:b") == {
        "kind": "crop",
        "node": "n",
        "image": "sha256:a",
        "box": [1, 2, 3, 4],
        "crop": "sha256:b",
        "reason": "",
    }
    assert tool_call_step("n", "zoom", {"x": 1}, result="ok") == {
        "kind": "tool_call",
        "node": "n",
        "name": "zoom",
        "arguments": {"x": 1},
        "result": "ok",
        "error": None,
    }
    mapped = map_step("n", "sha256:a", np.array([[0.1234567, 1.0], [np.float32(0.5), 0.0]]), "grad-att", layer=[3, 4])
    assert mapped["values"] == [[0.123457, 1.0], [0.5, 0.0]]
    assert all(type(v) is float for row in mapped["values"] for v in row)
    assert (mapped["kind"], mapped["map_kind"], mapped["layer"]) == ("map", "grad-att", [3, 4])
    assert answer_step("n", "red") == {"kind": "answer", "node": "n", "text": "red"}
    json.dumps([step, mapped])  # every step is plain JSON


def test_trace_summaries(refs):
    trace = _sample_trace(refs)
    assert trace.model_calls == 2
    assert trace.completion_tokens == 5 + (5 + 1)  # words per completion, both samples counted
    assert trace.boxes == [[10, 20, 40, 60], [100.5, 10, 190, 90]]


def test_json_round_trip(refs):
    trace = _sample_trace(refs)
    data = json.loads(trace.to_json())
    assert data["model_calls"] == 2 and data["completion_tokens"] == 11
    again = Trace.from_dict(data)
    assert again == trace
    assert Trace.from_dict(json.loads(again.to_json(indent=None))) == trace
    minimal = Trace.from_dict({"strategy": "direct", "question": "q", "image": None, "answer": "a"})
    assert minimal.steps == [] and minimal.model == ""


# ---- HTML ----------------------------------------------------------------------------------------------
def _data_url_images(page: str) -> list[Image.Image]:
    urls = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    return [Image.open(io.BytesIO(base64.b64decode(u))).convert("RGB") for u in urls]


def test_html_is_self_contained_and_escaped(refs, store):
    trace = _sample_trace(refs)
    page = render_html(trace, store)
    assert page.startswith("<!doctype html>") and page.endswith("</html>")
    # Nothing is fetched: every src/href is a data URL, no external scripts, styles or fonts.
    links = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', page)
    assert links and all(link.startswith("data:image/") for link in links)
    assert "http://" not in page and "https://" not in page and "@import" not in page
    # The question, the answer and tool texts are escaped; no injected markup survives.
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a red box &amp; more" in page
    assert "no text &lt;found&gt;" in page and "model asked &lt;zoom&gt;" in page
    # The header image draws one rect per crop box at its original-pixel coordinates.
    header = page[: page.index("</div></div>")]
    assert header.count("<rect") == 2
    assert '<rect x="10" y="20" width="30" height="40"' in header
    assert '<rect x="100.5" y="10" width="89.5" height="80"' in header
    assert 'viewBox="0 0 200 100"' in header
    # Every step renders, in order.
    kinds = re.findall(r"<div class='kind'>([a-z_]+)[ <]", page)
    assert kinds == [step["kind"] for step in trace.steps]
    # A card names its node unless the node is the step's kind (the answer node's answer: "answer", once).
    assert "<div class='kind'>model_call · answer</div>" in page and "<div class='kind'>answer</div>" in page
    assert "answer · answer" not in page
    assert "2 model calls · " in page  # counted nouns agree: "1 model call", "2 model calls"
    # Images: header, 2 × (crop + its source), the map overlay.
    images = _data_url_images(page)
    assert len(images) == 1 + 2 * 2 + 1
    assert images[0].size == (200, 100)
    assert images[0].tobytes() == store.get(refs["scene"]).tobytes()


def test_map_step_renders_a_heat_map(refs, store):
    trace = _sample_trace(refs)
    page = render_html(trace, store)
    map_card = page[page.index("<div class='kind'>map") :]
    (overlay, *_) = _data_url_images(map_card)
    plain = np.asarray(store.get(refs["scene"]), dtype=int)
    heat = np.asarray(overlay, dtype=int)
    assert overlay.size == (200, 100)
    # The hottest cell (top-left quarter) is tinted red; the coldest cells keep their pixels.
    assert heat[5, 80, 0] == 255 and heat[5, 80, 1] < 120 and heat[5, 80, 2] < 120
    assert (heat[60:, :] == plain[60:, :]).all()
    assert "rel-att map, layer 1" in map_card


def test_heatmap_image_handles_flat_maps():
    flat = np.asarray(heatmap_image(np.ones((3, 3)), (30, 20)))
    assert flat.shape == (20, 30, 4) and (flat[..., 3] == 0).all()  # no division by zero, fully transparent
    ramp = np.asarray(heatmap_image(np.array([[0.0, 1.0]]), (4, 2)))
    assert ramp[0, 0, 3] == 0 and ramp[0, 3, 3] == 200


def test_trace_without_image(store):
    trace = Trace(strategy="direct", question="text only?", image=None, answer="yes", steps=[answer_step("a", "yes")])
    page = render_html(trace, store)
    assert "<img" not in page and "text only?" in page


@pytest.mark.parametrize("name", ["trace.json", "TRACE.JSON", "nested/dir/trace.json"])
def test_save_json_by_suffix(tmp_path, refs, store, name):
    trace = _sample_trace(refs)
    written = trace.save(tmp_path / name, store)
    assert written == tmp_path / name
    assert Trace.from_dict(json.loads(written.read_text())) == trace


@pytest.mark.parametrize("name", ["trace.html", "page.htm", "sub/trace.HTML"])
def test_save_html_by_suffix(tmp_path, refs, store, name):
    written = _sample_trace(refs).save(tmp_path / name, store)
    text = written.read_text()
    assert text.startswith("<!doctype html>") and "data:image/png;base64," in text


def test_one_model_call_is_singular(refs, store):
    prompt = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    one = Completion(text="red", completion_tokens=1, finish_reason="stop")
    steps = [model_call_step("answer", prompt, ChatResult([one], 5, 0.1, "tiny")), answer_step("answer", "red")]
    page = render_html(Trace(strategy="direct", question="q", image=None, answer="red", steps=steps), store)
    assert "1 model call · 1 generated token</div>" in page
