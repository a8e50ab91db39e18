"""ViCrop: training-free zoom guided by the model's own attention or gradients.

Paper: Zhang, Khayatkhoei, Chhikara, Ilievski, "MLLMs Know Where to Look: Training-free Perception of Small
Visual Details with Multimodal LLMs", ICLR 2025. The model is asked the question once to see where it looks;
the most sharply attended square window is cropped and fed back as a second image beside the original.

Graph::

    intake → look ─┬─ (gate: already sure) ──────────────→ answer_now → END
                   └─ select (box, crop) → answer (image + crop + question) → END

- ``look`` — one batched white-box pass (`TransformersVLM.attention_probe`) over the question and, for rel-att,
  the generic prompt ("Write a general description of the image.") on the same image:
  * ``rel-att``: attention of the last prompt token to the image tokens at one layer (mean over heads), divided
    by the same for the generic prompt: ``A_q / (A_g + ε·mean(A_g))``;
  * ``grad-att``: ``mean_heads(A ⊙ ReLU(∂v/∂A))`` with ``v = log p(argmax first answer token)``;
  * ``pure-grad``: ``‖∂v/∂pixels‖₂`` for the question over the same for the generic prompt, times the
    high-pass edge mask, mean-pooled to the 28-px token grid.
  With ``high_res_block`` set (``vicrop-rel-blocks``: 1024, the paper's setting for V*), images whose long side
  exceeds it are split into blocks, each block mapped (in the same batch), and the maps tiled (`tools.saliency`).
  Off by default: on world:small-detail's 1344-px scenes the demo model gains nothing from 2 × 2 blocks, which
  cost four more image encodings (configs/vicrop.yaml has the numbers).
- ``select`` — multi-scale window search with the sharpness rule (`tools.saliency.select_box`), then the crop.
- ``answer`` — the final user turn becomes ``[original image, crop, question]``, greedy decoding.

Methods are one module with a ``method`` option; the registered names ``vicrop-rel``, ``vicrop-grad``,
``vicrop-puregrad``, ``vicrop-carve``, ``vicrop-rel-gate`` (rel-att with ``gate: 0.5``) and ``vicrop-rel-blocks``
(rel-att with ``high_res_block: 1024``) map here with different options (``agents.STRATEGY_OPTIONS``). Options
come from ``configs/vicrop.yaml`` (`ViCropConfig`), then the registered name, then per call:
``graph.invoke(..., config={"configurable": {"vicrop": {"method": "grad-att", "layer": 2}}})``.

The layer is configuration. Calibrate it for a model on held-out items (world seed 1001: neither training's
seeds below 1000 nor the eval's 1000) — per layer, the share of map mass inside the ground-truth evidence boxes
and how often the chosen crop contains all the evidence; set the best as ``layer`` in ``configs/vicrop.yaml``::

    python -m foveate.agents.vicrop_calibrate --model DIR --task world:small-detail --n 50 [--method grad-att]

``--gate`` adds, per confidence threshold, the share of questions the gate would answer from the question pass
and how accurate those answers are (how ``vicrop-rel-gate``'s 0.5 was chosen for the demo model).

The look step's maps are computed in `agents.vicrop_look`. `agents.vicrop_many.answer_many` runs the attention
methods on several questions with every model call batched (one probe forward, one answer batch); the graph
handles one question per run, with a trace.

Efficiency (the reference runs eager attention with ``output_attentions=True`` over all layers, two separate
prefills, batch size 1):
- only the wanted layer's last-token row is computed, under SDPA (`policies.attention_capture`); grad-att
  backpropagates only from that layer on;
- the question rows (and all high-res blocks) go through one batched forward that keeps their KV caches; the
  generic rows then reuse them (only the generic prompt is prefilled); the generic map is cached per image in the
  image store (``put_array``), keyed by model, weights, resolution, layer, method and block size;
- the question pass keeps its KV cache: the answer pass reuses it for the shared prefix (the original image
  and everything before it), so only the crop and the question are prefilled, and with the confidence ``gate``
  the answer is decoded straight from the question pass (rel-att and grad-att; pure-grad's gradient pass
  keeps no cache, so its answer pass is an ordinary ``chat``).
- a look-first model's reply is decoded once with its attention recorded (`policies.reply_probe`): the map and
  probability at the thought's answer position and the prompt's cache all come from that call, and a gated
  question's answer is the finished reply itself (no further model call);
- white-box calls run under a `MicroBatcher`'s model lock when the policy is wrapped in one (the evaluator
  and the server do), so they never interleave with batched generation.

Deliberate deviations from the paper, and why:
- rel-att divides by ``A_g + ε·mean(A_g)`` (the reference has no ε, so one near-zero generic cell makes the
  ratio explode; ε is relative to the map's mean so it means the same for every model).
- The window search runs on a finer grid than the token grid and keeps the exact ``s·r`` square (see
  `tools.saliency`'s docstring); ties and ratio-index bookkeeping cannot go wrong as in the reference.
- High-resolution blocks use ceil division (no zero-width block for thin images, a bug in the reference).
- Optional confidence gate (off by default, not in the paper): if the question pass's first answer token has
  probability ≥ ``gate``, answer from that pass without cropping — cheaper on questions the model already
  sees well. Not available for pure-grad, nor for blocked high-res images (their passes do not see the whole image
  with the question as ``direct`` would) unless a look-first model's reply was recorded on the whole image
  (rel-att on a backend with `reply_probe` and sessions, a thought ending on a token boundary).
- ``feed: mask`` (``vicrop-carve``) is not ViCrop but the CARVE alternative ("Focusing by Contrastive
  Attention", 2025): the contrast map fades unattended pixels toward grey and the masked image *replaces* the
  original. CARVE builds its mask from several deeper layers; here from the configured ``layer`` (a list works).
- Look-first models (``<think>the red circle</think>circle``) are probed inside their own thought, where they look
  the answer up, not at the last prompt token (``look_first``, `agents.vicrop_thought`).
- In a thread, the question pass sends the whole transcript, as ``direct`` does; the generic pass is always a
  single turn about the image (so it can be cached per image). High-res blocks are probed single-turn.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from foveate import protocol
from foveate.agents.oracle_crop import model_input_side
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
from foveate.agents.vicrop_config import (  # noqa: F401 (re-exported: the options live with the strategy)
    CONFIG_ENV,
    FEEDS,
    METHODS,
    ViCropConfig,
    _options,
    load_vicrop_config,
)
from foveate.agents.vicrop_look import (  # noqa: F401 (re-exported: tests and callers import them from here)
    Look,
    _last_user_text,
    _target_index,
    generic_cache_key,
    look_attention,
    look_attention_many,
    look_pure_grad,
    resolve_layer,
    user_turn,
)
from foveate.agents.vicrop_thought import answers_as_asked, continues_thought
from foveate.errors import PolicyError, WhiteBoxUnsupported
from foveate.policies.base import ChatPolicy, ChatResult, Completion
from foveate.tools.saliency import (
    carve_image,
    select_box,
)
from foveate.tools.store import decoded as _images
from foveate.trace import answer_step, crop_step, map_step, model_call_step

REQUIRES_WHITE_BOX = True  # attention maps and gradients: not servable over an OpenAI-compatible endpoint


class ViCropState(AgentState, total=False):
    heatmap: list[list[float]]  # the map the box was chosen on, over the whole image (token grid or tiled)
    confidence: float | None  # p(argmax first answer token) in the question pass; None when not measured
    session: str | None  # policy-side KV cache of the question pass (process-local; a miss = full prefill)
    crop: str | None  # ref of the crop (or of the CARVE masked image); None when the image needs no zoom
    crop_box: list[float] | None  # the region cropped, original pixels
    thought: str | None  # look-first models: the thought up to the answer the map was read at (vicrop_thought)
    reply: str | None  # look-first models: the whole greedy reply the thought came from, when it finished


# ---- helpers ------------------------------------------------------------------------------------------------
def _require_white_box(policy: ChatPolicy) -> None:
    if not getattr(policy, "white_box", False) or not hasattr(policy, "attention_probe"):
        raise WhiteBoxUnsupported(
            f"ViCrop reads attention maps and gradients, which {getattr(policy, 'name', 'this backend')} does not "
            "expose: run it on a local model (--model DIR) instead of an HTTP endpoint"
        )


def _locked(policy: ChatPolicy):
    """Hold a MicroBatcher's model lock around white-box calls it does not pass through itself."""
    exclusive = getattr(policy, "exclusive", None)  # MicroBatcher's; a plain policy has none
    return exclusive() if exclusive is not None else contextlib.nullcontext()


