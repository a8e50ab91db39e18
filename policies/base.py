"""The one chat interface every model backend implements.

Messages are OpenAI-style dicts: ``{"role": "user", "content": str | [part, ...]}`` where a part is
``{"type": "text", "text": ...}``, ``{"type": "image", "image": PIL.Image | path | bytes | data-URL}`` or
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``. Assistant messages may carry
``tool_calls`` and ``role="tool"`` messages are allowed; backends pass them to the chat template as they are.

``chat`` is always batched: it takes a list of conversations and returns one ``ChatResult`` per conversation,
each with ``n`` completions. Agents issue independent calls together; the transformers backend turns them into
one padded batch and the HTTP backend sends them concurrently.

White-box calls (log-likelihoods, attention maps, pixel gradients) exist only on backends that hold the weights;
the defaults here raise ``WhiteBoxUnsupported`` so a strategy that needs them fails with a clear message.

Every policy names the coordinate convention its model reads and writes boxes in (``box_convention``, one of
`BOX_CONVENTIONS`); strategies convert at this edge (`policies.box_edge`), so everything inside foveate stays
in original-image pixels. A backend whose convention is ``"resized"`` implements ``resized_size(image_size)``.
Every backend states the side ``input_side`` of the square it sees a whole image at (ViCrop's ``s``).

`WhiteBoxPolicy` is the one protocol of backends that hold the weights: everything a strategy may ask of such a
backend beyond ``chat`` is declared there (maps, probes, sessions, the model's identity and depth). Strategies
check ``isinstance(policy, WhiteBoxPolicy)`` and call only what it declares; how a backend serialises access to
its one model (`policies.batching.MicroBatcher`'s lock) is its own concern. A model's answer format is its own
concern too: a look-first model (``<think>the red circle</think>circle``) reports, through `answer_starts`, the
text it writes before it commits to the answer, and a strategy reads and continues from there as it would from
the last prompt token of any other model.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from foveate.errors import PolicyError, WhiteBoxUnsupported

Message = dict[str, Any]
Conversation = Sequence[Message]

# How a model writes boxes: "thousand" = integers 0-1000 of the image width/height (Qwen2-VL, the demo model);
# "normalized" = fractions 0-1; "pixels" = absolute pixels of the original image; "resized" = absolute pixels
# of the model's resized input (Qwen2.5-VL), which needs the backend's ``resized_size``.
BOX_CONVENTIONS = ("thousand", "normalized", "pixels", "resized")
DEFAULT_INPUT_SIDE = 448  # pixels; the input side of a backend that does not reveal its resolution (e.g. HTTP)


def check_box_convention(value: str) -> str:
    """``value`` if it names a box convention, else a `PolicyError` listing the valid ones."""
    if value not in BOX_CONVENTIONS:
        raise PolicyError(f"unknown box convention {value!r}; expected one of {', '.join(BOX_CONVENTIONS)}")
    return value


def smart_resize(
    width: int, height: int, *, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """The ``(width, height)`` Qwen2-VL/2.5-VL processors resize an image to (their ``smart_resize`` rule).

    Both sides become multiples of ``factor`` (patch size x merge size), the pixel count stays within
    ``[min_pixels, max_pixels]`` and the aspect ratio is kept as closely as that allows. Needed to map boxes
    in the ``"resized"`` convention back to the original image.

    >>> smart_resize(672, 504, min_pixels=3136, max_pixels=50176)
    (252, 168)
    """
    if max(width, height) / min(width, height) > 200:
        raise PolicyError(f"aspect ratio of {width}x{height} exceeds 200, which Qwen2-VL processors refuse")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return w_bar, h_bar


@dataclass
class SamplingParams:
    """How to decode. ``temperature == 0`` means greedy decoding (``top_p`` and ``seed`` are then unused)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise PolicyError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise PolicyError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PolicyError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise PolicyError(f"n must be >= 1, got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled answer. ``finish_reason`` is ``"stop"`` (end of turn or a stop string) or ``"length"``."""

    text: str
    completion_tokens: int
    finish_reason: str = "stop"


@dataclass
class ChatResult:
    """The answer(s) to one conversation, with the cost of producing them."""

    completions: list[Completion]
    prompt_tokens: int
    latency_s: float
    model: str = ""

    @property
    def text(self) -> str:
        """The first completion's text (the only one when ``n == 1``)."""
        return self.completions[0].text

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.completions)


