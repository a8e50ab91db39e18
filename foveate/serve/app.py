"""The OpenAI-compatible server: every strategy is a model, the trace rides along, the page is at ``/``.

    foveate serve --port 8000 [--model DIR_OR_ID | --endpoint URL --model NAME]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    reply = client.chat.completions.create(model="foveate-direct", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,…"}},
        {"type": "text", "text": "What color is the star?"}]}])
    reply.choices[0].message.content, reply.foveate_trace["steps"]

Routes: ``POST /v1/chat/completions`` (whole or SSE streaming), ``GET /v1/models`` (one ``foveate-<strategy>``
per registered strategy that needs no ground truth), ``GET /v1/foveate/images/{ref}`` (PNG of an image-store ref
that appeared in a trace this server returned — crops, the request's own images), ``GET /`` (the chat page).

How a request runs: the body is read with a size cap, parsed and its images decoded and stored (limits.py),
then the strategy's compiled graph runs in a worker thread (graphs are synchronous) with a context whose policy
is the server's one `MicroBatcher` around the backend chosen at start. Concurrent requests therefore share
batched model calls: 16 requests that reach the model together become one padded ``generate`` on a local
transformers model. With ``batching=False`` the batcher still serialises model calls (``max_batch=1``), since a
backend need not be thread-safe. The request's messages — every turn, earlier assistant answers included — go
to the graph as LangChain messages; the server is stateless (durable threads are ``foveate chat``'s business).

Sampling parameters other than ``max_tokens``/``max_completion_tokens`` (temperature, top_p, seed) are accepted
and ignored: a strategy decides how each of its model calls decodes (greedy, or sampled where the method
samples). Every failure is an OpenAI-shaped error; nothing a client sends stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import import_module
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from foveate.errors import ContextLengthError, FoveateError, PolicyError, WhiteBoxUnsupported
from foveate.policies.base import ChatPolicy
from foveate.policies.batching import MicroBatcher
from foveate.serve.limits import MODEL_PREFIX, APIError, ChatRequest, ServeLimits, parse_chat_request
from foveate.serve.streaming import Completion, answer_pieces, iter_run, make_trace, sse
from foveate.tools.store import ImageStore

log = logging.getLogger("foveate.serve")
STATIC_DIR = Path(__file__).with_name("static")
_REF = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_REMEMBERED_REFS = 200_000


# ---- strategies ---------------------------------------------------------------------------------------------
def servable_strategies(names: list[str] | None = None, white_box: bool = True) -> dict[str, Any]:
    """name → compiled graph for every registered strategy that needs no ground truth.

    Strategies whose module sets ``REQUIRES_EVIDENCE = True`` (oracle-crop) need answer boxes a user does not
    have, so they are not served; those with ``REQUIRES_WHITE_BOX = True`` (ViCrop) are served only when
    ``white_box`` (the backend exposes attention and gradients, i.e. not an HTTP endpoint). Build options come
    from the config's ``strategy_options``. A strategy whose module fails to import is skipped with a warning rather
    than taking the whole server down.
    """
    from foveate.agents import STRATEGY_MODULES, get_builder, strategy_names
    from foveate.config import load_config

    config = load_config()
    graphs: dict[str, Any] = {}
    for name in names or strategy_names():
        if name not in STRATEGY_MODULES:
            raise FoveateError(f"unknown strategy {name!r}; choose from {', '.join(strategy_names())}")
        try:
            module = import_module(f"foveate.agents.{STRATEGY_MODULES[name]}")
            if getattr(module, "REQUIRES_EVIDENCE", False):
                continue
            if getattr(module, "REQUIRES_WHITE_BOX", False) and not white_box:
                continue
            graphs[name] = get_builder(name, config.options_for(name))()  # + registered options (vicrop-grad, …)
        except Exception as error:  # noqa: BLE001 — one broken strategy must not stop the others being served
            log.warning("not serving strategy %s: %s: %s", name, type(error).__name__, error)
    return graphs


def _summary(name: str) -> str:
    """The strategy module's first docstring line, plus the options the name is registered with."""
    from foveate import agents

    doc = import_module(f"foveate.agents.{agents.STRATEGY_MODULES[name]}").__doc__ or ""
    options = getattr(agents, "STRATEGY_OPTIONS", {}).get(name)
    shown = f" Options: {', '.join(f'{key}={value}' for key, value in options.items())}." if options else ""
    return doc.strip().split("\n")[0] + shown


