"""The OpenAI-compatible HTTP backend against a real server on loopback serving the tiny transformers model.

Every request crosses real HTTP (uvicorn on 127.0.0.1) into ``tests/openai_server.py``, which runs the same
``TransformersVLM`` the in-process comparisons use. Faults (503s, slow answers, garbage bodies, a closed port)
are real server behaviour, not mocks.
"""

from __future__ import annotations

import io
import json
import re
import socket
import time

import httpx
import openai
import pytest
from openai_server import make_app, serve_in_thread
from PIL import Image

from foveate.errors import PolicyError
from foveate.policies.base import SamplingParams, image_source, is_image_part, iter_parts
from foveate.policies.openai_http import OpenAIChatPolicy, split_tokens
from foveate.tools.images import image_to_data_url, load_image

MODEL = "tiny"
GREEDY = SamplingParams(max_new_tokens=12)


def _image(color: str, size: tuple[int, int]) -> Image.Image:
    img = Image.new("RGB", size, color)
    img.paste("white", (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return img


def _png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> list[list[dict]]:
    """Four conversations with images given every way a caller may give them (PIL, bytes, path, data URL),
    of different sizes and prompt lengths so each has its own prompt-token count."""
    path = tmp_path_factory.mktemp("images") / "blue.png"
    _image("blue", (90, 60)).save(path)

    def user(i: int, image: object, question: str) -> dict:
        return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}

    return [
        [user(0, _image("red", (64, 64)), "question 0: what colour is the square?")],
        [user(1, _png_bytes(_image("green", (120, 80))), "question 1: is there a small white box in the image?")],
        [
            {"role": "system", "content": "answer with a single word or phrase"},
            user(2, str(path), "question 2: which corner is the red dot in?"),
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "question 3: compare the two images, left and right"},
                    {"type": "image_url", "image_url": {"url": image_to_data_url(_image("yellow", (56, 112)))}},
                    {"type": "image", "image": _image("purple", (112, 56))},
                ],
            }
        ],
    ]


@pytest.fixture(scope="module")
def server(tiny_policy):
    """The tiny model behind a real OpenAI-compatible server; yields ``(base_url, app)``."""
    app = make_app(tiny_policy, MODEL)
    with serve_in_thread(app) as base_url:
        yield base_url, app


@pytest.fixture(scope="module")
def http_policy(server):
    with OpenAIChatPolicy(server[0], MODEL) as policy:
        yield policy


def _free_closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _assert_one_line(error: PolicyError, endpoint: str) -> None:
    message = str(error)
    assert message.startswith(endpoint), message
    assert "\n" not in message and "Traceback" not in message


def _assert_same(http_results, local_results) -> None:
    assert len(http_results) == len(local_results)
    for http, local in zip(http_results, local_results, strict=True):
        assert [c.text for c in http.completions] == [c.text for c in local.completions]
        assert [c.finish_reason for c in http.completions] == [c.finish_reason for c in local.completions]
        assert http.prompt_tokens == local.prompt_tokens
        assert http.completion_tokens == local.completion_tokens
        assert http.model == MODEL and http.latency_s > 0


# ---- answers equal the in-process model's ----------------------------------------------------------------
def _question(body: dict) -> int:
    return int(re.search(r"question (\d)", json.dumps(body["messages"])).group(1))


def test_greedy_batch_equals_in_process(server, http_policy, tiny_policy, conversations):
    local = tiny_policy.chat(conversations, GREEDY)
    seen = len(server[1].state.stats.answered)
    remote = http_policy.chat(conversations, GREEDY)
    _assert_same(remote, local)
    assert len({r.prompt_tokens for r in remote}) == 4  # distinct prompts: results are not shuffled
    assert len({r.text for r in remote}) > 1  # the fixture's model answers depend on the input (init_std)
    # The images reached the server pixel for pixel, whichever way the caller gave them.
    for body in server[1].state.stats.answered[seen:]:
        sent = [p["image_url"]["url"] for m in body["messages"] for p in iter_parts(m) if is_image_part(p)]
        given = [image_source(p) for m in conversations[_question(body)] for p in iter_parts(m) if is_image_part(p)]
        assert [load_image(u).tobytes() for u in sent] == [load_image(g).tobytes() for g in given]


def test_max_tokens_and_length_finish(http_policy, tiny_policy, conversations):
    params = SamplingParams(max_new_tokens=2)
    remote = http_policy.chat(conversations[:2], params)
    _assert_same(remote, tiny_policy.chat(conversations[:2], params))
    assert all(r.completion_tokens <= 2 for r in remote)


