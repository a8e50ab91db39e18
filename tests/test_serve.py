"""``foveate serve`` end to end: the real tiny model behind the real server on loopback, spoken to by the official
``openai`` client (whole and streaming answers, 16 concurrent requests batched) and by raw HTTP for the exact wire
format and every error. The server must answer each bad request with an OpenAI-shaped error and live on."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from PIL import Image, ImageDraw
from scripted import twin

import foveate
from foveate.agents import STRATEGY_MODULES, get_builder
from foveate.api import run_strategy
from foveate.policies.base import ChatPolicy
from foveate.policies.transformers_vlm import TransformersVLM
from foveate.serve import ServeLimits, create_app, serve_in_thread
from foveate.tools.images import image_to_data_url
from foveate.tools.store import ImageStore

MAX_NEW_TOKENS = 8
LIMITS = ServeLimits(
    max_new_tokens=MAX_NEW_TOKENS,
    max_body_bytes=2_000_000,
    max_image_pixels=1_000_000,
    max_images=3,
    request_timeout_s=120,
)
COLORS = ["red", "blue", "green", "orange", "purple", "black", "cyan", "magenta"]


class Recording(TransformersVLM):
    """The tiny model, recording the size of every batched ``chat`` call the server makes; every white-box call is
    the real model's (a `twin` of it)."""

    def __new__(cls, inner: ChatPolicy):
        double = twin(cls, inner)
        double.batches = []
        return double

    def __init__(self, inner: ChatPolicy) -> None:  # the state is the real policy's (twin)
        pass

    def chat(self, conversations, params=None):
        self.batches.append(len(conversations))
        return super().chat(conversations, params)


def scene(color: str = "red", size: tuple[int, int] = (160, 120), offset: int = 0) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((20 + offset, 20, 70 + offset, 60), fill=color)
    draw.ellipse((90, 50, 150, 110), fill="blue")
    return image


def user(question: str, image: Image.Image | None = None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image_to_data_url(image)}}] if image is not None else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": question}]}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ImageStore:
    return ImageStore(tmp_path_factory.mktemp("serve") / "images")


@pytest.fixture(scope="module")
def recording(tiny_policy) -> Recording:
    return Recording(tiny_policy)


@pytest.fixture(scope="module")
def base_url(recording, store):
    app = create_app(recording, store=store, limits=LIMITS, max_batch=16, max_wait_ms=20)
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def expected(tiny_policy, store, question: str, image: Image.Image) -> str:
    """The in-process answer (``foveate.ask`` on the unwrapped model) the server must reproduce."""
    return foveate.ask(
        image, question, strategy="direct", policy=tiny_policy, store=store, max_new_tokens=MAX_NEW_TOKENS
    ).answer


def alive(base_url: str) -> None:
    response = httpx.get(f"{base_url}/v1/models", timeout=30)
    assert response.status_code == 200 and response.json()["data"]


# ---- models and answers -------------------------------------------------------------------------------------
def test_models_are_the_strategies_without_ground_truth(client):
    from importlib import import_module

    ids = {model.id for model in client.models.list()}
    assert "foveate-direct" in ids and "foveate-oracle-crop" not in ids
    for name, module in STRATEGY_MODULES.items():  # whatever strategies are registered right now
        needs_truth = getattr(import_module(f"foveate.agents.{module}"), "REQUIRES_EVIDENCE", False)
        assert (f"foveate-{name}" in ids) == (not needs_truth), name
    card = client.models.retrieve("foveate-direct")
    assert card.owned_by == "foveate" and card.foveate["strategy"] == "direct"


