"""OpenAI-compatible HTTP backend: vLLM, SGLang, Ollama, LM Studio, llama.cpp server or OpenAI itself.

    policy = OpenAIChatPolicy("http://localhost:8000/v1", "Qwen/Qwen2.5-VL-7B-Instruct")
    [result] = policy.chat([[{"role": "user", "content": [{"type": "image", "image": img},
                                                          {"type": "text", "text": "What colour is the star?"}]}]])

The backend is black-box: ``chat`` only (no log-likelihoods, attention or gradients; the base class raises
``WhiteBoxUnsupported`` for those).

How the interface maps onto the wire (``POST {endpoint}/chat/completions``, non-streaming):

- ``SamplingParams`` → ``max_tokens`` (``max_new_tokens``; the older name is the one vLLM, SGLang and Ollama all
  accept), ``temperature``, ``n``, ``stop`` and, when sampling (``temperature > 0``), ``top_p`` and ``seed``.
- Images (PIL images, bytes, paths, data URLs) are loaded with ``tools.images.load_image`` (limits, EXIF, RGB)
  and sent as ``image_url`` parts holding PNG data URLs (``image_format="JPEG"`` to upload less), so the server
  sees exactly the pixels the in-process backend would. Remote ``http(s)`` image URLs are refused: a backend
  never fetches from the network on a user's behalf (the same rule as ``resolve_images``).
- Assistant messages with ``tool_calls`` and ``role="tool"`` messages pass through unchanged. Tool messages may
  carry images (DeepEyes-style zoom loops); they are sent as content parts. Some servers only accept images
  in user turns (OpenAI's API; several vLLM chat templates); ``images_in_tool_turns=False`` moves the images
  of each run of consecutive tool messages into one user message right after the run (after the run, not
  between its messages, because the protocol requires every tool answer to follow its assistant turn) and
  leaves the tool messages their text.
- Results: one ``Completion`` per choice, in choice-index order; ``finish_reason`` is the server's (``stop`` or
  ``length``; ``tool_calls`` or ``content_filter`` from servers that use them; a missing one reads ``stop``).
  Servers report ``usage`` for the whole request, not per choice, so with ``n > 1`` the request's
  ``completion_tokens`` is split across the choices in proportion to their text length (exact in sum, an
  estimate per choice). A server that omits ``usage`` gives zero token counts. ``latency_s`` is the wall time
  of the conversation's request(s), retries included.
- A server that ignores ``n`` (Ollama's OpenAI API answers one choice) is topped up with further requests for
  the missing choices; with a ``seed``, each top-up request offsets it so the samples differ.
- Boxes: the server cannot say how its model writes boxes, so ``box_convention`` is the caller's (default
  ``"thousand"``, Qwen2-VL's). For ``"resized"`` (Qwen2.5-VL) `OpenAIChatPolicy.resized_size` assumes the
  server resizes like the Qwen2-VL processors (28-px cells) within ``resize_pixels`` (default: Qwen2.5-VL's
  processor bounds); pass the server's own bounds if it was started with others.

Concurrency: ``chat`` sends the conversations of a batch concurrently through a thread pool of
``max_concurrency`` workers shared by every ``chat`` call on this policy (so the bound holds across callers)
and returns the results in input order. Threads over ``AsyncOpenAI``: ``chat`` is a synchronous interface,
and driving an async client from it needs ``asyncio.run``, which fails when the caller already runs an event
loop (Jupyter, the FastAPI server, async LangGraph nodes); the sync client is thread-safe and shares one
connection pool, the work is I/O-bound, and PNG encoding of images (zlib releases the GIL) runs in parallel
too. Images are encoded in a first phase for the whole batch, so a bad image or a refused URL fails the call
before any request is sent.

Retries and timeouts are the ``openai`` client's own: ``max_retries`` retries on connection errors, timeouts,
408/409/429 and 5xx with exponential backoff and jitter (0.5 s doubling, capped at 8 s) and honours the
server's ``Retry-After``; ``timeout_s`` bounds each attempt. Every failure (connection refused, timeout, HTTP
4xx/5xx, malformed response) becomes one ``PolicyError`` line naming the endpoint and the cause, chained to
the client's exception.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import openai

from foveate.errors import PolicyError
from foveate.policies.base import (
    DEFAULT_INPUT_SIDE,
    ChatPolicy,
    ChatResult,
    Completion,
    Conversation,
    Message,
    SamplingParams,
    check_box_convention,
    image_source,
    is_image_part,
    iter_parts,
    smart_resize,
)

T = TypeVar("T")
R = TypeVar("R")

# Statuses the openai client retries (see openai._base_client._should_retry); errors with them come after
# every attempt was spent, which the message says.
_RETRIED_STATUSES = {408, 409, 429}
_STATUS_HINTS = {
    401: "check api_key or OPENAI_API_KEY",
    403: "check api_key or OPENAI_API_KEY",
    404: "check the model name (list_models()) and that the endpoint ends in /v1",
}


class OpenAIChatPolicy(ChatPolicy):
    """A model served behind an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Args:
        endpoint: base URL of the API, e.g. ``http://localhost:8000/v1`` (vLLM, SGLang),
            ``http://localhost:11434/v1`` (Ollama). A bare ``http://host:port`` gets ``/v1`` appended.
        model: the model name the server knows (``list_models()`` lists them).
        api_key: bearer token; defaults to ``$OPENAI_API_KEY``, else ``"EMPTY"`` (what local servers expect).
        timeout_s: limit on each attempt of a request (connect, read, write and pool wait each).
        max_retries: retries per request on connection errors, timeouts, 408/409/429 and 5xx (0 disables).
        max_concurrency: requests in flight at once across all ``chat`` calls on this policy.
        supports_images: ``False`` for a text-only model: image parts are refused with a ``PolicyError``.
        images_in_tool_turns: ``False`` moves images out of tool messages into a following user message, for
            servers that only accept images in user turns.
        max_pixels: bound on each image's ``width * height``; larger images are refused with ``ImageError``
            (``None``: ``load_image``'s default bound).
        image_format: how images are encoded in the data URLs. ``"PNG"`` (lossless: the server sees the pixels
            the in-process backend would); ``"JPEG"`` makes photos several times smaller to upload.
        box_convention: how the served model writes boxes (``policies.base.BOX_CONVENTIONS``): ``"thousand"``
            (Qwen2-VL, the demo model), ``"normalized"``, ``"pixels"`` (original image) or ``"resized"``
            (Qwen2.5-VL: pixels of the server's resized input, see ``resize_pixels``).
        resize_pixels: ``(min_pixels, max_pixels)`` of the server's Qwen2-VL-style resize, used only by the
            ``"resized"`` convention; the default is Qwen2.5-VL's processor's.
    """

    white_box = False

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120,
        max_retries: int = 3,
        max_concurrency: int = 8,
        supports_images: bool = True,
        images_in_tool_turns: bool = True,
        max_pixels: int | None = None,
        image_format: str = "PNG",
        box_convention: str = "thousand",
        resize_pixels: tuple[int, int] = (56 * 56, 28 * 28 * 16384),
    ) -> None:
        if timeout_s <= 0:
            raise PolicyError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0:
            raise PolicyError(f"max_retries must be >= 0, got {max_retries}")
        if max_concurrency < 1:
            raise PolicyError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if not model:
            raise PolicyError("model must be a non-empty model name")
        self.endpoint = _normalise_endpoint(endpoint)
        self.model = model
        self.name = f"openai:{model}"
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.max_concurrency = int(max_concurrency)
        self.supports_images = supports_images
        self.images_in_tool_turns = images_in_tool_turns
        self.max_pixels = max_pixels
        self.image_format = image_format
        self.box_convention = check_box_convention(box_convention)
        self.resize_pixels = (int(resize_pixels[0]), int(resize_pixels[1]))
        self._client = openai.OpenAI(
            base_url=self.endpoint,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
            timeout=self.timeout_s,
            max_retries=self.max_retries,
        )
        self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="foveate-http")
        self._closed = False

    def __repr__(self) -> str:
        return f"OpenAIChatPolicy(endpoint={self.endpoint!r}, model={self.model!r})"

    def __enter__(self) -> OpenAIChatPolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- public API ------------------------------------------------------------------------------------
    def chat(self, conversations: Sequence[Conversation], params: SamplingParams | None = None) -> list[ChatResult]:
        """Send every conversation concurrently; one ``ChatResult`` per conversation, in input order."""
        if self._closed:
            raise PolicyError(f"{self.endpoint}: policy is closed")
        params = params or SamplingParams()
        conversations = list(conversations)
        if not conversations:
            return []
        # One encoding per distinct image object in the call: agents often send the same original image with
        # each of many crops or samples. The conversations keep every source alive, so ids stay unique.
        encoded: dict[object, str] = {}
        prepared = self._map(lambda messages: self._prepare(messages, encoded), conversations)
        return self._map(lambda messages: self._request(messages, params), prepared)

    @property
    def input_side(self) -> int:
        """``sqrt(max_pixels)`` when images are bounded, else `DEFAULT_INPUT_SIDE` (the server's resolution is
        not known here)."""
        return int(math.isqrt(int(self.max_pixels))) if self.max_pixels else DEFAULT_INPUT_SIDE

    def resized_size(self, image_size: Sequence[int]) -> tuple[float, float]:
        """The ``(width, height)`` the server's model sees an image of ``image_size`` at (Qwen2-VL resize rule,
        28-px cells, ``resize_pixels`` bounds); what the ``"resized"`` box convention is relative to."""
        width, height = (int(v) for v in image_size)
        min_pixels, max_pixels = self.resize_pixels
        resized = smart_resize(width, height, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
        return float(resized[0]), float(resized[1])

    def list_models(self) -> list[str]:
        """The model names the server serves (``GET {endpoint}/models``)."""
        page = self._call(lambda: self._client.models.list())
        data = getattr(page, "data", None)
        if not isinstance(data, list) or not all(isinstance(getattr(m, "id", None), str) for m in data):
            raise PolicyError(f"{self.endpoint}: malformed response to GET /models (no list of model ids)")
        return [m.id for m in data]

    def close(self) -> None:
        """Close the HTTP client and stop the worker threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # ---- message conversion ----------------------------------------------------------------------------
    def _prepare(self, messages: Conversation, encoded: dict[object, str] | None = None) -> list[Message]:
        """Messages as the server wants them: image parts become PNG data-URL ``image_url`` parts."""
        if isinstance(messages, (str, dict)) or not isinstance(messages, Sequence):
            raise PolicyError("a conversation must be a list of message dicts")
        out: list[Message] = []
        moved: list[dict[str, Any]] = []  # images taken out of the current run of tool messages
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise PolicyError(f"each message must be a dict with a string 'role', got {message!r:.80}")
            role = message["role"]
            if moved and role != "tool":
                out.append({"role": "user", "content": moved})
                moved = []
            content = message.get("content")
            if content is None or isinstance(content, str):
                out.append(dict(message))
                continue
            move_images = role == "tool" and not self.images_in_tool_turns
            parts: list[dict[str, Any]] = []
            for part in iter_parts(message):
                if not isinstance(part, dict):
                    raise PolicyError(f"a content part must be a dict, got {part!r:.80}")
                if is_image_part(part):
                    (moved if move_images else parts).append(self._image_part(part, encoded))
                else:
                    parts.append(part)
            if move_images and all(p.get("type") == "text" for p in parts):
                # Servers strict about images in tool turns tend to be strict about tool content too: a string.
                out.append({**message, "content": "".join(p.get("text", "") for p in parts)})
            else:
                out.append({**message, "content": parts})
        if moved:
            out.append({"role": "user", "content": moved})
        return out

    def _image_part(self, part: dict[str, Any], encoded: dict[object, str] | None = None) -> dict[str, Any]:
        from foveate.tools.images import image_to_data_url, load_image

        if not self.supports_images:
            raise PolicyError(
                f"{self.endpoint}: model {self.model!r} is text-only (supports_images=False); "
                "remove the image parts or use a vision model"
            )
        source = image_source(part)
        if source is None:
            raise PolicyError(f"image part without an image: {part!r:.80}")
        if isinstance(source, str) and source.strip().lower().startswith(("http://", "https://")):
            raise PolicyError("remote image URLs are not fetched; send a data URL, PIL image, bytes or a path")
        key = source if isinstance(source, str) else id(source)
        url = None if encoded is None else encoded.get(key)
        if url is None:
            kwargs = {} if self.max_pixels is None else {"max_pixels": self.max_pixels}
            try:
                image = load_image(source, **kwargs)
            except TypeError as e:  # not an image source at all (ImageError, a FoveateError, passes through)
                raise PolicyError(f"cannot send an image given as {type(source).__name__}: {e}") from e
            url = image_to_data_url(image, self.image_format)
            if encoded is not None:
                encoded[key] = url
        return {"type": "image_url", "image_url": {"url": url}}

    # ---- requests --------------------------------------------------------------------------------------
    def _request(self, messages: list[Message], params: SamplingParams) -> ChatResult:
        request: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
        }
        if not params.greedy:
            request["top_p"] = params.top_p
        if params.stop:
            request["stop"] = list(params.stop)
        completions: list[Completion] = []
        prompt_tokens = 0
        model = self.model
        start = time.perf_counter()
        while len(completions) < params.n:
            missing = params.n - len(completions)
            request["n"] = missing
            if params.seed is not None and not params.greedy:
                request["seed"] = params.seed + len(completions)
            response = self._call(lambda: self._client.chat.completions.create(**request))
            new, prompt, served_by = self._parse(response)
            if not completions:
                prompt_tokens, model = prompt, served_by or self.model
            completions.extend(new[:missing])
        return ChatResult(
            completions=completions, prompt_tokens=prompt_tokens, latency_s=time.perf_counter() - start, model=model
        )

    def _parse(self, response: Any) -> tuple[list[Completion], int, str]:
        """Completions, prompt tokens and model name from a chat completion; ``PolicyError`` if malformed."""
        if isinstance(response, (str, bytes)):  # a 200 whose body is not JSON (e.g. a proxy's HTML page)
            raise self._malformed(f"not a JSON chat completion: {_one_line(repr(response), 80)}")
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise self._malformed("no choices")
        if all(isinstance(getattr(c, "index", None), int) for c in choices):
            choices = sorted(choices, key=lambda c: c.index)
        texts: list[str] = []
        reasons: list[str] = []
        for choice in choices:
            message = getattr(choice, "message", None)
            if message is None:
                raise self._malformed("a choice without a message")
            text = getattr(message, "content", None)
            if text is None:  # a pure tool call or a refusal carries no content
                text = ""
            if not isinstance(text, str):
                raise self._malformed(f"message content is {type(text).__name__}, not text")
            texts.append(text)
            reasons.append(getattr(choice, "finish_reason", None) or "stop")
        usage = getattr(response, "usage", None)
        prompt_tokens = _as_count(getattr(usage, "prompt_tokens", 0))
        total = _as_count(getattr(usage, "completion_tokens", 0))
        counts = split_tokens(total, texts)
        completions = [
            Completion(text=t, completion_tokens=c, finish_reason=r)
            for t, c, r in zip(texts, counts, reasons, strict=True)
        ]
        model = getattr(response, "model", None)
        return completions, prompt_tokens, model if isinstance(model, str) else ""

    def _malformed(self, what: str) -> PolicyError:
        return PolicyError(f"{self.endpoint}: malformed response from the server ({what})")

    def _call(self, fn: Callable[[], T]) -> T:
        """Run one client call; turn every client failure into a one-line ``PolicyError``."""
        attempts = self.max_retries + 1
        try:
            return fn()
        except openai.APITimeoutError as e:
            raise PolicyError(
                f"{self.endpoint}: no answer within timeout_s={self.timeout_s:g} s ({_attempts(attempts)})"
            ) from e
        except openai.APIConnectionError as e:
            raise PolicyError(
                f"{self.endpoint}: cannot connect ({_root_cause(e)}; {_attempts(attempts)}); is the server running?"
            ) from e
        except openai.APIStatusError as e:
            status = e.status_code
            detail = _server_message(e.body) or getattr(e.response, "reason_phrase", "") or "no details"
            notes = [_attempts(attempts)] if (status in _RETRIED_STATUSES or status >= 500) else []
            if status in _STATUS_HINTS:
                notes.append(_STATUS_HINTS[status])
            suffix = f" ({'; '.join(notes)})" if notes else ""
            raise PolicyError(f"{self.endpoint}: HTTP {status} from the server: {detail}{suffix}") from e
        except (openai.APIError, json.JSONDecodeError) as e:
            # APIResponseValidationError, or a body that claims to be JSON and is not.
            raise self._malformed(_one_line(str(e)) or type(e).__name__) from e
        except (TypeError, ValueError) as e:  # the client could not encode the request (e.g. a set in a message)
            raise PolicyError(f"{self.endpoint}: cannot encode the request as JSON ({_one_line(str(e))})") from e

    def _map(self, fn: Callable[[T], R], items: list[T]) -> list[R]:
        """``[fn(x) for x in items]`` on the pool; on the first failure, cancel what has not started and raise
        the error of the earliest failed item. Single items go through the pool too, so ``max_concurrency``
        bounds the requests of callers that each send one conversation from their own threads."""
        try:
            futures: list[Future[R]] = [self._pool.submit(fn, item) for item in items]
        except RuntimeError as e:  # submit after shutdown
            raise PolicyError(f"{self.endpoint}: policy is closed") from e
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done):
            for future in pending:
                future.cancel()
            for future in futures:
                if future.done() and not future.cancelled() and future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
        return [future.result() for future in futures]


