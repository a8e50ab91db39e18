"""Oracle crop: answer from the image plus a crop around the GROUND-TRUTH evidence — the zoom upper bound.

This is the intervention study of "MLLMs Know Where to Look" (ViCrop, ICLR 2025): when the model is handed a
crop of exactly the region that holds the answer, how much does accuracy on small details improve? Zoom
strategies (vicrop, deepeyes, …) choose their crop themselves; this one is told where to look, so its accuracy
is what they could reach with perfect localisation. It needs the evidence boxes, so it only runs where ground
truth exists (the evaluator passes each task row's ``boxes`` as the state key ``evidence_boxes``).

Graph: ``intake`` (store images as refs, find the question) → ``crop`` → ``answer`` → END.

Crop rule (mirrors ViCrop's crop sizes): take the union of the evidence boxes (original pixels) and a square
window about its centre with side ``max(2 × the union's long side, s)``, where ``s`` is the model's input side
(`model_input_side`). ViCrop searches square windows of side ``s·r``, ``r ∈ [1, 2]``; the oracle uses the
smallest of those sizes (``s``) unless the evidence is larger than ``s/2``, in which case the window keeps a
margin of half the evidence's long side on each side (the ``×2``). The window is shifted (not shrunk) to lie
inside the image; only when it is larger than the image is it clamped, and then it is no longer square (a
window covering the whole image still becomes the second image, so every oracle call has the same format).

Deviation from the paper: the paper's oracle used the dataset's annotated box as given; here the evidence may
be several boxes (e.g. an object and its label, or every counted object), so the union is cropped.

Answer: one model call with the ORIGINAL image first, the crop second, then the question (ViCrop appends the
crop as a second image and keeps the original), greedy decoding. The final user turn is rebuilt as
``[image, crop, question text]``; earlier turns of a thread are sent unchanged.
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from foveate.agents.state import (
    AgentState,
    FoveateContext,
    answer_update,
    crop_update,
    image_refs,
    intake,
    prompt_for_trace,
    reshow_last_turn,
    resolve_context,
    to_policy_messages,
)
from foveate.errors import FoveateError
from foveate.policies.base import DEFAULT_INPUT_SIDE, ChatPolicy  # noqa: F401 (DEFAULT_INPUT_SIDE re-exported)
from foveate.tools.boxes import Box, parse_box

REQUIRES_EVIDENCE = True  # the evaluator skips task rows without evidence boxes for this strategy


class OracleCropState(AgentState, total=False):
    crop: str  # image-store ref of the crop around the evidence
    crop_box: list[float]  # the region actually cropped, original pixels


def model_input_side(policy: ChatPolicy) -> int:
    """The side ``s`` (pixels) of the square the model sees a whole image at: the backend's declared
    ``input_side`` (`ChatPolicy.input_side`: the demo model's 224 × 224 pixel budget gives 224)."""
    return int(policy.input_side)


def evidence_union(evidence: Any, image_size: tuple[int, int]) -> Box:
    """The union of the evidence boxes (validated and clamped to the image), or a clear error if there are none."""
    if not evidence:
        raise FoveateError(
            "oracle-crop needs the ground-truth evidence boxes: pass `evidence_boxes` "
            "([[x1, y1, x2, y2], ...] in original-image pixels); task rows without `boxes` cannot use it"
        )
    boxes = []
    for index, values in enumerate(evidence):
        try:
            boxes.append(parse_box(values, image_size, convention="pixels", min_side=0))
        except FoveateError as error:
            raise type(error)(f"oracle-crop: evidence box {index}: {error}") from error
    return Box(
        min(b.x1 for b in boxes),
        min(b.y1 for b in boxes),
        max(b.x2 for b in boxes),
        max(b.y2 for b in boxes),
    )


def _fit(centre: float, side: float, limit: float) -> tuple[float, float]:
    """An interval of length ``side`` about ``centre``, shifted inside ``[0, limit]`` (clamped if longer)."""
    if side >= limit:
        return 0.0, float(limit)
    low = min(max(centre - side / 2, 0.0), limit - side)
    return low, low + side


def oracle_window(evidence: Box, image_size: tuple[int, int], input_side: int) -> Box:
    """The crop window of the module docstring's rule, in original pixels."""
    width, height = image_size
    side = max(2 * max(evidence.width, evidence.height), float(input_side))
    cx, cy = evidence.center
    x1, x2 = _fit(cx, side, width)
    y1, y2 = _fit(cy, side, height)
    return Box(x1, y1, x2, y2)


# ---- nodes --------------------------------------------------------------------------------------------------
def intake_node(state: OracleCropState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
    return intake(state, resolve_context(runtime).store)


def crop_node(state: OracleCropState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
    context = resolve_context(runtime)
    image = context.store.get(state["image"])
    evidence = evidence_union(state.get("evidence_boxes"), image.size)
    window = oracle_window(evidence, image.size, model_input_side(context.policy))
    reason = f"ground-truth evidence {[round(v, 1) for v in evidence.to_list()]}"
    return crop_update("crop", state["image"], image, window, context.store, reason)


def answer_node(state: OracleCropState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
    context = resolve_context(runtime)
    messages = to_policy_messages(state["messages"], context.store)
    shown = [state["image"], state["crop"]]  # original first, then the crop
    messages, refs = reshow_last_turn(messages, image_refs(state["messages"]), shown, context.store)
    result = context.policy.chat_one(messages, context.sampling())
    return answer_update("answer", prompt_for_trace(messages, refs), result)


def build(checkpointer: Any = None):
    """The compiled oracle-crop graph; pass a checkpointer (e.g. SqliteSaver) for durable threads."""
    builder = StateGraph(OracleCropState, context_schema=FoveateContext)
    builder.add_node("intake", intake_node)
    builder.add_node("crop", crop_node)
    builder.add_node("answer", answer_node)
    builder.add_edge(START, "intake")  # every run starts by normalising its input
    builder.add_edge("intake", "crop")  # look exactly where the ground truth says the evidence is
    builder.add_edge("crop", "answer")  # answer from the original plus the crop
    builder.add_edge("answer", END)
    return builder.compile(checkpointer=checkpointer, name="oracle-crop")


graph = build()