def test_answer_and_trace_match_the_in_process_call(client, base_url, tiny_policy, store):
    question, image = "What color is the square?", scene()
    reply = client.chat.completions.create(model="foveate-direct", messages=[user(question, image)])
    answer = reply.choices[0].message.content
    assert answer == expected(tiny_policy, store, question, image) != ""
    assert reply.object == "chat.completion" and reply.model == "foveate-direct"
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.role == "assistant"
    trace = reply.foveate_trace  # the extra top-level field
    assert trace["strategy"] == "direct" and trace["answer"] == answer and trace["question"] == question
    assert [step["kind"] for step in trace["steps"]] == ["model_call", "answer"]
    assert trace["image"] == store.ref_for(image)
    call = trace["steps"][0]
    assert (
        reply.usage.prompt_tokens == call["prompt_tokens"]
        and reply.usage.completion_tokens == call["completion_tokens"]
    )
    assert reply.usage.total_tokens == call["prompt_tokens"] + call["completion_tokens"]
    # The trace's images can be fetched back (the web page draws them); unknown and malformed refs cannot.
    png = httpx.get(f"{base_url}/v1/foveate/images/{trace['image']}")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).convert("RGB").tobytes() == image.tobytes()
    unknown = httpx.get(f"{base_url}/v1/foveate/images/sha256:{'0' * 64}")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    for bad in ("sha256:../../etc", "..%2F..%2Fetc%2Fpasswd", f"sha256:{'A' * 64}"):
        response = httpx.get(f"{base_url}/v1/foveate/images/{bad}")
        assert response.status_code in (400, 404) and "error" in response.json()