@dataclass
class ImageMap:
    """A saliency map over one input image (attention or gradient), with the geometry to place it.

    ``values`` is a 2-D array over the model's token grid (rows × columns, row-major as the model reads the
    image). ``image_size`` is the original image's (width, height); every cell covers
    ``image_size / values.shape`` original pixels, so maps from any backend overlay the same way.
    """

    values: np.ndarray
    image_size: tuple[int, int]
    kind: str = "attention"
    layer: int | list[int] | None = None

    @property
    def grid(self) -> tuple[int, int]:
        rows, cols = self.values.shape
        return int(rows), int(cols)

    def upsampled(self) -> np.ndarray:
        """The map resized to the original image (height × width), nearest cell, for overlays."""
        rows, cols = self.values.shape
        width, height = self.image_size
        row_index = np.minimum((np.arange(height) * rows) // height, rows - 1)
        col_index = np.minimum((np.arange(width) * cols) // width, cols - 1)
        return self.values[np.ix_(row_index, col_index)]


class ChatPolicy:
    """Base class of every backend. Subclasses implement ``chat``; white-box ones are `WhiteBoxPolicy`."""

    name: str = "policy"
    supports_images: bool = True
    white_box: bool = False
    box_convention: str = "thousand"  # how the model writes boxes (see BOX_CONVENTIONS); backends set their own
    # The side s (pixels) of the square the model sees a whole image at: sqrt of its pixel budget. Backends that
    # know their resolution override it (a property on the transformers backend, ``max_pixels`` over HTTP).
    input_side: int = DEFAULT_INPUT_SIDE

    def resized_size(self, image_size: Sequence[int]) -> tuple[float, float]:
        """The extent (width, height) of an image of ``image_size`` in the model's resized input; needed by the
        ``"resized"`` box convention. Backends that cannot know it raise `PolicyError`."""
        raise PolicyError(
            f"{self.name}: box convention 'resized' needs the backend's resized input size (resized_size), which "
            "it does not provide; set a different box_convention"
        )

    def chat(self, conversations: Sequence[Conversation], params: SamplingParams | None = None) -> list[ChatResult]:
        raise NotImplementedError

    def chat_one(self, messages: Conversation, params: SamplingParams | None = None) -> ChatResult:
        """Convenience for a single conversation; strategies with independent calls should batch instead."""
        return self.chat([messages], params)[0]

    # ---- white-box calls -------------------------------------------------------------------------------
    def answer_logprobs(self, conversations: Sequence[Conversation], answers: Sequence[str]) -> list[float]:
        """Sum of log p(answer tokens | conversation) for each pair."""
        raise WhiteBoxUnsupported(f"{self.name}: log-likelihoods need a white-box backend (--model DIR)")

    def image_attention(
        self, conversations: Sequence[Conversation], layer: int | Sequence[int], position: int = -1
    ) -> list[list[ImageMap]]:
        """Attention of the token at ``position`` of the prompt to each image's tokens at ``layer``."""
        raise WhiteBoxUnsupported(f"{self.name}: attention maps need a white-box backend (--model DIR)")

    def pixel_gradient(
        self, conversations: Sequence[Conversation], answers: Sequence[str | None]
    ) -> list[list[ImageMap]]:
        """Gradient norm of the answer's log-likelihood with respect to each image's input pixels."""
        raise WhiteBoxUnsupported(f"{self.name}: pixel gradients need a white-box backend (--model DIR)")

    def close(self) -> None:
        """Release network clients or worker threads; model weights are left to the garbage collector."""


@dataclass
class ProbeResult:
    """One conversation's answer to `WhiteBoxPolicy.attention_probe`."""

    maps: list[ImageMap]  # one per image of the conversation, in order
    token: str  # the argmax next token (the first answer token under greedy decoding)
    token_id: int
    prob: float  # its probability: the confidence a gate can use
    prompt_tokens: int
    latency_s: float  # wall time of the batched forward this row was part of
    session: str | None = None  # handle for `continue_probe` / `chat_with_prefix` (None when not kept)


@dataclass
class AnswerStart:
    """What a model writes before it commits to its answer (`WhiteBoxPolicy.answer_starts`).

    ``text`` is "" for a model that answers straight away (Qwen2-VL, Qwen2.5-VL): its answer position is the last
    prompt token, and nothing was decoded (``reply`` None). A look-first model's is its thought up to the answer
    (``<think>the red``), read from ``reply``, its greedy reply; ``probe``, when the reply was decoded with its
    attention recorded, is the `ProbeResult` at that position (else the caller probes with ``text`` as suffix)."""

    text: str = ""
    reply: ChatResult | None = None
    probe: ProbeResult | None = None

    def answers(self, params: SamplingParams) -> bool:
        """Whether ``reply`` can stand as the answer to a caller decoding with ``params`` (`answers_as_asked`)."""
        return answers_as_asked(self.reply, params)


def answers_as_asked(reply: ChatResult | None, params: SamplingParams) -> bool:
    """Whether a greedy ``reply`` (an answer start's) can stand as the answer to a caller decoding with ``params``:
    it ended on its own (not cut), and the caller decodes greedily, once, with no stop strings and a token budget
    the reply fits in (the answer it would get is then exactly this reply)."""
    if reply is None or reply.completions[0].finish_reason != "stop":
        return False
    plain = params.greedy and params.n == 1 and not params.stop
    return plain and reply.completion_tokens <= params.max_new_tokens


class WhiteBoxPolicy(ChatPolicy, abc.ABC):
    """A backend that holds the weights: everything a strategy may ask of it beyond ``chat``.

    Implemented by `policies.transformers_vlm.TransformersVLM` and forwarded, under its model lock, by
    `policies.batching.MicroBatcher` (so a strategy never serialises calls itself).
    """

    white_box = True

    # ---- the model ---------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def num_layers(self) -> int:
        """Decoder layers of the language model (valid ``layer`` arguments: 0 … num_layers - 1)."""

    @property
    @abc.abstractmethod
    def model_dir(self) -> Path | None:
        """The directory the weights were loaded from (None when not a local directory)."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """What a cached map depends on besides the image and prompt: the model files and the input resolution."""

    @property
    @abc.abstractmethod
    def token_cell(self) -> int:
        """Pixels of the resized input per side of one map cell (patch size × merge size: 28 for Qwen2-VL)."""

    # ---- maps and probes ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def attention_probe(
        self,
        conversations: Sequence[Conversation],
        layer: int | Sequence[int],
        *,
        gradient: bool = False,
        keep: Sequence[bool] | None = None,
        sessions: Sequence[str | None] | None = None,
        suffixes: Sequence[str] | None = None,
    ) -> list[ProbeResult]:
        """One batched forward: each conversation's image maps at ``layer`` (the last prompt token's attention, or
        grad-att with ``gradient``) and its next-token argmax and probability; ``keep[i]`` keeps row i's KV cache
        as a session; ``sessions`` reuse kept caches for a shared prefix; ``suffixes`` are assistant text the model
        is taken to have written (maps are then read at its last token)."""

    @abc.abstractmethod
    def answer_starts(
        self,
        conversations: Sequence[Conversation],
        *,
        layer: int | Sequence[int] | None = None,
        keep: Sequence[bool] | None = None,
        look_first: str = "auto",
        max_tokens: int = 24,
    ) -> list[AnswerStart]:
        """Per conversation, what the model writes before its answer (`AnswerStart`), from one batched greedy
        reply of at most ``max_tokens`` when the model answers look-first (``look_first``: ``auto`` = as its saved
        recipe says, ``on``, ``off``), else "" with no model call. With ``layer``, a reply decoded with its
        attention recorded carries the probe at the answer position (``keep[i]``: its prompt cache kept)."""

    # ---- sessions: a probed prompt's KV cache, reused -----------------------------------------------------
    @property
    @abc.abstractmethod
    def supports_prefix_reuse(self) -> bool:
        """Whether probes can keep sessions here (else ``keep`` is ignored and sessions are never returned)."""

    @abc.abstractmethod
    def continue_probe(self, sessions: Sequence[str], params: SamplingParams | None = None) -> list[ChatResult]:
        """Greedy answers to probed conversations, decoded from their kept caches (`PolicyError` if one is gone)."""

    @abc.abstractmethod
    def chat_with_prefix(
        self,
        conversations: Sequence[Conversation],
        sessions: Sequence[str | None],
        params: SamplingParams | None = None,
        starts: Sequence[str] | None = None,
    ) -> list[ChatResult]:
        """``chat``, reusing each session's cache for the prefix its conversation shares with it; ``starts``: text
        each reply begins with, taken as already written (greedy only)."""

    @abc.abstractmethod
    def release_sessions(self, sessions: Sequence[str | None]) -> None:
        """Drop kept caches (unknown or None ids are ignored)."""

    def continues_start(self, params: SamplingParams) -> bool:
        """Whether an answer can begin with a given start (`chat_with_prefix(starts=…)`): greedy, once, no stop
        strings (they would have to see the prefilled start), on a model with sessions."""
        return params.greedy and params.n == 1 and not params.stop and self.supports_prefix_reuse

    # ---- the white-box calls every such backend has (declared on ChatPolicy, abstract here) ----------------
    @abc.abstractmethod
    def answer_logprobs(self, conversations: Sequence[Conversation], answers: Sequence[str]) -> list[float]:
        """Sum of log p(answer tokens | conversation) for each pair."""

    @abc.abstractmethod
    def choice_logprobs(
        self, conversations: Sequence[Conversation], choices: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Per conversation, ``answer_logprobs`` of each of its candidate answers (e.g. ``["yes", "no"]``), with
        the conversation's prompt shared by its candidates and each distinct image encoded once per call: the
        same numbers as ``answer_logprobs`` row by row (within float tolerance), for a fraction of the work."""

    @abc.abstractmethod
    def image_attention(
        self, conversations: Sequence[Conversation], layer: int | Sequence[int], position: int = -1
    ) -> list[list[ImageMap]]:
        """Attention of the token at ``position`` of the prompt to each image's tokens at ``layer``."""

    @abc.abstractmethod
    def pixel_gradient(
        self, conversations: Sequence[Conversation], answers: Sequence[str | None]
    ) -> list[list[ImageMap]]:
        """Gradient norm of the answer's log-likelihood with respect to each image's input pixels."""


def iter_parts(message: Message) -> list[dict[str, Any]]:
    """The content of a message as a list of parts (a plain string becomes one text part)."""
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)