def test_seeded_sampling_equals_in_process(http_policy, tiny_policy, conversations):
    # The sampling fields (temperature, top_p, seed) travel end to end. One request is one policy call on the
    # server, so the reference is one in-process call per conversation with the same seed.
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
    remote = http_policy.chat(conversations, params)
    _assert_same(remote, [tiny_policy.chat_one(c, params) for c in conversations])


def test_stop_strings(http_policy, tiny_policy, conversations):
    conversation = conversations[1]
    sampled = SamplingParams(max_new_tokens=24, temperature=1.0, seed=7)
    full = tiny_policy.chat_one(conversation, sampled).text
    words = re.findall(r"[a-z0-9]{3,}", full)
    assert len(words) >= 3, f"the tiny model's sample has too few words to cut at: {full!r}"
    stop = words[len(words) // 2]
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=7, stop=["never-generated", stop])
    remote = http_policy.chat_one(conversation, params)
    _assert_same([remote], [tiny_policy.chat_one(conversation, params)])
    assert remote.text == full[: full.index(stop)]
    assert remote.completions[0].finish_reason == "stop"


def test_sampling_n_returns_n_choices(http_policy, tiny_policy, conversations):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, n=3, seed=1)
    remote = http_policy.chat_one(conversations[0], params)
    local = tiny_policy.chat_one(conversations[0], params)
    assert len(remote.completions) == 3 and len({c.text for c in remote.completions}) == 3
    assert [c.text for c in remote.completions] == [c.text for c in local.completions]
    assert remote.prompt_tokens == local.prompt_tokens
    # The server reports one completion-token total; the client splits it across the choices.
    assert remote.completion_tokens == local.completion_tokens


def test_server_ignoring_n_is_topped_up(tiny_policy, conversations):
    app = make_app(tiny_policy, MODEL, ignore_n=True)
    with serve_in_thread(app) as base_url, OpenAIChatPolicy(base_url, MODEL) as policy:
        [result] = policy.chat(conversations[:1], SamplingParams(max_new_tokens=4, temperature=1.0, n=3, seed=5))
    assert len(result.completions) == 3
    assert [body["n"] for body in app.state.stats.answered] == [3, 2, 1]
    assert [body["seed"] for body in app.state.stats.answered] == [5, 6, 7]


def test_order_preserved_when_answers_arrive_out_of_order(tiny_policy, conversations):
    def delay(body: dict) -> float:  # later questions are answered first
        return 0.15 * (len(conversations) - _question(body))

    app = make_app(tiny_policy, MODEL, delay_s=delay)
    with serve_in_thread(app) as base_url, OpenAIChatPolicy(base_url, MODEL, max_concurrency=4) as policy:
        remote = policy.chat(conversations, GREEDY)
    answered = [_question(body) for body in app.state.stats.answered]
    assert answered[0] == 3 and sorted(answered) == [0, 1, 2, 3]  # the last question was answered first
    assert app.state.stats.max_in_flight == 4
    _assert_same(remote, tiny_policy.chat(conversations, GREEDY))


def test_max_concurrency_bounds_requests_in_flight(tiny_policy, conversations):
    app = make_app(tiny_policy, MODEL, delay_s=0.1)
    with serve_in_thread(app) as base_url, OpenAIChatPolicy(base_url, MODEL, max_concurrency=2) as policy:
        policy.chat(conversations, GREEDY)
    assert app.state.stats.chat_requests == 4 and app.state.stats.max_in_flight == 2


def test_text_only_conversation(http_policy, tiny_policy):
    conversation = [{"role": "user", "content": "describe the scene"}]
    _assert_same(http_policy.chat([conversation], GREEDY), tiny_policy.chat([conversation], GREEDY))


# ---- tool turns ------------------------------------------------------------------------------------------
def _deepeyes_conversation() -> list[dict]:
    image = _image("cyan", (96, 96))
    call = {
        "id": "call_0",
        "type": "function",
        "function": {"name": "image_zoom_in_tool", "arguments": json.dumps({"bbox_2d": [24, 24, 48, 48]})},
    }
    return [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "question 0: zoom"}]},
        {"role": "assistant", "content": "<think>look closer</think>", "tool_calls": [call]},
        {
            "role": "tool",
            "tool_call_id": "call_0",
            "content": [
                {"type": "text", "text": "zoomed in"},
                {"type": "image", "image": image.crop((24, 24, 48, 48))},
            ],
        },
    ]