def test_streaming_steps_then_answer_then_done(client, base_url, tiny_policy, store):
    question, image = "Where is the circle?", scene("green")
    want = expected(tiny_policy, store, question, image)
    chunks = list(
        client.chat.completions.create(
            model="foveate-direct",
            messages=[user(question, image)],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(chunk.object == "chat.completion.chunk" and chunk.model == "foveate-direct" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    kinds = [
        "step" if getattr(c, "foveate_step", None) else "content" if c.choices and c.choices[0].delta.content else "-"
        for c in chunks
    ]
    first_content = kinds.index("content")
    assert "step" in kinds[:first_content] and "step" not in kinds[first_content:]  # steps stream before the answer
    steps = [c.foveate_step for c in chunks if getattr(c, "foveate_step", None)]
    assert [s["kind"] for s in steps] == ["model_call", "answer"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    assert finish[0].foveate_trace["answer"] == want and finish[0].foveate_trace["steps"] == steps
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == steps[0]["completion_tokens"]
    # The raw wire format: every event is `data: {json}`, the last is `data: [DONE]`.
    body = {"model": "foveate-direct", "messages": [user(question, image)], "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in events[:-1]]
    assert all("usage" not in p for p in payloads)  # no usage fields unless asked for


def test_conversation_turns_reach_the_model(client, tiny_policy, store):
    """Earlier turns, assistant answers included, go to the strategy: the model is prompted with all of them."""
    image = scene("orange")
    q1, a1, q2 = "What color is the square?", "orange", "And the circle?"
    messages = [{"role": "system", "content": "Answer briefly."}, user(q1, image), {"role": "assistant", "content": a1}]
    reply = client.chat.completions.create(model="foveate-direct", messages=[*messages, user(q2)])
    prompt = reply.foveate_trace["steps"][0]["prompt"]
    texts = [(m["role"], " ".join(p["text"] for p in m["content"] if p["type"] == "text")) for m in prompt]
    assert texts == [("system", "Answer briefly."), ("user", q1), ("assistant", a1), ("user", q2)]
    assert prompt[1]["content"][0] == {"type": "image", "ref": store.ref_for(image)}
    assert reply.foveate_trace["image"] == store.ref_for(image)  # the follow-up asks about the earlier image
    ref = store.put(image)
    history = [
        SystemMessage(content=[{"type": "text", "text": "Answer briefly."}]),
        HumanMessage(content=[{"type": "image", "ref": ref}, {"type": "text", "text": q1}]),
        AIMessage(content=a1),
        HumanMessage(content=[{"type": "text", "text": q2}]),
    ]
    direct = run_strategy(
        get_builder("direct")(),
        {"messages": history, "image": ref},
        strategy="direct",
        policy=tiny_policy,
        store=store,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    assert reply.choices[0].message.content == direct.answer


def test_sixteen_concurrent_requests_are_batched_and_all_correct(client, recording, tiny_policy, store):
    requests = [(f"What color is shape {i}?", scene(COLORS[i % len(COLORS)], offset=i * 4)) for i in range(16)]
    want = [expected(tiny_policy, store, question, image) for question, image in requests]
    assert len(set(want)) > 1  # the tiny model's answers depend on the input, so a mix-up would show
    recording.batches.clear()

    def ask(item):
        question, image = item
        reply = client.chat.completions.create(model="foveate-direct", messages=[user(question, image)])
        return reply.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, requests))
    assert got == want
    assert sum(recording.batches) == 16
    assert max(recording.batches) > 1 and len(recording.batches) < 16  # shared batched model calls


def test_every_served_strategy_answers(client):
    image = scene("purple")
    for model in client.models.list():
        reply = client.chat.completions.create(
            model=model.id, messages=[user("What color is the square?", image)], max_tokens=MAX_NEW_TOKENS
        )
        assert reply.foveate_trace["strategy"] == model.id.removeprefix("foveate-")
        assert reply.choices[0].message.content == reply.foveate_trace["answer"]


def test_chat_page_is_served(base_url):
    page = httpx.get(f"{base_url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for element in ('id="file"', 'id="model"', 'id="question"', 'id="ask"', 'id="log"', "/static/app.js"):
        assert element in page.text
    script = httpx.get(f"{base_url}/static/app.js")
    assert script.status_code == 200 and "/v1/chat/completions" in script.text
    assert httpx.get(f"{base_url}/static/style.css").status_code == 200
    assert httpx.get(f"{base_url}/static/../app.py").status_code == 404
    assert '<link rel="icon" href="data:,">' in page.text  # no /favicon.ico request, so no 404 in the console


# ---- errors -------------------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _body(*parts: dict, model: str = "foveate-direct", **extra) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "What?"}]}],
        **extra,
    }


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


GOOD = _image_part("data:image/png;base64," + _b64(_png(scene())))
ERROR_CASES = {
    "invalid base64": (_body(_image_part("data:image/png;base64,iVBORw0KGgo!!!notbase64")), 400, "invalid_base64"),
    "not an image": (
        _body(_image_part("data:image/png;base64," + _b64(b"hello, I am not a picture" * 10))),
        400,
        "invalid_image",
    ),
    "truncated png": (_body(_image_part("data:image/png;base64," + _b64(_png(scene())[:200]))), 400, "invalid_image"),
    "too many pixels": (
        _body(_image_part("data:image/png;base64," + _b64(_png(Image.new("RGB", (1200, 1000), "white"))))),
        413,
        "image_too_large",
    ),
    "too many images": (_body(GOOD, GOOD, GOOD, GOOD), 400, "too_many_images"),
    "unknown model": (_body(GOOD, model="gpt-4o"), 404, "model_not_found"),
    "oracle strategy not served": (_body(GOOD, model="foveate-oracle-crop"), 404, "model_not_found"),
    "remote url refused": (_body(_image_part("http://127.0.0.1:9/x.png")), 400, "remote_images_disabled"),
    "local path refused": (_body(_image_part("/etc/passwd")), 400, "invalid_image_url"),
    "file url refused": (_body(_image_part("file:///etc/passwd")), 400, "invalid_image_url"),
    "messages not a list": ({"model": "foveate-direct", "messages": "hi"}, 422, "invalid_request"),
    "message without role": ({"model": "foveate-direct", "messages": [{"content": "hi"}]}, 422, "invalid_request"),
    "content of wrong type": (
        {"model": "foveate-direct", "messages": [{"role": "user", "content": 5}]},
        422,
        "invalid_request",
    ),
    "part without type": (_body({"image_url": {"url": "x"}}), 422, "invalid_request"),
    "max_tokens not a number": (_body(GOOD, max_tokens="many"), 422, "invalid_request"),
    "unknown part type": (_body({"type": "input_audio", "input_audio": {}}), 400, "invalid_request"),
    "no image": (_body(), 400, "missing_image"),
    "last turn not the user's": (
        {
            "model": "foveate-direct",
            "messages": [{"role": "user", "content": [GOOD]}, {"role": "assistant", "content": "x"}],
        },
        400,
        "invalid_request",
    ),
    "n above one": (_body(GOOD, n=2), 400, "unsupported_value"),
    "max_tokens too large": (_body(GOOD, max_tokens=10**9), 400, "invalid_value"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_requests_get_openai_errors_and_the_server_lives(base_url, case):
    body, status, code = ERROR_CASES[case]
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert error["type"] == "invalid_request_error" and error["message"]
    stream = httpx.post(f"{base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=60)
    assert stream.status_code == status and stream.json()["error"]["code"] == code  # before any event is sent
    alive(base_url)


def test_a_question_past_the_models_positions_is_a_400_naming_the_limit(base_url, tiny_policy):
    """A prompt longer than the model's max_position_embeddings (8,192 for the tiny and the demo model) would be
    answered with garbage; the server refuses it as OpenAI does, and batched neighbours are unaffected."""
    body = {
        "model": "foveate-direct",
        "messages": [{"role": "user", "content": [GOOD, {"type": "text", "text": "a" * 10_000}]}],
    }
    with ThreadPoolExecutor(2) as pool:
        long_call = pool.submit(httpx.post, f"{base_url}/v1/chat/completions", json=body, timeout=120)
        short_call = pool.submit(httpx.post, f"{base_url}/v1/chat/completions", json=_body(GOOD), timeout=120)
        response, neighbour = long_call.result(), short_call.result()
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    assert "8,192 positions" in error["message"] and error["param"] == "messages"
    assert neighbour.status_code == 200 and neighbour.json()["choices"][0]["message"]["content"] is not None
    alive(base_url)


def test_file_paths_are_never_read(base_url, tmp_path):
    path = tmp_path / "secret.png"
    scene().save(path)
    for url in (str(path), f"file://{path}", _b64(path.read_bytes())):
        response = httpx.post(f"{base_url}/v1/chat/completions", json=_body(_image_part(url)), timeout=60)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image_url"


def test_raw_body_errors(base_url):
    url = f"{base_url}/v1/chat/completions"
    too_big = httpx.post(url, content=b"{" + b" " * (LIMITS.max_body_bytes + 10) + b"}", timeout=60)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit still holds while the body streams in
        for _ in range(LIMITS.max_body_bytes // 65536 + 2):
            yield b" " * 65536

    streamed = httpx.post(url, content=chunks(), timeout=60)
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "request_too_large"
    not_json = httpx.post(url, content=b"{not json", timeout=60)
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
    deep = httpx.post(url, content=b"[" * 100_000 + b"]" * 100_000, timeout=60)
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_json"
    not_object = httpx.post(url, json=[1, 2], timeout=60)
    assert not_object.status_code == 422
    missing = httpx.get(f"{base_url}/v1/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong_method = httpx.get(url)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    alive(base_url)


def test_openai_client_raises_the_matching_errors(client, base_url):
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="foveate-nope", messages=[user("q", scene())])
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="foveate-direct", messages=[_body(_image_part("data:image/png;base64,@@"))["messages"][0]]
        )
    assert bad.value.code == "invalid_base64"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="foveate-direct", messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.APIStatusError) as too_large:
        client.chat.completions.create(model="foveate-direct", messages=[user("q", Image.new("RGB", (1100, 1000)))])
    assert too_large.value.status_code == 413
    alive(base_url)


# ---- failures behind the server, timeouts and remote images (a scripted policy: no model needed) ---------------
class Scripted(ChatPolicy):
    """Answers with the conversation's last user text, after ``delay`` seconds, or raises ``error``."""

    name = "scripted"

    def __init__(self, delay: float = 0.0, error: BaseException | None = None) -> None:
        self.delay, self.error = delay, error

    def chat(self, conversations, params=None):
        import time

        from foveate.policies.base import ChatResult, Completion

        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        results = []
        for conversation in conversations:
            text = conversation[-1]["content"][-1]["text"]
            results.append(ChatResult([Completion(f"echo: {text}", 2)], prompt_tokens=3, latency_s=self.delay))
        return results


def _serve(policy: ChatPolicy, tmp_path, **limits):
    app = create_app(policy, store=ImageStore(tmp_path / "images"), limits=ServeLimits(**limits), strategies=["direct"])
    return serve_in_thread(app)


def test_request_timeout(tmp_path):
    with _serve(Scripted(delay=1.5), tmp_path, request_timeout_s=0.3) as url:
        for stream in (False, True):
            response = httpx.post(f"{url}/v1/chat/completions", json=_body(GOOD, stream=stream), timeout=30)
            assert response.status_code == 504
            assert response.json()["error"] == {
                "message": "the request did not finish within 0.3 s",
                "type": "timeout_error",
                "param": None,
                "code": "timeout",
            }
        alive(url)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (RuntimeError("a bug"), 500, None),
        (foveate.errors.PolicyError("endpoint down"), 502, "backend_error"),
        (foveate.errors.WhiteBoxUnsupported("needs attention maps"), 400, "white_box_required"),
    ],
)
def test_backend_failures_are_errors_not_crashes(tmp_path, error, status, code):
    with _serve(Scripted(error=error), tmp_path) as url:
        response = httpx.post(f"{url}/v1/chat/completions", json=_body(GOOD), timeout=30)
        assert response.status_code == status and response.json()["error"]["code"] == code
        ok = httpx.post(f"{url}/v1/chat/completions", json=_body(GOOD, model="foveate-nope"), timeout=30)
        assert ok.status_code == 404  # still answering
        alive(url)


def test_remote_images_only_when_enabled(tmp_path):
    png = _png(scene())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 — the stdlib's name
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    remote = _image_part(f"http://127.0.0.1:{images.server_address[1]}/scene.png")
    try:
        with _serve(Scripted(), tmp_path, allow_remote_images=True) as url:
            reply = httpx.post(f"{url}/v1/chat/completions", json=_body(remote), timeout=30).json()
            assert reply["choices"][0]["message"]["content"] == "echo: What?"
            assert reply["foveate_trace"]["image"] == ImageStore().ref_for(scene())
        with _serve(Scripted(), tmp_path) as url:
            refused = httpx.post(f"{url}/v1/chat/completions", json=_body(remote), timeout=30)
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "remote_images_disabled"
    finally:
        images.shutdown()


# ---- streaming is live, and a failure mid-stream ends the stream cleanly -----------------------------------------
def _two_step_graph(release: threading.Event, fail: bool):
    """A graph whose first node traces a step and whose second waits for ``release`` (then answers or fails)."""
    from langgraph.graph import END, START, StateGraph

    from foveate.agents.state import AgentState
    from foveate.errors import PolicyError
    from foveate.trace import answer_step, tool_call_step

    def look(state):
        return {"steps": [tool_call_step("look", "image_zoom_in_tool", {"bbox_2d": [0, 0, 10, 10]}, "ok")]}

    def answer(state):
        if not release.wait(30):
            raise AssertionError("the first step never reached the client while the run was still going")
        if fail:
            raise PolicyError("the backend went away")
        return {"answer": "done", "steps": [answer_step("answer", "done")]}

    builder = StateGraph(AgentState)
    builder.add_node("look", look)
    builder.add_node("answer", answer)
    builder.add_edge(START, "look")
    builder.add_edge("look", "answer")
    builder.add_edge("answer", END)
    return builder.compile()


@pytest.mark.parametrize("fail", [False, True])
def test_steps_stream_while_the_run_goes_on(tmp_path, fail):
    release = threading.Event()
    app = create_app(Scripted(), store=ImageStore(tmp_path / "images"), strategies=["direct"])
    app.state.server.graphs["two-step"] = _two_step_graph(release, fail)
    body = _body(GOOD, model="foveate-two-step", stream=True)
    with serve_in_thread(app) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            events = []
            for line in response.iter_lines():
                if not line:
                    continue
                events.append(line)
                if "foveate_step" in line and not release.is_set():
                    assert json.loads(line[6:])["foveate_step"]["name"] == "image_zoom_in_tool"
                    release.set()  # only now may the second node finish
        assert release.is_set() and events[-1] == "data: [DONE]"
        last = json.loads(events[-2][6:])
        if fail:
            assert last == {
                "error": {
                    "message": "the model backend failed: the backend went away",
                    "type": "server_error",
                    "param": None,
                    "code": "backend_error",
                }
            }
            release.clear()
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            stream = client.chat.completions.create(model="foveate-two-step", messages=body["messages"], stream=True)
            with pytest.raises(openai.APIError, match="backend went away"):
                for chunk in stream:
                    if getattr(chunk, "foveate_step", None):
                        release.set()
        else:
            assert last["choices"][0]["finish_reason"] == "stop" and last["foveate_trace"]["answer"] == "done"
        alive(url)
