"""``foveate serve`` as a user starts it: a subprocess on a free loopback port, flags wired to the server's limits."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import openai
from PIL import Image

from foveate.tools.images import image_to_data_url


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command(tiny_model_dir, tmp_path):
    port = _free_port()
    command = [sys.executable, "-m", "foveate.cli", "serve", "--port", str(port), "--model", str(tiny_model_dir)]
    command += ["--strategies", "direct", "--max-new-tokens", "4", "--max-images", "1", "--max-body-mb", "1"]
    env = {**os.environ, "FOVEATE_HOME": str(tmp_path / "home")}
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.communicate()[1]
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        assert [model.id for model in client.models.list()] == ["foveate-direct"]
        image = {"type": "image_url", "image_url": {"url": image_to_data_url(Image.new("RGB", (64, 48), "red"))}}
        messages = [{"role": "user", "content": [image, {"type": "text", "text": "What color?"}]}]
        reply = client.chat.completions.create(model="foveate-direct", messages=messages)
        assert reply.foveate_trace["steps"][0]["completion_tokens"] <= 4  # --max-new-tokens
        too_many = [{"role": "user", "content": [image, image, {"type": "text", "text": "Same?"}]}]
        response = httpx.post(f"{base}/v1/chat/completions", json={"model": "foveate-direct", "messages": too_many})
        assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_images"  # --max-images
        big = httpx.post(f"{base}/v1/chat/completions", content=b" " * (1024 * 1024 + 1))
        assert big.status_code == 413  # --max-body-mb
        assert httpx.get(f"{base}/").status_code == 200
    finally:
        server.terminate()
        try:
            _, stderr = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            _, stderr = server.communicate()
    assert f"serving foveate-direct over tiny at http://127.0.0.1:{port}/v1" in stderr
