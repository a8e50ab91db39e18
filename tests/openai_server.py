"""A small OpenAI-compatible server around any ``ChatPolicy``, for tests over real HTTP on loopback.

    app = make_app(policy, "tiny")
    with serve_in_thread(app) as base_url:          # "http://127.0.0.1:PORT/v1"
        OpenAIChatPolicy(base_url, "tiny").chat(...)

It implements the non-streaming subset of the API the HTTP backend uses: ``POST /v1/chat/completions`` and
``GET /v1/models``, with OpenAI-shaped error bodies (``{"error": {"message", "type", "param", "code"}}``; 400 for
bad input, 404 for an unknown model, as vLLM does). Incoming ``image_url`` data-URL parts are decoded with
``tools.images.load_image`` into ``{"type": "image", "image": PIL.Image}`` parts; remote URLs are refused.

Policy calls are serialised with a lock (a backend need not be thread-safe); one request is one
``policy.chat([conversation], params)`` call. Fault injection for retry and timeout tests is real HTTP
behaviour of this server: ``fail_first_n`` answers the first n chat requests with ``fail_status`` (503),
``delay_s`` sleeps before answering (a number, or a function of the request body), ``malformed`` answers 200
with a body that is not a chat completion (``"html"``: a proxy's page; ``"json"``: truncated JSON; ``"shape"``:
JSON without choices), and ``ignore_n`` answers one choice whatever ``n`` asks, like
Ollama. ``app.state.stats`` counts requests and records the order in which answers left.

`FunctionPolicy` answers with a Python function of the conversation: served by this app it stands in for a remote
LLM (a wisdom or programmer model) whose exact replies a control-flow test needs, where none can run here.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from foveate.errors import FoveateError
from foveate.policies.base import ChatPolicy, SamplingParams


class FunctionPolicy(ChatPolicy):
    """A text-only policy whose completion ``i`` of a conversation is ``reply(conversation, i)``; records every
    conversation and the ``n`` it was asked for. For control-flow tests served over HTTP (see the docstring)."""

    name = "function"
    supports_images = False

    def __init__(self, reply: Callable[[list[dict[str, Any]], int], str]) -> None:
        self.reply = reply
        self.seen: list[tuple[list[dict[str, Any]], int]] = []

    def chat(self, conversations, params=None):
        from foveate.policies.base import ChatResult, Completion

        params = params or SamplingParams()
        results = []
        for conversation in conversations:
            self.seen.append((list(conversation), params.n))
            texts = [self.reply(list(conversation), i) for i in range(params.n)]
            completions = [Completion(text, len(text.split())) for text in texts]
            results.append(ChatResult(completions, prompt_tokens=0, latency_s=0.0, model=self.name))
        return results


class BadRequest(Exception):
    """Raised while parsing a request; becomes an OpenAI-shaped error response."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error", code: str = "invalid"):
        super().__init__(message)
        self.message, self.status, self.type, self.code = message, status, type, code


@dataclass
class ServerStats:
    """What the server saw: chat requests received, the most it was working on at once, and, in order of
    completion, the bodies it answered."""

    chat_requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    answered: list[dict[str, Any]] = field(default_factory=list)


def error_response(message: str, *, status: int = 400, type: str = "invalid_request_error", code: str = "invalid"):
    return JSONResponse({"error": {"message": message, "type": type, "param": None, "code": code}}, status_code=status)


MALFORMED: dict[str, Callable[[], Response]] = {
    "html": lambda: HTMLResponse("<html><body>502 Bad Gateway</body></html>"),
    "json": lambda: Response(b'{"id": "chatcmpl-1", "choices": [', media_type="application/json"),
    "shape": lambda: JSONResponse({"object": "chat.completion", "choices": []}),
}


