"""ViCrop: training-free zoom guided by the model's own attention or gradients.

Paper: Zhang, Khayatkhoei, Chhikara, Ilievski, "MLLMs Know Where to Look: Training-free Perception of Small
Visual Details with Multimodal LLMs", ICLR 2025. The model is asked the question once to see where it looks;
the most sharply attended square window is cropped and fed back as a second image beside the original.

The method's steps, in the paper's order, are this module's sections:

1. **question map** (`look_attention`, `look_pure_grad`): the question's map over the image at one layer:
   ``rel-att``/``grad-att`` read the attention of the answer position (the last prompt token) to the image
   tokens, mean over heads (``grad-att``: ``mean_heads(A ⊙ ReLU(∂v/∂A))``, ``v = log p(argmax first token)``);
   ``pure-grad`` reads ``‖∂v/∂pixels‖₂`` times a high-pass edge mask, pooled to the token grid;
2. **generic map**: the same for the generic prompt ("Write a general description of the image.");
3. **normalise** (`relative`): ``A_q / (A_g + ε·mean(A_g))``;
4. **select window** (`tools.saliency.select_box`): square windows of side ``s·r`` (``s`` the model's input side,
   ``r`` in `ViCropConfig.ratios`), the sharpest one;
5. **crop** (`zoom_view`): the window cut from the original image;
6. **answer** (`answer_pass`): the final user turn becomes ``[original image, crop, question]``, greedy.

Graph (one question per run, with a trace)::

    intake → look (1-3) ─┬─ (gate: already sure) ───────────────────→ answer_now (6) → END
                         └─ select (4-5) → answer (6: image + crop + question) → END

`answer_many` runs the same steps on several questions with every model call batched (one probe forward, one
answer batch). Registered names (``agents.STRATEGY_OPTIONS``): ``vicrop-rel``, ``vicrop-grad``, ``vicrop-puregrad``,
``vicrop-carve``, ``vicrop-rel-gate`` (``gate: 0.5``), ``vicrop-rel-blocks`` (``high_res_block: 1024``). Options:
``configs/vicrop.yaml`` (`ViCropConfig`) ← the registered name ← per call (``config={"configurable": {"vicrop":
{...}}}``); the layer is per model (`agents.vicrop_config.resolve_layer`, ``foveate vicrop calibrate``).

Model-side, only declared `WhiteBoxPolicy` calls: maps and probabilities (`attention_probe`), kept KV caches
(sessions), and where the model decides its answer (`answer_starts`: "" for Qwen2-VL/2.5-VL, a look-first model's
thought up to its answer, `policies.look_first`). Efficiency against the reference (eager attention over all
layers, two prefills, batch 1): one layer's answer-position row under SDPA; question rows batched with their KV
caches kept, generic rows reusing them; generic maps cached per image; the answer pass prefilling only the crop
and the question, or (gated) decoding straight from the question pass's cache.

Deliberate deviations from the paper, and why:
- rel-att divides by ``A_g + ε·mean(A_g)`` (the reference has no ε, so one near-zero generic cell makes the
  ratio explode; ε is relative to the map's mean so it means the same for every model).
- The window search runs on a finer grid than the token grid and keeps the exact ``s·r`` square
  (`tools.saliency`); high-resolution blocks (``high_res_block``, off by default: on world:small-detail's 1344-px
  scenes the demo model gains nothing from 2 × 2 blocks) use ceil division (no zero-width block for thin images).
- Optional confidence gate (off by default, not in the paper): if the answer position's token has probability
  ≥ ``gate``, answer from the question pass without cropping. Not for pure-grad, nor for blocked images unless
  the model's answer start was decoded on the whole image (its probe then serves the gate).
- ``feed: mask`` (``vicrop-carve``) is not ViCrop but CARVE ("Focusing by Contrastive Attention", 2025): the
  contrast map fades unattended pixels toward grey and the masked image *replaces* the original; the mask is
  built from the configured ``layer`` (CARVE uses several deeper layers; a list works).
- A model that writes before it answers (look-first) is probed at its answer position inside that text, and the
  answer pass after the crop continues the same text; a blocked image's blocks are probed after the start the
  model wrote for the whole image. The generic map stays at the generic prompt's last token.
- In a thread, the question pass sends the whole transcript, as ``direct`` does; the generic pass is always a
  single turn about the image (so it can be cached per image). High-res blocks are probed single-turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from PIL import Image

from foveate import protocol
from foveate.agents.state import (
    AgentState,
    FoveateContext,
    answer_update,
    image_refs,
    intake,
    last_user_text,
    prompt_for_trace,
    reshow_last_turn,
    resolve_context,
    target_index,
    to_policy_messages,
    user_turn,
)
from foveate.agents.vicrop_config import (  # noqa: F401 (re-exported: the options live with the strategy)
    CONFIG_ENV,
    FEEDS,
    METHODS,
    ViCropConfig,
    generic_cache_key,
    load_vicrop_config,
    options_from,
    resolve_layer,
)
from foveate.errors import FoveateError, PolicyError, WhiteBoxUnsupported
from foveate.policies.base import (
    ChatPolicy,
    ChatResult,
    Completion,
    SamplingParams,
    WhiteBoxPolicy,
    answers_as_asked,
)
from foveate.tools.boxes import Box
from foveate.tools.crop import crop
from foveate.tools.saliency import carve_image, high_pass_mask, image_blocks, pool_to_grid, select_box, tile_maps
from foveate.tools.store import ImageStore, decoded
from foveate.trace import answer_step, crop_step, map_step, model_call_step

REQUIRES_WHITE_BOX = True  # attention maps and gradients: not servable over an OpenAI-compatible endpoint


class ViCropState(AgentState, total=False):
    heatmap: list[list[float]]  # the map the box was chosen on, over the whole image (token grid or tiled)
    confidence: float | None  # p(argmax answer token) in the question pass; None when not measured
    session: str | None  # policy-side KV cache of the question pass (process-local; a miss = full prefill)
    crop: str | None  # ref of the crop (or of the CARVE masked image); None when the image needs no zoom
    crop_box: list[float] | None  # the region cropped, original pixels
    thought: str | None  # what the model wrote before its answer, where the map was read (look-first models)
    reply: str | None  # look-first models: the whole greedy reply that start came from, when it answers as asked


def require_white_box(policy: ChatPolicy) -> WhiteBoxPolicy:
    if not isinstance(policy, WhiteBoxPolicy):
        raise WhiteBoxUnsupported(
            f"ViCrop reads attention maps and gradients, which {policy.name} does not expose: run it on a local "
            "model (--model DIR) instead of an HTTP endpoint"
        )
    return policy


# ---- 1-2. question map and generic map ----------------------------------------------------------------------
@dataclass
class Look:
    """What the look step measured for one question."""

    heat: np.ndarray  # the map boxes are chosen on (step 3's normalised map, or the question map)
    question: np.ndarray | None = None  # raw question map (rel-att), for the trace
    generic: np.ndarray | None = None  # generic map (rel-att, pure-grad pooled), for the trace
    confidence: float | None = None
    session: str | None = None
    token: str = ""
    prompt_tokens: int = 0
    latency_s: float = 0.0
    rows: int = 0  # conversations in the batched pass
    generic_cached: bool = False
    thought: str | None = None  # the model's answer start the question map was read after (look-first models)
    thought_call: ChatResult | None = None  # the greedy reply that start came from (a model call of its own)
    probed_in_reply: bool = False  # the map and confidence were recorded while that reply was decoded
    generic_pass: bool = False  # the generic map was computed for this question (not cached, not gated away)


def look_attention(
    policy: WhiteBoxPolicy,
    store: ImageStore,
    requests: list[tuple[str, list[dict], int]],
    options: ViCropConfig,
    layer: int | list[int],
) -> list[Look]:
    """rel-att / grad-att maps for questions ``(image ref, conversation, target image index)``.

    The model's answer starts come first (`WhiteBoxPolicy.answer_starts`: nothing to do for most models; a
    look-first model's reply, which may carry the whole-image probe). One batched forward then covers every
    question row not probed yet (one per block of a blocked image) and keeps the rows' KV caches; the generic rows
    of images whose generic map is not cached reuse those caches, so they cost only the generic prompt's tokens.
    Without prefix reuse the generic rows join the first batch. With a ``gate``, questions the gate will answer
    need no generic row, and a blocked image whose whole-image probe is sure enough probes no block."""
    claimed: list[tuple[str, str]] = []  # generic maps this call computes: stored, else released for others
    try:
        return _look_attention(policy, store, requests, options, layer, claimed)
    finally:
        for ref, key in claimed:
            store.release_array(ref, key)


def _look_attention(
    policy: WhiteBoxPolicy,
    store: ImageStore,
    requests: list[tuple[str, list[dict], int]],
    options: ViCropConfig,
    layer: int | list[int],
    claimed: list[tuple[str, str]],
) -> list[Look]:
    gradient = options.method == "grad-att"
    sessions_work = options.reuse_prefix and policy.supports_prefix_reuse
    conversations: list[list[dict]] = []
    keep: list[bool] = []
    plans, generic_cached = [], {}
    batched_generics: dict[tuple[str, str], tuple[int, tuple[int, int]]] = {}
    # → (question rows, generic conversations, layout): each generic row reuses its question row's cache
    session_generics: dict[tuple[str, str], tuple[list[int], list[list[dict]], tuple[int, int]]] = {}
    # First the model's answer starts (its first call; then, as when the look held the model throughout, the
    # question whose reply came first computes a shared generic map and the others wait for it: claim_array).
    starts = policy.answer_starts(
        [m for _, m, _ in requests],
        layer=None if gradient else layer,
        keep=[sessions_work] * len(requests),
        look_first=options.look_first,
        max_tokens=options.thought_tokens,
    )
    for ref, messages, target in requests:
        block_images, layout = image_blocks(store.get(ref), options.high_res_block)
        whole = layout == (1, 1)
        questions = [messages] if whole else [user_turn(block, last_user_text(messages)) for block in block_images]
        first = len(conversations)
        conversations += questions
        keep += [whole and sessions_work] + [False] * (len(questions) - 1)
        key = (ref, generic_cache_key(policy, options, layer, layout))
        if not gradient and key not in batched_generics and key not in session_generics and key not in generic_cached:
            cached = store.claim_array(*key) if options.cache_generic else None  # concurrent questions: once
            claimed += [key] if options.cache_generic and cached is None else []
            if cached is not None:
                generic_cached[key] = cached
            elif sessions_work:  # after the batch, reusing each question row's cache of its image or block
                rows = list(range(first, first + len(questions)))
                keep[first : first + len(questions)] = [True] * len(questions)
                session_generics[key] = (rows, [user_turn(b, options.generic_prompt) for b in block_images], layout)
            else:  # the generic pass rides in the same batch as the questions
                batched_generics[key] = (len(conversations), layout)
                conversations += [user_turn(block, options.generic_prompt) for block in block_images]
                keep += [False] * len(block_images)
        plans.append((key, layout, whole, target, first, len(questions)))
    suffixes, thought_calls = [""] * len(conversations), [None] * len(conversations)
    results: list[Any] = [None] * len(conversations)  # rows an answer start already measured are filled in here
    whole_probes: dict[int, Any] = {}  # a blocked image's whole-image probe (its cache serves the answer pass)
    from_reply: set[int] = set()
    for (_, _, whole, _, first, count), start in zip(plans, starts, strict=True):
        suffixes[first : first + count] = [start.text] * count  # blocks are read after the whole image's start
        thought_calls[first] = start.reply
        if start.probe is not None and whole:
            results[first] = start.probe
            from_reply.add(first)
        elif start.probe is not None:
            whole_probes[first] = start.probe
    gated = {first for first, probe in whole_probes.items() if options.gate is not None and probe.prob >= options.gate}
    skip, batched_generics, session_generics = _unneeded_rows(plans, gated, batched_generics, session_generics)
    todo = [row for row, result in enumerate(results) if result is None and row not in skip]
    if todo:
        probed = policy.attention_probe(
            [conversations[row] for row in todo],
            layer,
            gradient=gradient,
            keep=[keep[row] for row in todo],
            suffixes=[suffixes[row] for row in todo],
        )
        for row, result in zip(todo, probed, strict=True):
            results[row] = result
    generics = dict(generic_cached)
    for key, (start, layout) in batched_generics.items():
        maps = [r.maps[0].values for r in results[start : start + layout[0] * layout[1]]]
        generics[key] = maps[0] if layout == (1, 1) else tile_maps(maps, layout)
    if options.gate is not None:  # questions the gate will answer straight away need no generic map
        needed = {plan[0] for plan in plans if not plan[2] or results[plan[4]].prob < options.gate}  # no gate: blocks
        session_generics = {key: value for key, value in session_generics.items() if key in needed}
    if session_generics:
        rows = [row for question_rows, *_ in session_generics.values() for row in question_rows]
        turns = [turn for _, generic_turns, _ in session_generics.values() for turn in generic_turns]
        probes = iter(policy.attention_probe(turns, layer, sessions=[results[row].session for row in rows]))
        for key, (question_rows, _, layout) in session_generics.items():
            maps = [next(probes).maps[0].values for _ in question_rows]
            generics[key] = maps[0] if layout == (1, 1) else tile_maps(maps, layout)
    # block rows' caches served only their generic rows (a blocked image's answer reuses its whole-image cache)
    block_sessions = [r.session for plan in plans if not plan[2] for r in results[plan[4] : plan[4] + plan[5]] if r]
    if any(block_sessions):
        policy.release_sessions(block_sessions)
    if options.cache_generic:
        for key in [*batched_generics, *session_generics]:
            store.put_array(key[0], key[1], generics[key].astype(np.float32))
    looks = []
    for key, layout, whole, target, start, count in plans:
        thought, call = suffixes[start] or None, thought_calls[start]
        if start in gated:  # answered from the whole-image probe: its map, no block probed
            probe = whole_probes[start]
            heat, confidence, session = probe.maps[target].values, probe.prob, probe.session
            looks.append(Look(heat=heat, confidence=confidence, session=session, token=probe.token, rows=1,
                              thought=thought, thought_call=call, probed_in_reply=True))  # fmt: skip
            continue
        rows, probe = results[start : start + count], whole_probes.get(start)
        maps = [r.maps[target if whole else 0].values for r in rows]
        question = maps[0] if whole else tile_maps(maps, layout)
        generic = None if gradient else generics.get(key)  # None: gated before a generic map was needed
        looks.append(
            Look(
                heat=question if generic is None else relative(question, generic, options.rel_eps),
                question=None if generic is None else question,
                generic=generic,
                confidence=rows[0].prob if whole else (probe.prob if probe else None),
                session=rows[0].session if whole else (probe.session if probe else None),
                token=rows[0].token if whole or probe is None else probe.token,
                prompt_tokens=sum(r.prompt_tokens for r in rows),
                latency_s=rows[0].latency_s,
                rows=len(results) + sum(len(rows) for rows, *_ in session_generics.values()),
                generic_cached=key in generic_cached,
                thought=thought,
                thought_call=call,
                probed_in_reply=start in from_reply,
                generic_pass=key in batched_generics or key in session_generics,
            )
        )
    return looks


def _unneeded_rows(plans: list[tuple], gated: set[int], batched: dict, by_session: dict):
    """Rows no question needs once ``gated`` (starts of blocked questions the gate answers) are skipped: their block
    rows (unless another question's generic rows reuse those caches) and generic rows of images no other question
    needs. Returns (rows to skip, the generic plans still needed: batched, by session)."""
    wanted = {plan[0] for plan in plans if plan[4] not in gated}
    by_session = {key: value for key, value in by_session.items() if key in wanted}
    kept = {row for rows, *_ in by_session.values() for row in rows}
    skip = {row for plan in plans if plan[4] in gated for row in range(plan[4], plan[4] + plan[5])} - kept
    for key, (start, layout) in batched.items():
        if key not in wanted:
            skip.update(range(start, start + layout[0] * layout[1]))
    return skip, {key: value for key, value in batched.items() if key in wanted}, by_session


def look_pure_grad(
    policy: WhiteBoxPolicy, store: ImageStore, ref: str, messages: list[dict], options: ViCropConfig, target: int
) -> Look:
    """pure-grad: pixel-gradient ratio × high-pass mask, pooled to the token grid (blocks tiled if high-res)."""
    block_images, layout = image_blocks(store.get(ref), options.high_res_block)
    whole = layout == (1, 1)
    questions = [messages] if whole else [user_turn(block, last_user_text(messages)) for block in block_images]
    key = generic_cache_key(policy, options, "pixels", layout)
    cached = [store.get_array(ref, f"{key}-b{i}") for i in range(len(block_images))] if options.cache_generic else []
    generic_cached = bool(cached) and all(c is not None for c in cached)
    generics = [] if generic_cached else [user_turn(block, options.generic_prompt) for block in block_images]
    maps = policy.pixel_gradient(questions + generics, [None] * (len(questions) + len(generics)))
    question_pixels = [m[target if whole else 0].values for m in maps[: len(questions)]]
    generic_pixels = cached if generic_cached else [m[0].values for m in maps[len(questions) :]]
    if not generic_cached and options.cache_generic:
        for i, values in enumerate(generic_pixels):
            store.put_array(ref, f"{key}-b{i}", values.astype(np.float32))
    heats, generic_grids = [], []
    for block, q, g in zip(block_images, question_pixels, generic_pixels, strict=True):
        height, width = q.shape
        mask = high_pass_mask(block, (width, height))
        grid = (max(1, round(height / policy.token_cell)), max(1, round(width / policy.token_cell)))
        heats.append(pool_to_grid(relative(q, g, options.rel_eps) * mask, grid))
        generic_grids.append(pool_to_grid(g, grid))
    heat = heats[0] if whole else tile_maps(heats, layout)
    generic = generic_grids[0] if whole else tile_maps(generic_grids, layout)
    return Look(heat=heat, generic=generic, rows=len(maps), generic_cached=generic_cached)


# ---- 3. normalise -------------------------------------------------------------------------------------------
def relative(question: np.ndarray, generic: np.ndarray, eps: float) -> np.ndarray:
    """The question map over the generic map: ``A_q / (A_g + ε·mean(A_g))``."""
    scale = float(np.mean(generic)) if np.mean(generic) > 0 else 1.0
    return question / (generic + eps * scale)


# ---- 4-5. select window, crop -------------------------------------------------------------------------------
def zoom_view(image: Image.Image, heat: np.ndarray, options: ViCropConfig, side: int):
    """The view the answer sees: ``(view, box in original pixels, reason)``; ``feed: crop`` cuts the sharpest
    ``s·r`` window (shown beside the original), ``feed: mask`` fades the unattended pixels (shown instead of it).
    ``(None, None, "")`` when no window is smaller than the image (no zoom)."""
    if options.feed == "mask":
        masked = carve_image(image, heat, keep=options.carve_keep, floor=options.carve_floor)
        reason = f"attention-masked image (CARVE feed, keep {options.carve_keep:g})"
        return masked, Box(0, 0, image.width, image.height), reason
    selection = select_box(heat, image.size, side, options.ratios)
    if selection.box is None:
        return None, None, ""
    region, used = crop(image, selection.box)
    reason = f"{options.method} window: ratio {selection.ratio:g} × {side}px, sharpness {selection.sharpness:.3g}"
    return region, used, reason


# ---- 6. answer ----------------------------------------------------------------------------------------------
@dataclass
class AnswerRequest:
    """One answer to decode: ``messages`` (the question, or the question with the crop) and what the question pass
    left: its kept cache (``session``), the model's answer start to continue (``start``), and whether ``messages``
    is exactly the probed conversation (``same``: decode straight from the cache)."""

    messages: list[dict]
    session: str | None = None
    start: str = ""
    same: bool = False


def answer_pass(
    policy: WhiteBoxPolicy, requests: list[AnswerRequest], params: SamplingParams, reuse_prefix: bool = True
) -> list[ChatResult]:
    """The answers to ``requests``, each reusing its question pass's cache while it is still there: decoded
    straight from it (``same``), or prefilling only what the new conversation adds (the crop and the question)
    and continuing the model's answer start; a cache evicted meanwhile, or none, means an ordinary ``chat``. All
    calls are batched; every session is released."""
    results: list[ChatResult | None] = [None] * len(requests)
    sessions = [r.session if reuse_prefix else None for r in requests]
    continuing = policy.continues_start(params)
    starts = [r.start if continuing else "" for r in requests]
    direct = params.greedy and params.n == 1
    from_cache = [i for i, r in enumerate(requests) if r.same and direct and sessions[i] and not starts[i]]
    prefixed = [i for i in range(len(requests)) if i not in from_cache and (sessions[i] or starts[i])]
    try:
        if from_cache:
            decoded_now = policy.continue_probe([sessions[i] for i in from_cache], params)
            results = _filled(results, from_cache, decoded_now)
    except PolicyError:  # a session evicted meanwhile: these rows are answered the ordinary way
        pass
    try:
        if prefixed:
            conversations = [requests[i].messages for i in prefixed]
            kept, begun = [sessions[i] for i in prefixed], [starts[i] for i in prefixed]
            results = _filled(results, prefixed, policy.chat_with_prefix(conversations, kept, params, starts=begun))
    except PolicyError:
        pass
    rest = [i for i, result in enumerate(results) if result is None]
    if rest:
        results = _filled(results, rest, policy.chat([requests[i].messages for i in rest], params))
    policy.release_sessions([r.session for r in requests])
    return results


def _filled(results: list, rows: list[int], values: list) -> list:
    """``results`` with ``values`` placed at ``rows``."""
    results = list(results)
    for row, value in zip(rows, values, strict=True):
        results[row] = value
    return results


def gate_fires(options: ViCropConfig, confidence: float | None) -> bool:
    return options.gate is not None and confidence is not None and confidence >= options.gate


# ---- the graph ----------------------------------------------------------------------------------------------
def intake_node(state: ViCropState, runtime: Runtime[FoveateContext]) -> dict[str, Any]:
    return intake(state, resolve_context(runtime).store)


def _probe_step(node: str, prompt: list[dict], token: str, prompt_tokens: int, latency: float, model: str, **extra):
    result = ChatResult([Completion(token, 1)], prompt_tokens, latency, model)
    return model_call_step(node, prompt, result, **extra)


def _look_steps(look: Look, prompt: list[dict], model: str, options: ViCropConfig) -> list[dict[str, Any]]:
    """The look node's model calls: the model's written answer start (carrying the probe when it was recorded while
    decoding), then the probe pass (question and generic rows, or only the generic rows after such a reply)."""
    probe = {"confidence": look.confidence, "rows": look.rows, "generic_cached": look.generic_cached}
    steps = []
    if look.thought_call is not None:  # the reply whose start the map is read in
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
    """Steps 1-3: the question map, the generic map and their ratio (or pure-grad's)."""
    context, options = resolve_context(runtime), options_from(config)
    policy, store = require_white_box(context.policy), decoded(context.store)
    messages = to_policy_messages(state["messages"], store)
    refs = image_refs(state["messages"])
    layer = resolve_layer(options.layer, policy)
    target = target_index(refs, state["image"])
    if options.method == "pure-grad":
        look = look_pure_grad(policy, store, state["image"], messages, options, target)
    else:
        look = look_attention(policy, store, [(state["image"], messages, target)], options, layer)[0]
    steps = _look_steps(look, prompt_for_trace(messages, refs), policy.name, options)
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
    """Skip the zoom when the gate is on and the question pass was already sure of its answer token."""
    return "answer_now" if gate_fires(options_from(config), state.get("confidence")) else "select"


def select_node(state: ViCropState, runtime: Runtime[FoveateContext], config: RunnableConfig) -> dict[str, Any]:
    """Steps 4-5: the sharpest window, cropped (or the masked image)."""
    context, options = resolve_context(runtime), options_from(config)
    store = decoded(context.store)
    image = store.get(state["image"])
    side = options.input_side or context.policy.input_side
    view, box, reason = zoom_view(image, np.asarray(state["heatmap"], dtype=np.float64), options, side)
    if view is None:
        return {"crop": None, "crop_box": None, "steps": []}
    ref, box = store.put(view), box.to_list()
    return {"crop": ref, "crop_box": box, "steps": [crop_step("select", state["image"], box, ref, reason=reason)]}


def answer_now_node(state: ViCropState, runtime: Runtime[FoveateContext], config: RunnableConfig) -> dict[str, Any]:
    """The gate fired: the answer to the question pass itself (step 6 without a crop)."""
    context = resolve_context(runtime)
    policy = require_white_box(context.policy)
    if state.get("reply") is not None:  # the look-first reply already answered; its model call is in the trace
        policy.release_sessions([state.get("session")])
        answer = protocol.strip_thought(state["reply"])
        steps = [answer_step("answer", answer)]
        return {"answer": answer, "messages": [AIMessage(content=answer)], "steps": steps, "session": None}
    messages = to_policy_messages(state["messages"], decoded(context.store))
    # After a written start the probed text goes on past the prompt: the answer is decoded anew, sharing its cache.
    request = AnswerRequest(messages, state.get("session"), same=not state.get("thought"))
    result = answer_pass(policy, [request], context.sampling(), options_from(config).reuse_prefix)[0]
    prompt = prompt_for_trace(messages, image_refs(state["messages"]))
    return {**answer_update("answer", prompt, result, gated=True), "session": None}


def answer_node(state: ViCropState, runtime: Runtime[FoveateContext], config: RunnableConfig) -> dict[str, Any]:
    """Step 6: answer from the original and the crop (CARVE: the masked image alone)."""
    context, options = resolve_context(runtime), options_from(config)
    policy, store = require_white_box(context.policy), decoded(context.store)
    messages = to_policy_messages(state["messages"], store)
    refs = image_refs(state["messages"])
    crop_ref = state.get("crop")
    if crop_ref is not None:
        shown = [crop_ref] if options.feed == "mask" else [state["image"], crop_ref]
        messages, refs = reshow_last_turn(messages, refs, shown, store)
    # after a written start, the answer continues it (the referent it restated) with the crop in view
    start = (state.get("thought") or "") if crop_ref is not None else ""
    request = AnswerRequest(messages, state.get("session"), start=start)
    result = answer_pass(policy, [request], context.sampling(), options.reuse_prefix)[0]
    return {**answer_update("answer", prompt_for_trace(messages, refs), result), "session": None}


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


# ---- the same steps on many questions, every model call batched ------------------------------------------------
def answer_many(
    policy: ChatPolicy,
    store: ImageStore,
    items: list[tuple[Any, str]],
    options: ViCropConfig | None = None,
    max_new_tokens: int = 128,
) -> list[dict[str, Any]]:
    """ViCrop (rel-att or grad-att) on single-turn ``(image, question)`` items: one look over all of them (one
    probe forward, + generic rows), then one answer pass. Returns ``answer`` (a leading thought stripped, as the
    graph's), ``box`` and ``confidence`` per item."""
    from foveate.tools.images import load_image

    options = options or load_vicrop_config()
    if options.method == "pure-grad":
        raise FoveateError("answer_many batches the attention methods; run pure-grad through the graph")
    policy, store = require_white_box(policy), decoded(store)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    refs = [image if str(image).startswith("sha256:") else store.put(load_image(image)) for image, _ in items]
    requests = [(ref, user_turn(store.get(ref), question), 0) for ref, (_, question) in zip(refs, items, strict=True)]
    looks = look_attention(policy, store, requests, options, resolve_layer(options.layer, policy))
    out, answering = [], []
    for (ref, messages, _), (_, question), look in zip(requests, items, looks, strict=True):
        out.append({"confidence": look.confidence, "box": None, "answer": None})
        if gate_fires(options, look.confidence):
            if answers_as_asked(look.thought_call, params):  # the finished look-first reply is the answer
                out[-1]["answer"] = protocol.strip_thought(look.thought_call.text)
                policy.release_sessions([look.session])
                continue
            answering.append((len(out) - 1, AnswerRequest(messages, look.session, same=not look.thought)))
            continue
        image = store.get(ref)
        view, box, _ = zoom_view(image, look.heat, options, options.input_side or policy.input_side)
        if view is not None:  # as the graph: the answer continues the start only beside a new view
            shown = [view] if options.feed == "mask" else [image, view]
            messages = user_turn(*shown, question)
            out[-1]["box"] = box.to_list() if options.feed == "crop" else None
        start = (look.thought or "") if view is not None else ""
        answering.append((len(out) - 1, AnswerRequest(messages, look.session, start=start)))
    results = answer_pass(policy, [request for _, request in answering], params, options.reuse_prefix)
    for (index, _), result in zip(answering, results, strict=True):
        out[index]["answer"] = protocol.strip_thought(result.text)
    return out
