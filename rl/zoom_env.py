"""DeepEyes' zoom tool as a TRL tool environment: one `ZoomEnvironment` per rollout over the row's ORIGINAL image.

The tool is the `deepeyes` strategy's own (`agents.zoom_tool.run_zoom`: DeepEyes' validity rules, crops of the
original image); a refused or malformed call comes back as ``Error: …`` text, a crop as an image part that TRL feeds
to the next turn. Kept apart from the trainer (`rl.deepeyes_grpo`) so the warm start's SFT data (`rl.sft_data`)
can render the tool's schema without importing the GRPO recipe.
"""

from __future__ import annotations

import inspect
from typing import Any

from foveate.agents.zoom_tool import ToolCall, ToolError, run_zoom
from foveate.policies.base import ChatPolicy
from foveate.protocol import ZOOM_TOOL_NAME


class _Convention(ChatPolicy):
    """Only a box convention: all that `run_zoom` asks of a policy."""

    def __init__(self, convention: str) -> None:
        self.box_convention = convention


class ZoomEnvironment:
    """One rollout's environment: the row's ORIGINAL image and DeepEyes' zoom tool over it.

    TRL calls `reset` with the dataset row before each rollout and exposes every public method as a tool.
    ``zooms`` counts crops returned (the ``tool`` reward needs at least one); ``boxes`` holds their regions.
    """

    box_convention = "thousand"  # set per run by `environment_factory`

    def reset(self, **row: Any) -> None:
        self.image = row["image"]
        self.zooms, self.calls, self.boxes = 0, 0, []
        return None

    def image_zoom_in_tool(self, bbox_2d: list[float] | None = None, label: str | None = None, **extra: Any) -> Any:
        """Zoom in on a region of the original image and return the crop.

        Args:
            bbox_2d: the region [x1, y1, x2, y2] of the original image
            label: what is in the region
        """
        self.calls += 1
        arguments = {k: v for k, v in {"bbox_2d": bbox_2d, "label": label}.items() if v is not None}
        try:
            zoom = run_zoom(ToolCall(ZOOM_TOOL_NAME, arguments), self.image, _Convention(self.box_convention))
        except ToolError as error:
            return f"Error: {error}"
        self.zooms += 1
        self.boxes.append(zoom.box.to_list())
        return [{"type": "image", "image": zoom.image}]


# The schema TRL shows the model is read from the signature: declare the call as the paper's (bbox_2d required, label
# optional), while the method itself also takes a missing bbox_2d and unknown arguments, so that every malformed call
# gets the tool's own "Error: …" turn instead of a Python TypeError.
ZoomEnvironment.image_zoom_in_tool.__signature__ = inspect.Signature(
    [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("bbox_2d", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=list[float]),
        inspect.Parameter("label", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=str),
    ],
    return_annotation=Any,
)


def zoom_tool_schema() -> dict[str, Any]:
    """The tool's JSON schema exactly as TRL renders it into GRPO prompts (for the warm start's SFT data)."""
    from transformers.utils import get_json_schema

    return get_json_schema(ZoomEnvironment().image_zoom_in_tool)


def environment_factory(convention: str):
    """A factory of `ZoomEnvironment`s reading boxes in ``convention``."""
    environment_class = type("ZoomEnvironment", (ZoomEnvironment,), {"box_convention": convention})
    return environment_class
