"""Intake of chat messages: every image block format a client sends becomes an image-store ref."""

from __future__ import annotations

import base64

import pytest
from langchain_core.messages import HumanMessage
from PIL import Image

from foveate.agents.state import intake, to_policy_messages
from foveate.errors import FoveateError
from foveate.tools.images import image_to_bytes
from foveate.tools.store import ImageStore


def _png_b64() -> str:
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    return base64.b64encode(image_to_bytes(image)).decode()


@pytest.mark.parametrize(
    "block",
    [
        lambda b64: {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
        lambda b64: {"type": "image", "source_type": "base64", "data": b64, "mime_type": "image/png"},
        lambda b64: {"type": "image", "base64": b64, "mime_type": "image/png"},
        lambda b64: {"type": "image", "url": f"data:image/png;base64,{b64}"},
    ],
    ids=["openai-image_url", "langchain-v0-base64", "langchain-v1-base64", "langchain-data-url"],
)
def test_every_image_block_format_becomes_a_ref(tmp_path, block):
    store = ImageStore(tmp_path)
    message = HumanMessage(content=[block(_png_b64()), {"type": "text", "text": "What color is it?"}])
    update = intake({"messages": [message]}, store)
    assert update["image"].startswith("sha256:") and update["image"] in store
    assert update["question"] == "What color is it?"
    [replaced] = update["messages"]
    assert replaced.id == message.id  # replaced in place, so no pixels stay in the checkpointed state
    assert "base64" not in str(replaced.content)
    [converted] = to_policy_messages([replaced], store)
    assert converted["content"][0]["image"].size == (40, 30)


@pytest.mark.parametrize("url", ["http://example.invalid/a.png", "https://example.invalid/a.png", "file:///etc/passwd"])
def test_remote_and_file_urls_are_refused(tmp_path, url):
    message = HumanMessage(content=[{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}])
    with pytest.raises(FoveateError, match="not fetched"):
        intake({"messages": [message]}, ImageStore(tmp_path))


def test_follow_up_without_image_keeps_the_thread_image(tmp_path):
    store = ImageStore(tmp_path)
    ref = store.put(Image.new("RGB", (20, 20), "blue"))
    update = intake({"image": ref, "messages": [HumanMessage(content="and the shape?")]}, store)
    assert update["image"] == ref and update["question"] == "and the shape?"


def test_no_image_at_all_is_a_clear_error(tmp_path):
    with pytest.raises(FoveateError, match="no image"):
        intake({"messages": [HumanMessage(content="hello")]}, ImageStore(tmp_path))