def test_tool_messages_with_images_pass_through(server, http_policy, tiny_policy):
    conversation = _deepeyes_conversation()
    _assert_same(http_policy.chat([conversation], GREEDY), tiny_policy.chat([conversation], GREEDY))
    sent = server[1].state.stats.answered[-1]["messages"]
    assert sent[1]["tool_calls"][0]["function"]["name"] == "image_zoom_in_tool"
    assert [p["type"] for p in sent[2]["content"]] == ["text", "image_url"]


def test_images_moved_out_of_tool_turns(server, tiny_policy):
    base_url, app = server
    with OpenAIChatPolicy(base_url, MODEL, images_in_tool_turns=False) as policy:
        result = policy.chat_one(_deepeyes_conversation(), GREEDY)
    sent = app.state.stats.answered[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "user"]
    assert sent[2]["content"] == "zoomed in"
    assert [p["type"] for p in sent[3]["content"]] == ["image_url"]
    user, assistant, tool = _deepeyes_conversation()
    moved = [user, assistant, {**tool, "content": "zoomed in"}, {"role": "user", "content": [tool["content"][1]]}]
    _assert_same([result], tiny_policy.chat([moved], GREEDY))


# ---- retries, timeouts, connection and server errors -----------------------------------------------------
def test_retries_recover_from_503(tiny_policy, conversations):
    app = make_app(tiny_policy, MODEL, fail_first_n=2)
    with serve_in_thread(app) as base_url, OpenAIChatPolicy(base_url, MODEL, max_retries=3) as policy:
        [result] = policy.chat(conversations[:1], GREEDY)
    assert app.state.stats.chat_requests == 3
    _assert_same([result], tiny_policy.chat(conversations[:1], GREEDY))


def test_503_without_retries_is_a_clear_error(tiny_policy, conversations):
    app = make_app(tiny_policy, MODEL, fail_first_n=2)
    expected = r"HTTP 503 from the server: injected failure 1 of 2 \(1 attempt\)"
    with (
        serve_in_thread(app) as base_url,
        OpenAIChatPolicy(base_url, MODEL, max_retries=0) as policy,
        pytest.raises(PolicyError, match=expected) as e,
    ):
        policy.chat(conversations[:1], GREEDY)
    _assert_one_line(e.value, base_url)
    assert isinstance(e.value.__cause__, openai.APIStatusError)
    assert app.state.stats.chat_requests == 1


def test_timeout_is_a_clear_error(tiny_policy, conversations):
    app = make_app(tiny_policy, MODEL, delay_s=0.6)
    with serve_in_thread(app) as base_url:
        policy = OpenAIChatPolicy(base_url, MODEL, timeout_s=0.15, max_retries=0)
        start = time.perf_counter()
        with pytest.raises(PolicyError, match=r"no answer within timeout_s=0.15 s \(1 attempt\)") as e:
            policy.chat(conversations[:1], GREEDY)
        assert time.perf_counter() - start < 0.5
        policy.close()
    _assert_one_line(e.value, base_url)
    assert isinstance(e.value.__cause__, openai.APITimeoutError)


def test_connection_refused_is_a_clear_error(conversations):
    endpoint = f"http://127.0.0.1:{_free_closed_port()}/v1"
    with OpenAIChatPolicy(endpoint, MODEL, max_retries=0) as policy:
        with pytest.raises(PolicyError, match=r"cannot connect \(.*refused.*\); is the server running\?") as e:
            policy.chat(conversations[:2], GREEDY)
        _assert_one_line(e.value, endpoint)
        with pytest.raises(PolicyError, match="cannot connect"):
            policy.list_models()


@pytest.mark.parametrize(
    ("kind", "cause"),
    [("html", "not a JSON chat completion: '<html>"), ("json", "Expecting value"), ("shape", "no choices")],
)
def test_malformed_response_is_a_clear_error(tiny_policy, conversations, kind, cause):
    with (
        serve_in_thread(make_app(tiny_policy, MODEL, malformed=kind)) as base_url,
        OpenAIChatPolicy(base_url, MODEL, max_retries=0) as policy,
        pytest.raises(PolicyError, match=r"malformed response from the server \(") as e,
    ):
        policy.chat(conversations[:1], GREEDY)
    _assert_one_line(e.value, base_url)
    assert cause in str(e.value)


