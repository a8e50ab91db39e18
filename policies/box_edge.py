"""Boxes at the policy edge: a box in the policy's own convention to and from original-image pixels.

``policy.box_convention`` (``"thousand"``, ``"normalized"``, ``"pixels"`` or ``"resized"``, see
`policies.base.BOX_CONVENTIONS`) says how the model reads and writes boxes; ``"resized"`` uses the backend's
``resized_size(image_size)`` (the extent of the original in the model's resized input). Everything inside foveate
stays in original-image pixels; strategies whose model writes boxes (deepeyes, visrl) convert here.
"""

from __future__ import annotations

from typing import Any

from foveate.policies.base import ChatPolicy, check_box_convention
from foveate.tools.boxes import Box, from_resized, parse_box, to_normalized, to_resized, to_thousand


def model_box_to_pixels(
    values: Any,
    image_size: tuple[int, int],
    policy: ChatPolicy,
    *,
    min_side: float = 0.0,
    max_aspect: float | None = None,
    clamp: bool = True,
) -> Box:
    """Untrusted box ``values`` in ``policy.box_convention`` → a `Box` in original-image pixels.

    Validation is ``tools.boxes.parse_box``'s (4 numbers, not inverted, not entirely outside, clipped with
    ``clamp``, then ``min_side``/``max_aspect`` on the clipped box); raises `BoxError` naming the problem.

    >>> class Qwen2(ChatPolicy): box_convention = "thousand"
    >>> model_box_to_pixels([250, 500, 750, 1000], (672, 504), Qwen2()).to_list()
    [168.0, 252.0, 504.0, 504.0]
    """
    convention = check_box_convention(policy.box_convention)
    if convention != "resized":
        return parse_box(
            values, image_size, convention=convention, min_side=min_side, max_aspect=max_aspect, clamp=clamp
        )
    resized = policy.resized_size(image_size)
    in_resized = parse_box(values, resized, convention="pixels", min_side=0, clamp=False)
    original = from_resized(in_resized.to_list(), image_size, resized)
    return parse_box(original.to_list(), image_size, min_side=min_side, max_aspect=max_aspect, clamp=clamp)


def pixels_to_model_box(box: Box, image_size: tuple[int, int], policy: ChatPolicy) -> list[float]:
    """A `Box` in original pixels → ``[x1, y1, x2, y2]`` in ``policy.box_convention`` (floats; round to write)."""
    convention = check_box_convention(policy.box_convention)
    if convention == "thousand":
        return to_thousand(box, image_size)
    if convention == "normalized":
        return to_normalized(box, image_size)
    if convention == "resized":
        return to_resized(box, image_size, policy.resized_size(image_size))
    return box.to_list()