def _refs_in(value: Any) -> Iterator[str]:
    """Every image-store ref mentioned anywhere in a (trace) structure."""
    if isinstance(value, str):
        if _REF.fullmatch(value):
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _refs_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _refs_in(item)


# ---- the server state ----------------------------------------------------------------------------------------
class StrategyServer:
    """Graphs, the shared batched policy, the image store, the worker threads and the limits of one app."""

    def __init__(
        self,
        policy: ChatPolicy,
        *,
        store: ImageStore | None = None,
        limits: ServeLimits | None = None,
        batching: bool = True,
        max_batch: int = 16,
        max_wait_ms: float = 5,
        strategies: list[str] | None = None,
        wisdom: ChatPolicy | None = None,
    ) -> None:
        self.limits = limits or ServeLimits()
        self.store = store or ImageStore()
        self.backend = policy
        self.wisdom = wisdom  # text-only roles' LLM (proreason, vpd); None = the configured one or the VLM
        # batching off = one conversation per model call, still serialised (backends need not be thread-safe)
        self.policy = MicroBatcher(policy, max_batch=max_batch if batching else 1, max_wait_ms=max_wait_ms)
        self.graphs = servable_strategies(strategies, white_box=policy.white_box)
        self.summaries = {name: _summary(name) for name in self.graphs}
        self.executor = ThreadPoolExecutor(self.limits.max_concurrency, thread_name_prefix="foveate-serve")
        self._refs: OrderedDict[str, None] = OrderedDict()
        self._refs_lock = threading.Lock()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.policy.close()

    # Only refs this server has shown a client may be fetched back: the store may hold other users' images.
    def remember(self, refs: Iterator[str] | list[str]) -> None:
        with self._refs_lock:
            for ref in refs:
                self._refs[ref] = None
                self._refs.move_to_end(ref)
            while len(self._refs) > _MAX_REMEMBERED_REFS:
                self._refs.popitem(last=False)

    def knows(self, ref: str) -> bool:
        with self._refs_lock:
            return ref in self._refs

    def context(self, request: ChatRequest) -> Any:
        from foveate.agents.state import FoveateContext

        return FoveateContext(
            policy=self.policy, wisdom=self.wisdom, store=self.store, max_new_tokens=request.max_new_tokens
        )

    def inputs(self, request: ChatRequest) -> dict[str, Any]:
        # ``image`` = the conversation's last image: a follow-up turn without an image asks about it.
        return {"messages": request.messages, "image": request.image}

    async def events(self, request: ChatRequest) -> AsyncIterator[tuple[str, Any]]:
        """The run's events (``step``…, then ``final``) as they happen; `APIError` on failure or timeout.

        The graph runs in a worker thread; closing this generator early (a client that went away, a timeout)
        asks the run to stop after its current node.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()
        graph = self.graphs[request.strategy]

        def work() -> None:
            try:
                if cancel.is_set():
                    return
                for event in iter_run(graph, self.inputs(request), context=self.context(request), cancel=cancel):
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except BaseException as error:  # noqa: BLE001 — every failure goes back to the request
                loop.call_soon_threadsafe(queue.put_nowait, ("error", error))

        deadline = time.monotonic() + self.limits.request_timeout_s
        loop.run_in_executor(self.executor, work)
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    kind, value = await asyncio.wait_for(queue.get(), timeout=max(remaining, 0))
                except asyncio.TimeoutError:
                    raise APIError(
                        f"the request did not finish within {self.limits.request_timeout_s:g} s",
                        status=504,
                        type="timeout_error",
                        code="timeout",
                    ) from None
                if kind == "error":
                    raise as_api_error(value)
                yield kind, value
                if kind == "final":
                    return
        finally:
            cancel.set()


def as_api_error(error: BaseException) -> APIError:
    """Any failure of a run as an OpenAI error: input problems 400, backend failures 502, bugs 500."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ContextLengthError):
        return APIError(str(error), code="context_length_exceeded", param="messages")
    if isinstance(error, WhiteBoxUnsupported):
        return APIError(str(error), code="white_box_required")
    if isinstance(error, PolicyError):
        return APIError(f"the model backend failed: {error}", status=502, type="server_error", code="backend_error")
    if isinstance(error, FoveateError):
        return APIError(str(error), code="invalid_request")
    log.error("request failed", exc_info=(type(error), error, error.__traceback__))
    return APIError(f"internal error: {type(error).__name__}: {error}", status=500, type="server_error", code=None)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = APIError(
        f"the request body exceeds the server's limit of {limit:,} bytes",
        status=413,
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


# ---- the app -------------------------------------------------------------------------------------------------
def create_app(
    policy: ChatPolicy,
    *,
    store: ImageStore | None = None,
    limits: ServeLimits | None = None,
    batching: bool = True,
    max_batch: int = 16,
    max_wait_ms: float = 5,
    strategies: list[str] | None = None,
    wisdom: ChatPolicy | None = None,
) -> FastAPI:
    """The FastAPI app serving every strategy over ``policy`` (``app.state.server`` is its `StrategyServer`)."""
    server = StrategyServer(
        policy,
        store=store,
        limits=limits,
        batching=batching,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        strategies=strategies,
        wisdom=wisdom,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        server.close()

    app = FastAPI(title="foveate", description="OpenAI-compatible chat over images", lifespan=lifespan)
    app.state.server = server
    limits = server.limits

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return _error_response(APIError(str(error.detail), status=error.status_code, code=code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(APIError(str(error), status=422))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        return _error_response(as_api_error(error))

    def model_card(name: str) -> dict[str, Any]:
        return {
            "id": MODEL_PREFIX + name,
            "object": "model",
            "created": 0,
            "owned_by": "foveate",
            "foveate": {"strategy": name, "backend": server.backend.name, "summary": server.summaries.get(name, "")},
        }

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name) for name in sorted(server.graphs)]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict[str, Any]:
        name = model_id.removeprefix(MODEL_PREFIX)
        if not model_id.startswith(MODEL_PREFIX) or name not in server.graphs:
            raise APIError(f"The model `{model_id}` does not exist.", status=404, code="model_not_found")
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        raw = await read_body(request, limits.max_body_bytes)
        loop = asyncio.get_running_loop()
        parsed = await loop.run_in_executor(server.executor, _parse, raw, server)  # base64 + decoding is CPU work
        completion = Completion(parsed.model)
        events = server.events(parsed)
        if not parsed.stream:
            steps, final = [], {}
            async for kind, value in events:
                if kind == "step":
                    steps.append(value)
                else:
                    final = value
            trace = make_trace(parsed.strategy, final, steps, server.backend.name)
            server.remember([*parsed.image_refs, *_refs_in(trace.to_dict())])
            return JSONResponse(completion.whole(trace.answer, trace))
        # Streaming: wait for the first event so a run that fails at once still gets a proper HTTP status.
        try:
            first = await events.__anext__()
        except BaseException:
            await events.aclose()
            raise
        server.remember(parsed.image_refs)
        return StreamingResponse(
            _stream(server, parsed, completion, first, events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/v1/foveate/images/{ref}")
    async def image(ref: str) -> Response:
        if not _REF.fullmatch(ref):
            raise APIError("malformed image ref: expected sha256: and 64 lowercase hex digits", code="invalid_ref")
        path = server.store.path(ref)
        if not server.knows(ref) or not path.is_file():
            raise APIError(f"unknown image ref {ref}", status=404, code="not_found")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _parse(raw: bytes, server: StrategyServer) -> ChatRequest:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise APIError(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    return parse_chat_request(body, server.graphs, server.store, server.limits)


async def _stream(
    server: StrategyServer,
    request: ChatRequest,
    completion: Completion,
    first: tuple[str, Any],
    events: AsyncIterator[tuple[str, Any]],
) -> AsyncIterator[bytes]:
    usage = request.include_usage
    steps: list[dict[str, Any]] = []
    yield sse(completion.chunk({"role": "assistant", "content": ""}, usage=usage))
    try:
        event: tuple[str, Any] | None = first
        while event is not None:
            kind, value = event
            if kind == "step":
                steps.append(value)
                server.remember(_refs_in(value))
                yield sse(completion.chunk({}, usage=usage, foveate_step=value))
                event = await events.__anext__()
                continue
            trace = make_trace(request.strategy, value, steps, server.backend.name)
            for piece in answer_pieces(trace.answer):
                yield sse(completion.chunk({"content": piece}, usage=usage))
            server.remember(_refs_in(trace.to_dict()))
            yield sse(completion.chunk({}, "stop", usage=usage, foveate_trace=trace.to_dict()))
            if usage:
                yield sse(completion.usage_chunk(steps))
            event = None
    except APIError as error:
        yield sse(error.body())
    except Exception as error:  # noqa: BLE001 — the stream ends with an error event, the server goes on
        yield sse(as_api_error(error).body())
    finally:
        await events.aclose()
    yield sse("[DONE]")


# ---- running ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a daemon thread (port 0 = a free one); yields ``http://host:port``."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # bound here, not in uvicorn: no race for a free port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {host}:{port} did not start")
            time.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