def test_unencodable_request_is_a_clear_error(http_policy):
    with pytest.raises(PolicyError, match="cannot encode the request as JSON"):
        http_policy.chat([[{"role": "user", "content": "hi", "extra": {1, 2}}]], GREEDY)


def test_unknown_model_is_a_clear_error(server, conversations):
    expected = r"HTTP 404 from the server: The model `no-such-model` does not exist"
    with OpenAIChatPolicy(server[0], "no-such-model") as policy, pytest.raises(PolicyError, match=expected):
        policy.chat(conversations[:1], GREEDY)


# ---- refusals before any request is sent ---------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://example.com/cat.png", "HTTPS://example.com/cat.png"])
def test_remote_image_url_refused(server, http_policy, conversations, url):
    before = server[1].state.stats.chat_requests
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(PolicyError, match="remote image URLs are not fetched"):
        http_policy.chat([conversations[0], remote], GREEDY)
    assert server[1].state.stats.chat_requests == before


def test_text_only_policy_refuses_images(server, tiny_policy, conversations):
    before = server[1].state.stats.chat_requests
    with OpenAIChatPolicy(server[0], MODEL, supports_images=False) as policy:
        assert policy.supports_images is False
        with pytest.raises(PolicyError, match=r"text-only \(supports_images=False\)"):
            policy.chat(conversations, GREEDY)
        assert server[1].state.stats.chat_requests == before
        text = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
        _assert_same(policy.chat([text], GREEDY), tiny_policy.chat([text], GREEDY))


def test_list_models(http_policy):
    assert http_policy.list_models() == [MODEL]


# ---- the test server's own contract ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": MODEL, "messages": []}, "'messages' must be a non-empty list"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n must be >= 1"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}, "streaming"),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a"}}]}],
            },
            "only data: image URLs",
        ),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,xx"}}]}],
            },
            "messages[0].content[0]",
        ),
    ],
)
def test_server_answers_bad_input_with_openai_errors(server, body, message):
    response = httpx.post(f"{server[0]}/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and message in error["message"]
    assert error["type"] == "invalid_request_error"


def test_server_rejects_invalid_json(server):
    response = httpx.post(f"{server[0]}/chat/completions", content=b"{not json", headers={"content-type": "x"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


# ---- small pieces ----------------------------------------------------------------------------------------
def test_split_tokens_sums_to_total():
    assert split_tokens(10, ["abc", "abcdefg"]) == [3, 7]
    assert split_tokens(5, ["", ""]) == [3, 2]
    assert split_tokens(0, ["a", "b"]) == [0, 0]
    for total in range(12):
        assert sum(split_tokens(total, ["a", "bb", "cccc"])) == total


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://localhost:8000", "http://localhost:8000/v1"),
        ("http://localhost:8000/", "http://localhost:8000/v1"),
        ("http://localhost:11434/v1/", "http://localhost:11434/v1"),
        ("https://api.example.com/openai/v1", "https://api.example.com/openai/v1"),
    ],
)
def test_endpoint_normalised(given, expected):
    with OpenAIChatPolicy(given, MODEL) as policy:
        assert policy.endpoint == expected


@pytest.mark.parametrize("bad", ["localhost:8000", "ftp://host/v1", ""])
def test_bad_endpoint_refused(bad):
    with pytest.raises(PolicyError, match="endpoint must be"):
        OpenAIChatPolicy(bad, MODEL)


def test_closed_policy_refuses(server):
    policy = OpenAIChatPolicy(server[0], MODEL)
    policy.close()
    policy.close()
    with pytest.raises(PolicyError, match="closed"):
        policy.chat([[{"role": "user", "content": "hi"}]])


def test_the_input_side_is_declared_without_a_model(tiny_policy):
    """An HTTP backend knows its pixel bound at most (ViCrop's s, oracle-crop's window); the local one reads its
    processor; a backend that says nothing gets the declared default."""
    from foveate.policies.base import DEFAULT_INPUT_SIDE, ChatPolicy, WhiteBoxPolicy

    with OpenAIChatPolicy("http://127.0.0.1:9/v1", MODEL, max_pixels=336 * 336) as bounded:
        assert bounded.input_side == 336 and not isinstance(bounded, WhiteBoxPolicy)
    with OpenAIChatPolicy("http://127.0.0.1:9/v1", MODEL) as unbounded:
        assert unbounded.input_side == DEFAULT_INPUT_SIDE
    assert tiny_policy.input_side == 224 and isinstance(tiny_policy, WhiteBoxPolicy)
    assert ChatPolicy().input_side == DEFAULT_INPUT_SIDE
