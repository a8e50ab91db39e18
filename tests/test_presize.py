"""`TransformersVLM.presize`: shrinking with PIL before the processor gives the processor's own pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from foveate.policies.transformers_vlm import TransformersVLM, fit_for_model, presizes_like


def _noise(width: int, height: int, seed: int) -> Image.Image:
    """Noise, so any difference in filter, size or rounding shows in the pixel values."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _processed(policy: TransformersVLM, image: Image.Image, presize: bool) -> dict[str, torch.Tensor]:
    fitted = fit_for_model(image)
    kwargs = {"size": policy.size_override} if policy.size_override else {}
    shown = policy.presize(fitted) if presize else fitted
    return policy.processor.image_processor(images=[shown], return_tensors="pt", **kwargs)


@pytest.fixture(scope="module")
def small_input_policy(tiny_model_dir):
    """The tiny model with a 224 px input budget, so ordinary images are shrunk."""
    policy = TransformersVLM(tiny_model_dir, max_pixels=224 * 224)
    if not presizes_like(policy.processor.image_processor):
        pytest.skip("presize applies to the PIL-backend Qwen2-VL image processor only")
    yield policy
    policy.close()


@pytest.mark.parametrize("size", [(1344, 1344), (2000, 700), (500, 1500), (337, 335), (3001, 97), (20, 900), (100, 80)])
def test_presized_images_give_the_processors_own_pixels(small_input_policy, size):
    image = _noise(*size, seed=size[0] + size[1])
    direct, presized = _processed(small_input_policy, image, False), _processed(small_input_policy, image, True)
    assert torch.equal(direct["image_grid_thw"], presized["image_grid_thw"])
    assert torch.equal(direct["pixel_values"], presized["pixel_values"])


def test_presize_shrinks_large_images_and_leaves_others(small_input_policy):
    assert small_input_policy.presize(_noise(1344, 1344, 0)).size == (224, 224)
    assert small_input_policy.presize(_noise(2000, 700, 0)).size == small_input_policy._processor_size((2000, 700))
    small = _noise(100, 80, 0)
    assert small_input_policy.presize(small) is small  # the processor enlarges it: left to the processor
    grey = _noise(1344, 1344, 0).convert("L")
    assert small_input_policy.presize(grey) is grey  # the processor converts modes first: left as it is


def test_the_model_sees_the_same_input_through_encode(small_input_policy):
    image = _noise(900, 600, 3)
    text, _ = small_input_policy.render([{"role": "user", "content": [{"type": "image", "image": image}]}])
    batch = small_input_policy.encode([text], [image])
    reference = _processed(small_input_policy, image, False)
    assert torch.equal(batch["pixel_values"].cpu(), reference["pixel_values"])
