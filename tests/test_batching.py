"""MicroBatcher: concurrent chat calls merged into batches; same answers as sequential calls."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from scripted import twin

from foveate.errors import PolicyError
from foveate.policies.base import ChatPolicy, ChatResult, Completion, SamplingParams, WhiteBoxPolicy
from foveate.policies.batching import MicroBatcher
from foveate.policies.transformers_vlm import TransformersVLM


class Recording(ChatPolicy):
    """A thin wrapper over a real policy that records the size and parameters of every chat call."""

    def __init__(self, inner: ChatPolicy) -> None:
        self.inner = inner
        self.name = inner.name
        self.white_box = inner.white_box
        self.calls: list[tuple[int, SamplingParams | None]] = []

    def chat(self, conversations, params=None):
        self.calls.append((len(conversations), params))
        return self.inner.chat(conversations, params)

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class Echo(ChatPolicy):
    """No model: answers with the conversation's text; raises on "boom"; records batch sizes."""

    name = "echo"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def chat(self, conversations, params=None):
        self.calls.append(len(conversations))
        texts = [c[-1]["content"] for c in conversations]
        if "boom" in texts:
            raise PolicyError("boom")
        return [ChatResult([Completion(t, 1)], 1, 0.0, "echo") for t in texts]


def _conversations() -> list[list[dict]]:
    colors = ["red", "blue", "green", "white", "black", "yellow", "cyan", "purple"]
    questions = [
        "What color is it?",
        "Is there a star?",
        "How many objects are there in the image?",
        "Describe the image.",
        "What is written on the red circle?",
        "Which is larger?",
        "Is the square above the circle?",
        "What shape?",
    ]
    return [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": Image.new("RGB", (100 + 20 * i, 80 + 10 * i), colors[i])},
                    {"type": "text", "text": questions[i]},
                ],
            }
        ]
        for i in range(8)
    ]


def _concurrently(fn, count: int) -> list:
    barrier = threading.Barrier(count)

    def call(i):
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(call, range(count)))


def test_concurrent_calls_match_sequential_and_are_batched(tiny_policy):
    conversations = _conversations()
    params = SamplingParams(max_new_tokens=6)
    sequential = [tiny_policy.chat_one(c, params) for c in conversations]
    assert len({r.text for r in sequential}) > 1  # the fixture model's answers depend on the input
    recording = Recording(tiny_policy)
    # max_batch = number of callers: the worker starts as soon as all 8 are queued (the wait is only a bound)
    with MicroBatcher(recording, max_batch=8, max_wait_ms=1000) as batcher:
        results = _concurrently(lambda i: batcher.chat_one(conversations[i], params), 8)
    assert [r.text for r in results] == [r.text for r in sequential]
    assert [r.completion_tokens for r in results] == [r.completion_tokens for r in sequential]
    assert sum(size for size, _ in recording.calls) == 8
    assert len(recording.calls) < 8  # merged into fewer model calls than callers


def test_only_equal_params_share_a_batch():
    batches: list[tuple[list[str], int]] = []

    class Spy(Echo):
        def chat(self, conversations, params=None):
            batches.append(([c[-1]["content"] for c in conversations], params.max_new_tokens))
            return super().chat(conversations, params)

    with MicroBatcher(Spy(), max_batch=16, max_wait_ms=200) as batcher:
        out = _concurrently(
            lambda i: batcher.chat_one(
                [{"role": "user", "content": f"q{i}"}], SamplingParams(max_new_tokens=4 + i % 2)
            ),
            8,
        )
    assert [r.text for r in out] == [f"q{i}" for i in range(8)]
    assert sorted(text for texts, _ in batches for text in texts) == sorted(f"q{i}" for i in range(8))
    assert len(batches) < 8
    for texts, max_new_tokens in batches:  # every call in a batch asked for the batch's parameters
        assert {4 + int(text[1:]) % 2 for text in texts} == {max_new_tokens}


def test_max_batch_caps_merges_and_large_calls_go_alone():
    echo = Echo()
    with MicroBatcher(echo, max_batch=3, max_wait_ms=50) as batcher:
        _concurrently(lambda i: batcher.chat_one([{"role": "user", "content": f"q{i}"}]), 7)
        assert max(echo.calls) <= 3
        echo.calls.clear()
        many = batcher.chat([[{"role": "user", "content": f"m{i}"}] for i in range(5)])
        assert [r.text for r in many] == [f"m{i}" for i in range(5)] and echo.calls == [5]
        assert batcher.chat([]) == []