def split_tokens(total: int, texts: Sequence[str]) -> list[int]:
    """Split a request's completion-token total across its choices, in proportion to text length.

    The parts sum to ``total`` exactly (largest remainders get the leftover tokens); choices with equal text
    length get equal shares up to one token. With no text at all the split is even.

    >>> split_tokens(10, ["abc", "abcdefg"])
    [3, 7]
    >>> split_tokens(5, ["", ""])
    [3, 2]
    >>> split_tokens(7, ["only one"])
    [7]
    """
    if not texts:
        return []
    weights = [len(t) for t in texts]
    if sum(weights) == 0:
        weights = [1] * len(texts)
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(texts)), key=lambda i: (exact[i] - counts[i], -i), reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _normalise_endpoint(endpoint: str) -> str:
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise PolicyError("endpoint must be a URL such as http://localhost:8000/v1")
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PolicyError(f"endpoint must be an http(s) URL such as http://localhost:8000/v1, got {endpoint!r}")
    path = parts.path.rstrip("/") or "/v1"  # a bare host:port means the conventional /v1 prefix
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _attempts(n: int) -> str:
    return "1 attempt" if n == 1 else f"{n} attempts"


def _as_count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _server_message(body: object) -> str:
    """The human part of an error body: OpenAI's ``{"error": {"message": ...}}`` (the client already unwrapped
    ``error``), FastAPI's ``{"detail": ...}``, or the raw text of e.g. a proxy's HTML page."""
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message", value)
            if value:
                return _one_line(str(value))
        return _one_line(str(body))
    return _one_line(str(body)) if body else ""


def _root_cause(error: BaseException) -> str:
    """The innermost exception's message (e.g. ``[Errno 111] Connection refused``) for a one-line error."""
    seen = {id(error)}
    cause: BaseException = error
    while True:
        nxt = cause.__cause__ or cause.__context__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        cause = nxt
    return _one_line(str(cause)) or type(cause).__name__
