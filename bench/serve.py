"""What the server costs and what micro-batching buys: throughput of N concurrent requests with batching on vs
off, and the server's added latency over a direct in-process call of the same strategy.

    python bench/serve.py                                  # the demo model, 32 concurrent requests, direct
    python bench/serve.py --model DIR --n 32 --reps 9 --max-new-tokens 16 --strategy direct

Everything runs in one process: the FastAPI app under uvicorn on 127.0.0.1 (a free port), the official ``openai``
client in N threads. "off" is the same server with ``batching=False`` (the batcher still serialises model calls,
one conversation per ``generate``, since a backend need not be thread-safe). Requests are N seeded world questions
(``foveate.world.iter_items``, preset ``default``) with their images. Latency compares, one request at a time, a request
through the server (HTTP, JSON, base64 decode, image store, worker thread, 5 ms batching window) with
``foveate.api.run_strategy`` on the same graph and model (medians over ``--reps``, interleaved).
"""

from __future__ import annotations

import argparse
import base64
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from foveate.agents import get_builder
from foveate.api import make_policy, run_strategy
from foveate.serve import ServeLimits, create_app, serve_in_thread
from foveate.tools.images import image_to_bytes, load_image
from foveate.tools.store import ImageStore
from foveate.world import iter_items


def load_requests(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` world questions (seeded, preset ``default``) with their images as PNG bytes."""
    return [(row["question"], image_to_bytes(image)) for image, _, row in iter_items(n, seed=seed, preset="default")]


def message(question: str, png: bytes) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def concurrent_run(client: openai.OpenAI, model: str, requests: list[tuple[str, bytes]]) -> tuple[float, list[str]]:
    def ask(item: tuple[str, bytes]) -> str:
        reply = client.chat.completions.create(model=model, messages=message(*item))
        return reply.choices[0].message.content

    started = time.perf_counter()
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(ask, requests))
    return time.perf_counter() - started, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--model", default=None, help="model directory or Hub id (default: the demo model)")
    parser.add_argument("--strategy", default="direct")
    parser.add_argument("--n", type=int, default=32, help="concurrent requests")
    parser.add_argument("--reps", type=int, default=9, help="sequential requests for the latency medians")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    policy = make_policy(args.model)
    requests = load_requests(args.n)
    model_id = f"foveate-{args.strategy}"
    limits = ServeLimits(max_new_tokens=args.max_new_tokens, max_concurrency=max(64, args.n))
    throughput: dict[str, float] = {}
    answers: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = ImageStore(Path(tmp) / "images")
        latency_server: list[float] = []
        latency_direct: list[float] = []
        for batching in (True, False):
            label = "on" if batching else "off"
            app = create_app(policy, store=store, limits=limits, batching=batching, strategies=[args.strategy])
            with serve_in_thread(app) as url:
                client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
                client.chat.completions.create(model=model_id, messages=message(*requests[0]))  # warm-up
                wall, answers[label] = concurrent_run(client, model_id, requests)
                throughput[label] = args.n / wall
                print(
                    f"batching {label:>3}: {args.n} concurrent requests in {wall:.2f} s = {throughput[label]:.2f} req/s"
                )
                if batching:
                    graph = get_builder(args.strategy)()
                    for i in range(args.reps):
                        question, png = requests[i % len(requests)]
                        started = time.perf_counter()
                        client.chat.completions.create(model=model_id, messages=message(question, png))
                        latency_server.append(time.perf_counter() - started)
                        started = time.perf_counter()
                        run_strategy(
                            graph,
                            {"image": store.put(load_image(png)), "question": question},
                            strategy=args.strategy,
                            policy=policy,
                            store=store,
                            max_new_tokens=args.max_new_tokens,
                        )
                        latency_direct.append(time.perf_counter() - started)
    server_ms = statistics.median(latency_server) * 1000
    direct_ms = statistics.median(latency_direct) * 1000
    agree = sum(a == b for a, b in zip(answers["on"], answers["off"], strict=True)) / args.n
    print()
    print(f"model {policy.name}, strategy {args.strategy}, max_new_tokens {args.max_new_tokens}")
    print("| measure | value |")
    print("|---|---|")
    print(f"| throughput, {args.n} concurrent: batching on / off | {throughput['on'] / throughput['off']:.2f}x |")
    print(f"| answers equal with batching on and off | {agree:.0%} |")
    print(f"| one request: server / in-process (median of {args.reps}) | {server_ms / direct_ms:.3f}x |")
    print(f"| server's added latency | {server_ms - direct_ms:+.1f} ms ({server_ms:.1f} vs {direct_ms:.1f} ms) |")


if __name__ == "__main__":
    main()
