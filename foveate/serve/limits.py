"""Request limits and request parsing for the server: everything a client can get wrong becomes an `APIError`.

An `APIError` carries the HTTP status and the OpenAI error fields, so the app answers with
``{"error": {"message", "type", "param", "code"}}``. Status codes:

- 400 ``invalid_request_error``: content the server refuses — invalid base64, data that is not an image, an
  image URL that is neither a data URL nor (when enabled) ``http(s)``, remote URLs while they are disabled, too
  many images, a conversation that does not end with a user turn or has no image, unsupported parameters.
  ``context_length_exceeded``: a prompt plus ``max_tokens`` longer than the model's positions.
- 404 ``model_not_found``: a model id that is not ``foveate-<strategy>`` for a served strategy.
- 413 ``request_too_large``: a body above ``max_body_bytes`` or an image above ``max_image_pixels``.
- 422 ``invalid_request_error``: a body that is JSON but not the shape of a chat request (``messages`` not a list,
  a message without a known role, content parts of the wrong type, parameters of the wrong type).

Images are decoded here, before any graph runs, with the server's own limits; decoded images go to the image
store and the messages the graph sees hold only ``{"type": "image", "ref": "sha256:…"}`` parts. Local file paths
and ``file://`` URLs are never read: only ``data:`` URLs (and ``http(s)`` when the operator enables it).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, SystemMessage
from PIL import Image

from foveate.errors import ImageError
from foveate.tools.images import load_image
from foveate.tools.store import ImageStore

_DATA_URL = re.compile(r"data:(?P<meta>[^,]*),(?P<payload>.*)", re.DOTALL)
_ROLES = {"system": SystemMessage, "developer": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
MODEL_PREFIX = "foveate-"


@dataclass
class ServeLimits:
    """What one request may ask of the server. Every limit is a server start option (see ``foveate serve``)."""

    max_body_bytes: int = 20 * 1024 * 1024  # a request body above this is refused with 413 before it is parsed
    max_image_pixels: int = 40_000_000  # width × height of any one image (checked from the header, pre-decode)
    max_images: int = 8  # images per request, over all messages
    max_messages: int = 256  # messages per request
    request_timeout_s: float = 300.0  # a strategy run that takes longer is abandoned and answered with 504
    max_new_tokens: int = 128  # per model call when the request names no max_tokens
    max_new_tokens_cap: int = 2048  # the largest max_tokens a request may ask for
    allow_remote_images: bool = False  # fetch http(s) image URLs (off: refused with 400)
    remote_timeout_s: float = 10.0  # per remote image fetch, when enabled
    max_concurrency: int = 64  # strategy runs in flight at once (worker threads); more wait their turn


class APIError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = "invalid_request",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.code, self.param = message, status, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _malformed(message: str, param: str | None = None) -> APIError:
    return APIError(message, status=422, code="invalid_request", param=param)


@dataclass
class ChatRequest:
    """A validated chat request: which strategy, the conversation as LangChain messages, and decoding caps."""

    model: str
    strategy: str
    messages: list[AnyMessage]
    image: str  # ref of the last image in the conversation (the one the question is about)
    max_new_tokens: int
    stream: bool
    include_usage: bool
    image_refs: list[str]


def strategy_of(model: Any, served: set[str] | dict[str, Any]) -> str:
    """``foveate-<strategy>`` → ``<strategy>``, or a 404 naming the served model ids."""
    if not isinstance(model, str) or not model:
        raise _malformed("'model' must be a non-empty string", "model")
    name = model[len(MODEL_PREFIX) :] if model.startswith(MODEL_PREFIX) else None
    if name not in served:
        known = ", ".join(MODEL_PREFIX + s for s in sorted(served))
        raise APIError(
            f"The model `{model}` does not exist. Served models: {known}",
            status=404,
            type="invalid_request_error",
            code="model_not_found",
            param="model",
        )
    return name


def _integer(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise _malformed(f"'{key}' must be an integer, got {value!r}", key)
    return int(value)


def parse_chat_request(
    body: Any, served: set[str] | dict[str, Any], store: ImageStore, limits: ServeLimits
) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body, decode and store its images; raise `APIError` on any problem."""
    if not isinstance(body, dict):
        raise _malformed("the request body must be a JSON object")
    strategy = strategy_of(body.get("model"), served)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _malformed("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _malformed("'stream_options' must be an object", "stream_options")
    include_usage = bool((options or {}).get("include_usage"))
    n = _integer(body, "n")
    if n not in (None, 1):
        raise APIError("only n=1 is supported: a strategy run gives one answer", param="n", code="unsupported_value")
    requested = [v for v in (_integer(body, "max_completion_tokens"), _integer(body, "max_tokens")) if v is not None]
    max_new_tokens = requested[0] if requested else limits.max_new_tokens
    if not 1 <= max_new_tokens <= limits.max_new_tokens_cap:
        raise APIError(
            f"max_tokens must be between 1 and {limits.max_new_tokens_cap}, got {max_new_tokens}",
            param="max_tokens",
            code="invalid_value",
        )
    messages, refs = _parse_messages(body.get("messages"), store, limits)
    if messages[-1].type != "human":
        raise APIError("the last message must be the user's question (role 'user')", param="messages")
    if not refs:
        raise APIError(
            "no image in the conversation: send the image as an image_url part with a data: URL",
            param="messages",
            code="missing_image",
        )
    return ChatRequest(
        model=body["model"],
        strategy=strategy,
        messages=messages,
        image=refs[-1],
        max_new_tokens=max_new_tokens,
        stream=bool(stream),
        include_usage=include_usage,
        image_refs=refs,
    )


def _parse_messages(raw: Any, store: ImageStore, limits: ServeLimits) -> tuple[list[AnyMessage], list[str]]:
    if not isinstance(raw, list) or not raw:
        raise _malformed("'messages' must be a non-empty list", "messages")
    if len(raw) > limits.max_messages:
        raise APIError(f"too many messages: {len(raw)} > {limits.max_messages}", param="messages")
    images = [
        (i, j)
        for i, message in enumerate(raw)
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for j, part in enumerate(message["content"])
        if isinstance(part, dict) and part.get("type") == "image_url"
    ]
    if len(images) > limits.max_images:  # counted before anything is decoded
        raise APIError(
            f"too many images: {len(images)} in one request, the limit is {limits.max_images}",
            param="messages",
            code="too_many_images",
        )
    messages: list[AnyMessage] = []
    refs: list[str] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _malformed(f"{where} must be an object", where)
        role = message.get("role")
        if role not in _ROLES:
            if role == "tool" or role == "function":
                raise APIError(f"{where}: role {role!r} is not supported by strategy models", param=where)
            raise _malformed(f"{where}.role must be one of {', '.join(_ROLES)}, got {role!r}", f"{where}.role")
        content = message.get("content")
        if role == "assistant" and content is None:
            content = ""
        if isinstance(content, str):
            parts: list[Any] = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                parts.append(_parse_part(part, f"{where}.content[{j}]", role, store, limits, refs))
        else:
            raise _malformed(f"{where}.content must be a string or a list of content parts", f"{where}.content")
        if (
            role == "user"
            and not any(p.get("type") == "text" and p["text"].strip() for p in parts)
            and i == len(raw) - 1
        ):
            raise APIError(f"{where}: the user's last message has no question text", param=where)
        cls = _ROLES[role]
        if cls is AIMessage:
            messages.append(AIMessage(content=" ".join(p["text"] for p in parts)))
        elif cls is SystemMessage:
            messages.append(SystemMessage(content=parts))
        else:
            messages.append(HumanMessage(content=parts))
    return messages, refs


def _parse_part(
    part: Any, where: str, role: str, store: ImageStore, limits: ServeLimits, refs: list[str]
) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _malformed(f"{where}.text must be a string", where)
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        if role != "user":
            raise APIError(f"{where}: images are accepted in user messages only", param=where)
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise _malformed(f"{where}.image_url.url must be a string", where)
        ref = store.put(load_request_image(url, where, limits))
        refs.append(ref)
        return {"type": "image", "ref": ref}
    if kind is None:
        raise _malformed(f"{where} must be an object with a 'type'", where)
    raise APIError(f"{where}: unsupported content part type {kind!r} (use 'text' or 'image_url')", param=where)


def load_request_image(url: str, where: str, limits: ServeLimits) -> Image.Image:
    """Decode one ``image_url``: data URLs always, ``http(s)`` only when enabled, nothing else (never a path)."""
    head = url.lstrip()[:8].lower()
    if head.startswith("data:"):
        raw = _decode_data_url(url, where)
    elif head.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise APIError(
                f"{where}: remote image URLs are disabled on this server; send the image as a data: URL "
                "(the operator can enable fetching with --allow-remote-images)",
                param=where,
                code="remote_images_disabled",
            )
        raw = _fetch(url, where, limits)
    else:
        raise APIError(
            f"{where}: image_url must be a data: URL (data:image/png;base64,…); file paths are never read",
            param=where,
            code="invalid_image_url",
        )
    return _decode_image(raw, where, limits)


def _decode_data_url(url: str, where: str) -> bytes:
    match = _DATA_URL.fullmatch(url.strip())
    if match is None:
        raise APIError(
            f"{where}: malformed data URL (no comma after the header)", param=where, code="invalid_image_url"
        )
    if "base64" not in match.group("meta").lower().split(";"):
        raise APIError(f"{where}: only base64 data URLs are supported", param=where, code="invalid_image_url")
    try:
        raw = base64.b64decode("".join(match.group("payload").split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise APIError(
            f"{where}: invalid base64 in the data URL: {error}", param=where, code="invalid_base64"
        ) from None
    if not raw:
        raise APIError(f"{where}: the data URL is empty", param=where, code="invalid_image")
    return raw


def _fetch(url: str, where: str, limits: ServeLimits) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=limits.remote_timeout_s, follow_redirects=True) as response:
            if response.status_code != 200:
                raise APIError(f"{where}: fetching the image failed with HTTP {response.status_code}", param=where)
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise APIError(
                        f"{where}: the remote image is larger than {limits.max_body_bytes} bytes",
                        status=413,
                        code="request_too_large",
                        param=where,
                    )
                chunks.append(chunk)
    except httpx.HTTPError as error:
        raise APIError(f"{where}: cannot fetch the image: {error}", param=where, code="image_fetch_failed") from None
    return b"".join(chunks)


def _decode_image(raw: bytes, where: str, limits: ServeLimits) -> Image.Image:
    """Pixel limit from the header (413), then the project's safe decoder (400 for anything else)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(raw)) as header:
                width, height = header.size
        except Image.DecompressionBombError:
            width = height = None  # larger than Pillow's own hard ceiling: certainly above ours
        except Exception:  # noqa: BLE001 — not an image at all: load_image below says so in its own words
            width = height = 0
    if width is None or (width and height and width * height > limits.max_image_pixels):
        shown = f"{width}x{height} = {width * height:,} pixels" if width else "more pixels than Pillow allows"
        raise APIError(
            f"{where}: the image is too large ({shown}); the limit is {limits.max_image_pixels:,} pixels",
            status=413,
            code="image_too_large",
            param=where,
        )
    try:
        return load_image(raw, max_pixels=limits.max_image_pixels)
    except ImageError as error:
        raise APIError(f"{where}: {error}", param=where, code="invalid_image") from None