def make_app(
    policy: ChatPolicy,
    model_name: str,
    *,
    fail_first_n: int = 0,
    fail_status: int = 503,
    retry_after_s: float | None = 0.02,
    delay_s: float | Callable[[dict[str, Any]], float] = 0.0,
    malformed: str | None = None,
    ignore_n: bool = False,
) -> FastAPI:
    """An app serving ``policy`` as ``model_name``. Faults (see the module docstring) are for tests only;
    ``retry_after_s`` is sent as ``Retry-After-Ms`` with injected failures so client retries stay fast."""
    app = FastAPI(title="foveate test OpenAI server")
    stats = ServerStats()
    app.state.stats = stats
    lock = threading.Lock()

    def generate(messages: list[dict[str, Any]], params: SamplingParams):
        with lock:
            return policy.chat([messages], params)[0]

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "foveate"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        # Handlers run on the event loop's thread, so the stats need no lock.
        arrival = stats.chat_requests
        stats.chat_requests += 1
        if arrival < fail_first_n:
            response = error_response(
                f"injected failure {arrival + 1} of {fail_first_n}",
                status=fail_status,
                type="server_error",
                code="service_unavailable",
            )
            if retry_after_s is not None:
                response.headers["retry-after-ms"] = str(int(retry_after_s * 1000))
            return response
        try:
            body = await request.json()
        except ValueError:
            return error_response("request body is not valid JSON")
        if not isinstance(body, dict):
            return error_response("request body must be a JSON object")
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            return await answer(body)
        finally:
            stats.in_flight -= 1

    async def answer(body: dict[str, Any]) -> Response:
        delay = delay_s(body) if callable(delay_s) else delay_s
        if delay > 0:
            await asyncio.sleep(delay)
        if malformed is not None:
            return MALFORMED[malformed]()
        try:
            if body.get("model") != model_name:
                raise BadRequest(
                    f"The model `{body.get('model')}` does not exist.",
                    status=404,
                    type="NotFoundError",
                    code="model_not_found",
                )
            messages = await run_in_threadpool(parse_messages, body.get("messages"))  # decoding images is CPU work
            params = parse_params(body)
            n = params.n
            if ignore_n:
                params.n = 1
            result = await run_in_threadpool(generate, messages, params)
        except BadRequest as e:
            return error_response(e.message, status=e.status, type=e.type, code=e.code)
        except FoveateError as e:  # the policy refused the input (bad image, unsupported request)
            return error_response(str(e))
        except Exception as e:  # a bug behind the server: 500, as a real server would answer
            return error_response(f"{type(e).__name__}: {e}", status=500, type="server_error", code="internal_error")
        stats.answered.append(body)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            for i, c in enumerate(result.completions[: 1 if ignore_n else n])
        ]
        completion_tokens = sum(c.completion_tokens for c in result.completions)
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": choices,
                "usage": {
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": result.prompt_tokens + completion_tokens,
                },
            }
        )

    return app


def parse_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI messages → the policy's format: data-URL ``image_url`` parts become decoded ``image`` parts."""
    from foveate.tools.images import load_image

    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'")
        content = message.get("content")
        if content is None or isinstance(content, str):
            out.append(message)
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{i}].content must be a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part)
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url.startswith("data:"):
                    raise BadRequest(f"messages[{i}].content[{j}]: only data: image URLs are accepted")
                try:
                    parts.append({"type": "image", "image": load_image(url)})
                except FoveateError as e:
                    raise BadRequest(f"messages[{i}].content[{j}]: {e}") from e
            else:
                raise BadRequest(f"messages[{i}].content[{j}]: unsupported content part {kind!r}")
        out.append({**message, "content": parts})
    return out


def parse_params(body: dict[str, Any]) -> SamplingParams:
    """Request fields → ``SamplingParams`` with the API's defaults (temperature 1, top_p 1, n 1)."""
    if body.get("stream"):
        raise BadRequest("streaming is not supported by this server")

    def number(keys: tuple[str, ...], default: Any, kind: type) -> Any:
        for key in keys:
            value = body.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise BadRequest(f"'{key}' must be a{'n integer' if kind is int else ' number'}, got {value!r}")
            return kind(value)
        return default

    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise BadRequest("'stop' must be a string or a list of strings")
    try:
        return SamplingParams(
            max_new_tokens=number(("max_completion_tokens", "max_tokens"), SamplingParams.max_new_tokens, int),
            temperature=number(("temperature",), 1.0, float),
            top_p=number(("top_p",), 1.0, float),
            n=number(("n",), 1, int),
            seed=number(("seed",), None, int),
            stop=list(stop or []),
        )
    except FoveateError as e:
        raise BadRequest(str(e)) from e


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Run ``app`` with uvicorn on a free port of ``host`` in a daemon thread; yields the API base URL
    (``http://host:port/v1``) and stops the server (in-flight requests get 2 s) on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))  # binding here, not in uvicorn, means no race for the port
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"test server on {host}:{port} did not start")
            time.sleep(0.01)
        yield f"http://{host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