def test_seeded_sampling_is_never_merged():
    echo = Echo()
    params = SamplingParams(temperature=0.7, seed=3)
    with MicroBatcher(echo, max_batch=16, max_wait_ms=50) as batcher:
        _concurrently(lambda i: batcher.chat_one([{"role": "user", "content": f"q{i}"}], params), 4)
    assert echo.calls == [1, 1, 1, 1]


def test_errors_reach_only_their_caller():
    echo = Echo()
    with MicroBatcher(echo, max_batch=4, max_wait_ms=300) as batcher:

        def call(i):
            try:
                return batcher.chat_one([{"role": "user", "content": "boom" if i == 0 else f"q{i}"}])
            except PolicyError as error:
                return error

        out = _concurrently(call, 4)
        assert isinstance(out[0], PolicyError) and str(out[0]) == "boom"
        assert [r.text for r in out[1:]] == ["q1", "q2", "q3"]
        assert echo.calls[:5] == [4, 1, 1, 1, 1]  # merged, failed, then each call alone
        assert batcher.chat_one([{"role": "user", "content": "after"}]).text == "after"  # the worker survived

        # A failing call alone in its batch gets the error directly.
        echo.calls.clear()
        with pytest.raises(PolicyError, match="boom"):
            batcher.chat_one([{"role": "user", "content": "boom"}])
        assert echo.calls == [1]


def test_close_stops_the_worker():
    echo = Echo()
    batcher = MicroBatcher(echo)
    assert batcher.chat_one([{"role": "user", "content": "x"}]).text == "x"
    batcher.close()
    batcher.close()  # idempotent
    assert not batcher._worker.is_alive()
    with pytest.raises(PolicyError, match="closed"):
        batcher.chat_one([{"role": "user", "content": "y"}])


def test_white_box_calls_and_attributes_pass_through(tiny_policy):
    conversation = _conversations()[0]
    with MicroBatcher(tiny_policy) as batcher:
        assert batcher.name == tiny_policy.name and batcher.white_box
        assert isinstance(batcher, WhiteBoxPolicy)  # a white-box policy's batcher declares what it wraps
        assert (batcher.num_layers, batcher.input_side, batcher.token_cell, batcher.fingerprint()) == (
            tiny_policy.num_layers,
            tiny_policy.input_side,
            tiny_policy.token_cell,
            tiny_policy.fingerprint(),
        )
        assert not hasattr(batcher, "processor")  # nothing undeclared is forwarded
        assert batcher.answer_logprobs([conversation], ["red"]) == pytest.approx(
            tiny_policy.answer_logprobs([conversation], ["red"])
        )
    with pytest.raises(ValueError):
        MicroBatcher(tiny_policy, max_batch=0)


def test_a_white_box_call_holds_the_model_while_it_runs(tiny_policy):
    """A white-box call through the batcher runs under its model lock: a chat batch waits for it (no caller takes
    a lock), and a plain policy's batcher is no WhiteBoxPolicy."""

    class Slow(TransformersVLM):
        def attention_probe(self, conversations, layer, **options):
            self.entered.set()
            self.release.wait(30)
            return super().attention_probe(conversations, layer, **options)

    slow = twin(Slow, tiny_policy)
    slow.entered, slow.release = threading.Event(), threading.Event()
    conversation = _conversations()[0]
    answered = threading.Event()
    with MicroBatcher(slow, max_wait_ms=1) as batcher:
        probing = threading.Thread(target=lambda: batcher.attention_probe([conversation], 1), daemon=True)
        probing.start()
        assert slow.entered.wait(30)
        params = SamplingParams(max_new_tokens=2)
        threading.Thread(target=lambda: (batcher.chat_one(conversation, params), answered.set()), daemon=True).start()
        assert not answered.wait(0.3)  # the batch waits for the white-box call to finish
        slow.release.set()
        assert answered.wait(60)
        probing.join(60)
    with MicroBatcher(Echo()) as plain:
        assert not isinstance(plain, WhiteBoxPolicy)