def is_image_part(part: dict[str, Any]) -> bool:
    return part.get("type") in ("image", "image_url")


def image_source(part: dict[str, Any]) -> Any:
    """What an image part points at: a PIL image, bytes, path or URL string."""
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    if part.get("image") is not None:
        return part["image"]
    # LangChain's standard image blocks (what agent-chat-ui sends): base64 data with a MIME type, or a URL.
    data = part.get("base64") or (part.get("data") if part.get("source_type", "base64") == "base64" else None)
    if data:
        return f"data:{part.get('mime_type', 'image/png')};base64,{data}"
    return part.get("url")


def count_images(messages: Conversation) -> int:
    return sum(1 for message in messages for part in iter_parts(message) if is_image_part(part))


def resolve_images(messages: Conversation, max_pixels: int | None = None) -> tuple[list[Message], list[Image.Image]]:
    """Replace every image part by ``{"type": "image"}`` and return the loaded images in order.

    Loading goes through ``tools.images.load_image`` (limits, EXIF, mode conversion). Remote ``http(s)`` URLs
    are refused: a backend never fetches from the network on a user's behalf.
    """
    from foveate.tools.images import load_image

    resolved: list[Message] = []
    images: list[Image.Image] = []
    for message in messages:
        if isinstance(message.get("content"), str) or message.get("content") is None:
            resolved.append(dict(message))
            continue
        parts = []
        for part in iter_parts(message):
            if is_image_part(part):
                source = image_source(part)
                if isinstance(source, str) and source.startswith(("http://", "https://")):
                    raise PolicyError("remote image URLs are not fetched; send the image as a data URL")
                kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
                images.append(load_image(source, **kwargs))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        resolved.append({**message, "content": parts})
    return resolved, images
