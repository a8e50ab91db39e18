"""Probe (kept in git history only): why Patch Matters' batched patch call costs about 3× one global caption on
2 CPU cores. Times one greedy global caption and the patch call (5 crops × 3 samples at temperature 0.7), each
after a warm-up: its seconds, its prefill (the same call with 1 new token), its decoding steps (tokens of its
longest output) and the time per decoding step.

    python bench/decode_steps.py
"""

from __future__ import annotations

import time
from dataclasses import replace

from foveate.api import DEMO_MODEL_DIR
from foveate.eval.runner import resolve_tasks
from foveate.policies.base import SamplingParams
from foveate.policies.transformers_vlm import TransformersVLM
from foveate.tools.images import load_image

BOXES = [(0, 0, 336, 336), (336, 0, 672, 336), (0, 336, 336, 672), (336, 336, 672, 672), (100, 100, 436, 436)]


def ask(image) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe the image in detail."}],
        }
    ]


def main() -> None:
    policy = TransformersVLM(DEMO_MODEL_DIR)
    image = load_image(resolve_tasks("world:caption", n=1).rows[0]["image"])
    patches = [ask(image.crop(box)) for box in BOXES]
    greedy, sampled = SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, n=3, seed=0)
    runs = [("global caption, greedy", [ask(image)], greedy), ("patch call, 5 × 3 samples", patches, sampled)]
    for label, conversations, params in runs:
        prefill = timed(policy, conversations, replace(params, max_new_tokens=1))[0]
        seconds, steps = timed(policy, conversations, replace(params, max_new_tokens=160))
        per_step = 1000 * (seconds - prefill) / (steps - 1)
        rows = len(conversations) * params.n
        print(
            f"{label:26s} {rows:2d} rows  {seconds:.3f} s  prefill {prefill:.3f} s  {steps} steps",
            f"{per_step:.1f} ms/step",
        )


def timed(policy, conversations, params) -> tuple[float, int]:
    """Seconds of one call after a warm-up, and its decoding steps (the longest output's tokens)."""
    policy.chat(conversations, params)
    started = time.perf_counter()
    results = policy.chat(conversations, params)
    seconds = time.perf_counter() - started
    return seconds, max(c.completion_tokens for result in results for c in result.completions)


if __name__ == "__main__":
    main()
