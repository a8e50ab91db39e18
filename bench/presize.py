"""What `TransformersVLM.presize` saves: preparing a model input, and answering, with and without it.

    python bench/presize.py                      # demo model, world scene sizes and two photo sizes
    python bench/presize.py --model DIR --repeats 20

In one run, on the same images: ``encode`` (chat template, tokenizer, image processor) of one question about one
image, and a whole ``direct`` answer (at most 8 new tokens), each timed ``--repeats`` times with the processor
getting the original image (``off``: the processor converts it to an array and back before resizing) and the
image already shrunk with PIL to the processor's size (``on``: the shipped behaviour; same pixels, see
tests/test_presize.py). Medians in milliseconds and their ratio.

Measured with the demo model (336-px input), `python bench/presize.py --repeats 10`, 2 idle cores, one run:

| image | encode off / on ms | × | answer off / on ms | × |
|---|---|---|---|---|
| 672×672 | 8.8 / 8.3 | 1.06 | 43.0 / 44.5 | 0.97 |
| 1344×1344 | 19.8 / 17.1 | 1.16 | 59.9 / 55.1 | 1.09 |
| 2048×1536 | 36.8 / 24.9 | 1.48 | 69.8 / 63.7 | 1.10 |
| 4032×3024 | 185.3 / 71.3 | 2.60 | 251.0 / 142.1 | 1.77 |

The bicubic resize itself is most of what remains for large images (PIL's ``reducing_gap`` would be faster, but
its pixels differ from the processor's).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from PIL import Image

SIZES = [(672, 672), (1344, 1344), (2048, 1536), (4032, 3024)]


def _image(width: int, height: int) -> Image.Image:
    """A smooth gradient with noise: about as hard on the resize filter as a photo."""
    rng = np.random.default_rng(width * height)
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None] + np.zeros((height, 1, 3), np.float32)
    return Image.fromarray(np.clip(ramp + rng.normal(0, 20, ramp.shape), 0, 255).astype(np.uint8))


def _median_ms(action, repeats: int) -> float:
    action()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        action()
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def _time_one(policy, image: Image.Image, params, repeats: int) -> dict[str, float]:
    """Median ms of ``encode`` and of a ``chat`` answer about ``image``, with presize off and on."""
    question = {"type": "text", "text": "What is the colour of the square?"}
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, question]}]
    text, images = policy.render(messages)
    shipped, cells = policy.presize, {}
    try:
        for mode in ("off", "on"):
            policy.presize = shipped if mode == "on" else (lambda picture: picture)
            cells[f"encode {mode}"] = _median_ms(lambda: policy.encode([text], images), repeats)
            cells[f"answer {mode}"] = _median_ms(lambda: policy.chat([messages], params), repeats)
    finally:
        policy.presize = shipped
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the demo VLM)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per cell; the median counts")
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from foveate.api import make_policy
    from foveate.policies.base import SamplingParams

    torch.manual_seed(0)
    policy = make_policy(args.model)
    inner = getattr(policy, "policy", policy)  # the in-process TransformersVLM behind any batching wrapper
    params = SamplingParams(max_new_tokens=8)
    table = Table(title=f"presize: median ms over {args.repeats} runs (batch size 1)")
    columns = ("image", "model input", "encode off", "encode on", "× faster", "answer off", "answer on", "× faster")
    for column in columns:
        table.add_column(column, justify="right")
    for width, height in SIZES:
        cells = _time_one(inner, _image(width, height), params, args.repeats)
        model_w, model_h = inner._processor_size((width, height))
        table.add_row(
            f"{width}×{height}",
            f"{model_w}×{model_h}",
            f"{cells['encode off']:.1f}",
            f"{cells['encode on']:.1f}",
            f"{cells['encode off'] / cells['encode on']:.2f}",
            f"{cells['answer off']:.1f}",
            f"{cells['answer on']:.1f}",
            f"{cells['answer off'] / cells['answer on']:.2f}",
        )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