def _probe_step(node: str, prompt: list[dict], token: str, prompt_tokens: int, latency: float, model: str, **extra):
    result = ChatResult([Completion(token, 1)], prompt_tokens, latency, model)
    return model_call_step(node, prompt, result, **extra)


# ---- nodes --------------------------------------------------------------------------------------------------
def intake_node(state: ViCropState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
    return intake(state, resolve_context(runtime).store)


def _look_steps(look: Look, prompt: list[dict], model: str, options: ViCropConfig) -> list[dict[str, Any]]:
    """The look node's model calls: the look-first reply (carrying the probe when it was recorded while decoding),
    then the probe pass (question and generic rows, or only the generic rows after such a reply)."""
    probe = {"confidence": look.confidence, "rows": look.rows, "generic_cached": look.generic_cached}
    steps = []
    if look.thought_call is not None:  # the look-first reply whose thought the map is read in
        extra = {**probe, "thought": look.thought, "probe_token": look.token} if look.probed_in_reply else {}
        steps.append(model_call_step("look", prompt, look.thought_call, purpose="thought", **extra))
    if look.probed_in_reply:
        if look.generic_pass:  # the generic prompt's rows, a pass of their own
            steps.append(_probe_step("look", prompt, "", 0, 0.0, model, purpose="generic", **probe))
    elif look.rows and options.method != "pure-grad":
        token, tokens, latency = look.token, look.prompt_tokens, look.latency_s
        steps.append(_probe_step("look", prompt, token, tokens, latency, model, thought=look.thought, **probe))
    elif look.rows:
        steps.append(_probe_step("look", prompt, "", 0, 0.0, model, rows=look.rows, generic_cached=look.generic_cached))
    return steps


def look_node(state: ViCropState, runtime: Runtime[FoveateContext], config: RunnableConfig) -> dict[str, Any]:
    context, options = resolve_context(runtime), _options(config)
    policy, store = context.policy, _images(context.store)
    _require_white_box(policy)
    messages = to_policy_messages(state["messages"], store)
    refs = image_refs(state["messages"])
    layer = resolve_layer(options.layer, policy.num_layers)
    target = _target_index(refs, state["image"])
    with _locked(policy):
        if options.method == "pure-grad":
            look = look_pure_grad(policy, store, state["image"], messages, options, target)
        else:
            look = look_attention(policy, store, state["image"], messages, options, layer, target)
    steps = _look_steps(look, prompt_for_trace(messages, refs), getattr(policy, "name", ""), options)
    label = layer if options.method != "pure-grad" else None
    if look.question is not None:
        steps.append(map_step("look", state["image"], look.question, "attention", label))
    if look.generic is not None:
        steps.append(map_step("look", state["image"], look.generic, "generic", label))
    gated_early = options.method == "rel-att" and look.generic is None  # the gate fired before the generic pass
    steps.append(map_step("look", state["image"], look.heat, "attention" if gated_early else options.method, label))
    return {
        "heatmap": np.asarray(look.heat, dtype=float).tolist(),
        "confidence": look.confidence,
        "session": look.session,
        "thought": look.thought,
        # a look-first reply that is the model's answer to the question as asked: the gate returns it
        "reply": look.thought_call.text if answers_as_asked(look.thought_call, context.sampling()) else None,
        "steps": steps,
    }


def route_after_look(state: ViCropState, config: RunnableConfig) -> str:
    """Skip the zoom when the gate is on and the question pass was already sure of its first token."""
    options = _options(config)
    confidence = state.get("confidence")
    if options.gate is not None and confidence is not None and confidence >= options.gate:
        return "answer_now"
    return "select"


def select_node(state: ViCropState, runtime: Runtime[FoveateContext], config: RunnableConfig) -> dict[str, Any]:
    context, options = resolve_context(runtime), _options(config)
    store = _images(context.store)
    image = store.get(state["image"])
    heat = np.asarray(state["heatmap"], dtype=np.float64)
    if options.feed == "mask":
        masked = carve_image(image, heat, keep=options.carve_keep, floor=options.carve_floor)
        ref = store.put(masked)
        whole = [0.0, 0.0, float(image.width), float(image.height)]
        reason = f"attention-masked image (CARVE feed, keep {options.carve_keep:g})"
        return {"crop": ref, "crop_box": whole, "steps": [crop_step("select", state["image"], whole, ref, reason)]}
    side = options.input_side or model_input_side(context.policy)
    selection = select_box(heat, image.size, side, options.ratios)
    if selection.box is None:
        return {"crop": None, "crop_box": None, "steps": []}
    reason = f"{options.method} window: ratio {selection.ratio:g} × {side}px, sharpness {selection.sharpness:.3g}"
    return crop_update("select", state["image"], image, selection.box, store, reason)


def _answer(
    policy: Any,
    messages: list[dict],
    session: str | None,
    options: ViCropConfig,
    params,
    *,
    same: bool = False,
    start: str | None = None,
) -> ChatResult:
    """Answer ``messages``, reusing the question pass's cache when it is still there (then drop it).

    ``same``: ``messages`` is exactly the probed conversation, so decoding continues from the cache directly.
    ``start``: the look-first thought to continue (``<think>the red``), prefilled rather than decoded again
    (greedy decoding on a model with sessions only; elsewhere the model writes its thought anew).
    """
    start = start if start and continues_thought(policy, params) else None
    reuse = session is not None and options.reuse_prefix
    if hasattr(policy, "chat_with_prefix") and (reuse or start):
        with _locked(policy):
            try:
                if same and params.greedy and params.n == 1 and reuse and not start:
                    return policy.continue_probe([session], params)[0]
                kept = session if reuse else None
                return policy.chat_with_prefix([messages], [kept], params, starts=[start or ""])[0]
            except PolicyError:  # the session was evicted meanwhile: answer the ordinary way
                pass
            finally:
                if session is not None:
                    policy.release_sessions([session])
    return policy.chat_one(messages, params)


def answer_now_node(state: ViCropState, runtime: Runtime[FoveateContext], config: RunnableConfig) -> dict[str, Any]:
    """The gate fired: the answer to the question pass itself, decoded from its cache when it is still there."""
    context = resolve_context(runtime)
    params = context.sampling()
    if state.get("reply") is not None:  # the look-first reply already answered; its model call is in the trace
        if state.get("session") is not None:
            context.policy.release_sessions([state["session"]])
        answer = protocol.strip_thought(state["reply"])
        steps = [answer_step("answer", answer)]
        return {"answer": answer, "messages": [AIMessage(content=answer)], "steps": steps, "session": None}
    messages = to_policy_messages(state["messages"], _images(context.store))
    # After a thought the probed text goes on past the prompt, so the answer is decoded anew (sharing its cache).
    same = not state.get("thought")
    result = _answer(context.policy, messages, state.get("session"), _options(config), params, same=same)
    prompt = prompt_for_trace(messages, image_refs(state["messages"]))
    return {**answer_update("answer", prompt, result, gated=True), "session": None}


def answer_node(state: ViCropState, runtime: Runtime[FoveateContext], config: RunnableConfig) -> dict[str, Any]:
    context, options = resolve_context(runtime), _options(config)
    store = _images(context.store)
    messages = to_policy_messages(state["messages"], store)
    refs = image_refs(state["messages"])
    crop_ref = state.get("crop")
    if crop_ref is not None:
        # CARVE: the masked image replaces the original; ViCrop: the original first, then the crop
        shown = [crop_ref] if options.feed == "mask" else [state["image"], crop_ref]
        messages, refs = reshow_last_turn(messages, refs, shown, store)
    # after a look-first reply, the answer continues its thought (the referent it restated) with the crop in view
    start = state.get("thought") if crop_ref is not None else None
    result = _answer(context.policy, messages, state.get("session"), options, context.sampling(), start=start)
    return {**answer_update("answer", prompt_for_trace(messages, refs), result), "session": None}


# ---- wiring -------------------------------------------------------------------------------------------------
def build(checkpointer: Any = None, **options: Any):
    """The compiled ViCrop graph; ``options`` are `ViCropConfig` fields (e.g. ``method="grad-att"``)."""
    load_vicrop_config(**options)  # unknown or invalid options fail here, not mid-run
    builder = StateGraph(ViCropState, context_schema=FoveateContext)
    builder.add_node("intake", intake_node)
    builder.add_node("look", look_node)
    builder.add_node("answer_now", answer_now_node)
    builder.add_node("select", select_node)
    builder.add_node("answer", answer_node)
    builder.add_edge(START, "intake")  # every run starts by normalising its input
    builder.add_edge("intake", "look")  # ask the question once to see where the model looks
    # already confident (optional gate) → answer from that pass; otherwise zoom where it looked
    builder.add_conditional_edges("look", route_after_look, {"answer_now": "answer_now", "select": "select"})
    builder.add_edge("select", "answer")  # answer from the original plus the crop (or the masked image)
    builder.add_edge("answer", END)
    builder.add_edge("answer_now", END)
    method = options.get("method", "rel-att")
    name = "vicrop-carve" if options.get("feed") == "mask" else f"vicrop-{method}"
    graph = builder.compile(checkpointer=checkpointer, name=name)
    return graph.with_config({"configurable": {"vicrop_defaults": options}}) if options else graph


graph = build()
