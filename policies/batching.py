"""Micro-batching: many threads call ``chat`` one conversation at a time; the model sees padded batches.

The evaluator runs items concurrently from a thread pool and the server answers concurrent requests; each of
those makes its own ``chat`` calls. `MicroBatcher` wraps any `ChatPolicy` and is itself one: calls are queued,
and a single worker thread takes the oldest queued call, waits at most ``max_wait_ms`` for more, merges every
queued call with *equal* `SamplingParams` (up to ``max_batch`` conversations) into one ``policy.chat`` call,
and hands each caller its own slice of the results.

    >>> batcher = MicroBatcher(policy, max_batch=16)          # doctest: +SKIP
    >>> with ThreadPoolExecutor(16) as pool:                  # doctest: +SKIP
    ...     results = list(pool.map(lambda c: batcher.chat_one(c), conversations))
    >>> batcher.close()                                        # doctest: +SKIP

Rules worth knowing:
- Only calls with equal sampling parameters share a batch (decoding settings apply to a whole batch).
- Seeded sampling (``temperature > 0`` and ``seed`` set) is never merged: the transformers backend seeds the
  global generator once per batch, so merging would make a seeded call's samples depend on its batch-mates.
  Greedy calls are merged freely (left padding leaves greedy outputs unchanged up to float rounding).
- A call larger than ``max_batch`` goes alone; the wrapped policy splits it as it always does.
- An exception raised by the wrapped policy reaches the callers of that batch only; later batches run. When a
  merged batch fails, each of its calls is retried alone, so one bad conversation (an unreadable image, a
  request the server rejects) fails only its own caller, not the calls that happened to share its batch.
- Wrapping a `WhiteBoxPolicy` gives a `WhiteBoxBatcher`, itself a `WhiteBoxPolicy`: every white-box call it
  declares (maps, probes, sessions, answer starts) passes straight through under the same lock the worker holds
  while generating, so the model never runs two things at once and no caller takes a lock. The declared
  attributes (``name``, ``box_convention``, ``input_side``, ``num_layers``, …) are the wrapped policy's; nothing
  else is forwarded.
- ``close()`` stops the worker (pending calls fail with `PolicyError`); it does not close the wrapped policy,
  which the batcher does not own.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foveate.errors import PolicyError
from foveate.policies.base import (
    AnswerStart,
    ChatPolicy,
    ChatResult,
    Conversation,
    ImageMap,
    ProbeResult,
    SamplingParams,
    WhiteBoxPolicy,
)

__all__ = ["MicroBatcher", "WhiteBoxBatcher"]


def _params_key(params: SamplingParams) -> tuple:
    """A hashable identity for sampling parameters: calls with equal keys may share a batch."""
    return (params.max_new_tokens, params.temperature, params.top_p, params.n, params.seed, tuple(params.stop))


@dataclass
class _Request:
    conversations: list[Conversation]
    params: SamplingParams
    key: tuple
    mergeable: bool
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class MicroBatcher(ChatPolicy):
    """A thread-safe `ChatPolicy` that merges concurrent ``chat`` calls into batches of the wrapped policy."""

    def __new__(cls, policy: ChatPolicy, *args: Any, **kwargs: Any) -> MicroBatcher:
        if cls is MicroBatcher and isinstance(policy, WhiteBoxPolicy):  # the wrapper declares what it wraps
            cls = WhiteBoxBatcher
        return super().__new__(cls)

    def __init__(self, policy: ChatPolicy, max_batch: int = 16, max_wait_ms: float = 5) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.policy = policy
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.name = policy.name
        self.supports_images = policy.supports_images
        self.white_box = policy.white_box
        self.box_convention = policy.box_convention
        self._model_lock = threading.RLock()  # held while the wrapped policy computes anything
        self._cond = threading.Condition()  # guards the queue and the closed flag
        self._queue: deque[_Request] = deque()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name=f"microbatcher-{policy.name}", daemon=True)
        self._worker.start()

    @property
    def input_side(self) -> int:
        return self.policy.input_side

    def resized_size(self, image_size: Sequence[int]) -> tuple[float, float]:
        return self.policy.resized_size(image_size)

    def __repr__(self) -> str:
        return f"MicroBatcher({self.policy!r}, max_batch={self.max_batch}, max_wait_ms={self.max_wait_s * 1000:g})"

    # ---- chat -----------------------------------------------------------------------------------------
    def chat(self, conversations: Sequence[Conversation], params: SamplingParams | None = None) -> list[ChatResult]:
        """Queue the conversations, block until the worker has answered them, return their results in order."""
        params = params or SamplingParams()
        conversations = list(conversations)
        if not conversations:
            return []
        request = _Request(
            conversations=conversations,
            params=params,
            key=_params_key(params),
            mergeable=params.greedy or params.seed is None,
        )
        with self._cond:
            if self._closed:
                raise PolicyError("the micro-batcher is closed")
            self._queue.append(request)
            self._cond.notify_all()
        return request.future.result()

    def _take_batch(self) -> list[_Request] | None:
        """Block until a batch is ready; return it (removed from the queue), or None once closed and idle."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._queue[0]
            if first.mergeable:
                deadline = first.enqueued + self.max_wait_s
                while not self._closed and self._compatible_size(first) < self.max_batch:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._closed:
                    return None
            batch, size = [self._queue.popleft()], len(first.conversations)
            if first.mergeable:
                kept: deque[_Request] = deque()
                while self._queue:
                    request = self._queue.popleft()
                    fits = size + len(request.conversations) <= self.max_batch
                    if request.mergeable and request.key == first.key and fits:
                        batch.append(request)
                        size += len(request.conversations)
                    else:
                        kept.append(request)
                self._queue = kept  # incompatible calls keep their order for the next round
            return batch

    def _compatible_size(self, first: _Request) -> int:
        return sum(len(r.conversations) for r in self._queue if r.mergeable and r.key == first.key)

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._answer(batch)
            except BaseException as error:  # noqa: BLE001 — a merged batch failed: find whose call broke it
                if len(batch) == 1:
                    batch[0].future.set_exception(error)
                    continue
                for request in batch:  # one bad conversation must not fail the calls merged with it
                    try:
                        self._answer([request])
                    except BaseException as single_error:  # noqa: BLE001 — it goes to that caller only
                        request.future.set_exception(single_error)

    def _answer(self, batch: list[_Request]) -> None:
        """One ``policy.chat`` call for the merged batch; each caller's future gets its slice of the results."""
        merged = [conversation for request in batch for conversation in request.conversations]
        with self._model_lock:
            results = self.policy.chat(merged, batch[0].params)
        if len(results) != len(merged):
            raise PolicyError(f"{self.policy.name} returned {len(results)} results for {len(merged)} inputs")
        start = 0
        for request in batch:
            end = start + len(request.conversations)
            request.future.set_result(results[start:end])
            start = end

    def close(self) -> None:
        """Stop the worker after its current batch; calls still queued fail with `PolicyError`."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for request in pending:
            request.future.set_exception(PolicyError("the micro-batcher was closed before this call ran"))
        if threading.current_thread() is not self._worker:
            self._worker.join()

    def __enter__(self) -> MicroBatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class WhiteBoxBatcher(MicroBatcher, WhiteBoxPolicy):
    """A `MicroBatcher` of a `WhiteBoxPolicy`: its white-box calls pass through under the model lock."""

    policy: WhiteBoxPolicy

    @property
    def num_layers(self) -> int:
        return self.policy.num_layers

    @property
    def model_dir(self) -> Path | None:
        return self.policy.model_dir

    def fingerprint(self) -> str:
        return self.policy.fingerprint()

    @property
    def token_cell(self) -> int:
        return self.policy.token_cell

    @property
    def supports_prefix_reuse(self) -> bool:
        return self.policy.supports_prefix_reuse

    def answer_logprobs(self, conversations: Sequence[Conversation], answers: Sequence[str]) -> list[float]:
        with self._model_lock:
            return self.policy.answer_logprobs(conversations, answers)

    def choice_logprobs(
        self, conversations: Sequence[Conversation], choices: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        with self._model_lock:
            return self.policy.choice_logprobs(conversations, choices)

    def image_attention(
        self, conversations: Sequence[Conversation], layer: int | Sequence[int], position: int = -1
    ) -> list[list[ImageMap]]:
        with self._model_lock:
            return self.policy.image_attention(conversations, layer, position)

    def pixel_gradient(
        self, conversations: Sequence[Conversation], answers: Sequence[str | None]
    ) -> list[list[ImageMap]]:
        with self._model_lock:
            return self.policy.pixel_gradient(conversations, answers)

    def attention_probe(self, conversations: Sequence[Conversation], layer, **options: Any) -> list[ProbeResult]:
        with self._model_lock:
            return self.policy.attention_probe(conversations, layer, **options)

    def answer_starts(self, conversations: Sequence[Conversation], **options: Any) -> list[AnswerStart]:
        with self._model_lock:  # a look-first reply is decoded by the wrapped policy, not queued behind this lock
            return self.policy.answer_starts(conversations, **options)

    def continue_probe(self, sessions: Sequence[str], params: SamplingParams | None = None) -> list[ChatResult]:
        with self._model_lock:
            return self.policy.continue_probe(sessions, params)

    def chat_with_prefix(self, conversations, sessions, params=None, starts=None) -> list[ChatResult]:
        with self._model_lock:
            return self.policy.chat_with_prefix(conversations, sessions, params, starts)

    def release_sessions(self, sessions: Sequence[str | None]) -> None:
        self.policy.release_sessions(sessions)
