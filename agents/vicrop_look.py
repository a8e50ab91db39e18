"""ViCrop's look step: the question's (and generic prompt's) attention or gradient maps, for `agents.vicrop`.

Split from agents/vicrop.py, whose docstring describes the algorithm, its efficiency and its deviations from the
paper; the graph's nodes stay there. Here: rel-att / grad-att maps for one or several questions
(`look_attention_many`: one batched probe, high-resolution blocks tiled, generic maps cached per image, a
look-first model's map read inside its own reply), pure-grad maps (`look_pure_grad`), and their helpers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foveate.agents.vicrop_config import ViCropConfig
from foveate.agents.vicrop_thought import wants_thoughts, write_thoughts
from foveate.policies.base import ChatPolicy, ChatResult
from foveate.tools.saliency import high_pass_mask, pool_to_grid, split_blocks, tile_maps
from foveate.tools.store import ImageStore


def resolve_layer(layer: int | list[int] | None, num_layers: int) -> int | list[int]:
    """None → the middle decoder layer; negative indices count from the end."""
    if layer is None:
        return num_layers // 2
    if isinstance(layer, (list, tuple)):
        return [index % num_layers if index < 0 else index for index in layer]
    return layer % num_layers if layer < 0 else layer


def user_turn(*parts: Any) -> list[dict[str, Any]]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p} for p in parts]
    return [{"role": "user", "content": content}]


def _model_fingerprint(policy: ChatPolicy) -> str:
    """What a cached generic map depends on besides the image: the model files and the input resolution."""
    inner = getattr(policy, "policy", policy)
    path = str(getattr(inner, "model_path", getattr(inner, "name", "")))
    stamps = []
    for name in ("model.safetensors", "config.json"):
        file = Path(path) / name
        if file.is_file():
            stat = file.stat()
            stamps.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return f"{path}|{stamps}|{getattr(inner, 'size_override', None)}"


def generic_cache_key(policy: ChatPolicy, options: ViCropConfig, layer: Any, layout: tuple[int, int]) -> str:
    """Image-store array key of a generic map: method, layer and a digest of everything else it depends on."""
    blob = f"{_model_fingerprint(policy)}|{options.generic_prompt}|{layer}|{layout}|{options.high_res_block}"
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    layer_label = "-".join(map(str, layer)) if isinstance(layer, list) else layer
    return f"vicrop-generic-{options.method}-L{layer_label}-{digest}"


# ---- maps ---------------------------------------------------------------------------------------------------
@dataclass
class Look:
    """What the look node measured."""

    heat: np.ndarray  # the map boxes are chosen on
    question: np.ndarray | None = None  # raw question map (rel-att), for the trace
    generic: np.ndarray | None = None  # generic map (rel-att, pure-grad pooled), for the trace
    confidence: float | None = None
    session: str | None = None
    token: str = ""
    prompt_tokens: int = 0
    latency_s: float = 0.0
    rows: int = 0  # conversations in the batched pass
    generic_cached: bool = False
    thought: str | None = None  # the assistant text the question map was read after (agents.vicrop_thought)
    thought_call: ChatResult | None = None  # the greedy reply that thought came from (a model call of its own)
    probed_in_reply: bool = False  # the map and confidence were recorded while that reply was decoded
    generic_pass: bool = False  # the generic map was computed for this question (not cached, not gated away)


def _relative(question: np.ndarray, generic: np.ndarray, eps: float) -> np.ndarray:
    scale = float(np.mean(generic)) if np.mean(generic) > 0 else 1.0
    return question / (generic + eps * scale)


def look_attention(
    policy: Any,
    store: ImageStore,
    ref: str,
    messages: list[dict],
    options: ViCropConfig,
    layer: int | list[int],
    target: int,
) -> Look:
    """rel-att / grad-att maps for one question (image ``target`` of ``messages``); see `look_attention_many`."""
    return look_attention_many(policy, store, [(ref, messages, target)], options, layer)[0]


def look_attention_many(
    policy: Any,
    store: ImageStore,
    requests: list[tuple[str, list[dict], int]],
    options: ViCropConfig,
    layer: int | list[int],
) -> list[Look]:
    """rel-att / grad-att maps for several questions ``(image ref, conversation, target image index)``.

    One batched forward over every question row (and every high-res block row) keeps the rows' KV caches; the
    generic rows for images whose generic map is not cached yet then reuse those caches, so they cost only the
    generic prompt's tokens (no second pass over the image or block). A look-first model's whole-image rows come
    from its reply instead (`agents.vicrop_thought.write_thoughts`). Without prefix reuse (option off, or a model
    without sessions) the generic rows simply join the first batch. Blocks are tiled per question; generic maps
    are stored for the next question about the same image. With a ``gate``, a blocked image whose whole-image reply
    is sure enough is not probed at all (`_unneeded_rows`): its Look carries the reply's map and confidence."""
    gradient = options.method == "grad-att"
    sessions_work = options.reuse_prefix and getattr(policy, "supports_prefix_reuse", False)
    conversations: list[list[dict]] = []
    keep: list[bool] = []
    plans, generic_cached = [], {}
    batched_generics: dict[tuple[str, str], tuple[int, tuple[int, int]]] = {}
    # → (question rows, generic conversations, layout): one row per block (one for a whole image), each generic row
    # reusing its question row's cache
    session_generics: dict[tuple[str, str], tuple[list[int], list[list[dict]], tuple[int, int]]] = {}
    for ref, messages, target in requests:
        image = store.get(ref)
        blocks, layout = split_blocks(image.size, options.high_res_block)
        whole = layout == (1, 1)
        block_images = [image] if whole else [image.crop(tuple(int(v) for v in b.to_list())) for b in blocks]
        if whole:
            questions = [messages]
        else:
            question_text = _last_user_text(messages)
            questions = [user_turn(block, question_text) for block in block_images]
        first = len(conversations)
        conversations += questions
        keep += [whole and sessions_work] + [False] * (len(questions) - 1)
        key = (ref, generic_cache_key(policy, options, layer, layout))
        if not gradient and key not in batched_generics and key not in session_generics and key not in generic_cached:
            cached = store.get_array(ref, key[1]) if options.cache_generic else None
            if cached is not None:
                generic_cached[key] = cached
            elif sessions_work:  # after the batch, reusing each question row's cache of its image or block
                rows = list(range(first, first + len(questions)))
                keep[first : first + len(questions)] = [True] * len(questions)
                generic_turns = [user_turn(block, options.generic_prompt) for block in block_images]
                session_generics[key] = (rows, generic_turns, layout)
            else:  # the generic pass rides in the same batch as the questions
                batched_generics[key] = (len(conversations), layout)
                conversations += [user_turn(block, options.generic_prompt) for block in block_images]
                keep += [False] * len(block_images)
        plans.append((key, layout, whole, target, first, len(questions)))
    suffixes, thought_calls = [""] * len(conversations), [None] * len(conversations)
    results: list[Any] = [None] * len(conversations)  # rows a reply already measured are filled in here
    reply_probes: dict[int, Any] = {}  # a blocked image's whole-image reply (its cache serves the answer pass)
    from_reply: set[int] = set()
    if wants_thoughts(policy, options.look_first):  # read inside a look-first model's thought
        # One reply per question, on the whole image; a blocked image's blocks are probed after the same thought
        # (it restates the question's referent, whatever part of the image a block shows). The reply records its
        # own attention (agents.vicrop_thought.write_thoughts), so a whole image needs no second pass.
        written = write_thoughts(
            policy, [m for _, m, _ in requests], options, None if gradient else layer, [sessions_work] * len(plans)
        )
        for (_, _, whole, _, first, count), (thought, reply, probe) in zip(plans, written, strict=True):
            suffixes[first : first + count] = [thought or ""] * count
            thought_calls[first] = reply
            if probe is not None and whole:
                results[first] = probe
                from_reply.add(first)
            elif probe is not None:
                reply_probes[first] = probe
    # The gate answers a blocked image from its whole-image reply too, before any block is probed.
    gated = options.gate is not None
    gated_blocks = {start for start, reply in reply_probes.items() if gated and reply.prob >= options.gate}
    skip, batched_generics, session_generics = _unneeded_rows(plans, gated_blocks, batched_generics, session_generics)
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
        generic_turns = [turn for _, turns, _ in session_generics.values() for turn in turns]
        probes = iter(policy.attention_probe(generic_turns, layer, sessions=[results[row].session for row in rows]))
        for key, (question_rows, _, layout) in session_generics.items():
            maps = [next(probes).maps[0].values for _ in question_rows]
            generics[key] = maps[0] if layout == (1, 1) else tile_maps(maps, layout)
    # block rows' caches served only their generic rows (a blocked image's answer reuses its reply's cache)
    block_rows = [r for plan in plans if not plan[2] for r in results[plan[4] : plan[4] + plan[5]]]
    block_sessions = [r.session for r in block_rows if r is not None]
    if any(block_sessions):
        policy.release_sessions(block_sessions)
    if options.cache_generic:
        for key in [*batched_generics, *session_generics]:
            store.put_array(key[0], key[1], generics[key].astype(np.float32))
    looks = []
    for key, layout, whole, target, start, count in plans:
        if start in gated_blocks:  # answered from the whole-image reply: its map, no block probed
            reply = reply_probes[start]
            heat, call = reply.maps[target].values, thought_calls[start]
            looks.append(Look(heat=heat, confidence=reply.prob, session=reply.session, token=reply.token, rows=1,
                              thought=suffixes[start] or None, thought_call=call, probed_in_reply=True))  # fmt: skip
            continue
        rows, reply = results[start : start + count], reply_probes.get(start)
        maps = [r.maps[target if whole else 0].values for r in rows]
        question = maps[0] if whole else tile_maps(maps, layout)
        generic = None if gradient else generics.get(key)  # None: gated before a generic map was needed
        looks.append(
            Look(
                heat=question if generic is None else _relative(question, generic, options.rel_eps),
                question=None if generic is None else question,
                generic=generic,
                confidence=rows[0].prob if whole else getattr(reply, "prob", None),
                session=rows[0].session if whole else getattr(reply, "session", None),
                token=rows[0].token if whole else getattr(reply, "token", rows[0].token),
                prompt_tokens=sum(r.prompt_tokens for r in rows),
                latency_s=rows[0].latency_s,
                rows=len(results) + sum(len(rows) for rows, *_ in session_generics.values()),
                generic_cached=key in generic_cached,
                thought=suffixes[start] or None,
                thought_call=thought_calls[start],
                probed_in_reply=start in from_reply,
                generic_pass=key in batched_generics or key in session_generics,
            )
        )
    return looks


def _unneeded_rows(plans: list[tuple], gated_blocks: set[int], batched: dict, by_session: dict):
    """Rows no question needs once ``gated_blocks`` (starts of blocked questions the gate answers) are skipped: their
    block rows (unless another question's generic rows reuse those caches) and generic rows of images no other
    question needs. Returns (rows to skip, the generic plans still needed: batched, by session)."""
    wanted = {plan[0] for plan in plans if plan[4] not in gated_blocks}
    by_session = {key: value for key, value in by_session.items() if key in wanted}
    kept = {row for rows, *_ in by_session.values() for row in rows}
    skip = {row for plan in plans if plan[4] in gated_blocks for row in range(plan[4], plan[4] + plan[5])} - kept
    for key, (start, layout) in batched.items():
        if key not in wanted:
            skip.update(range(start, start + layout[0] * layout[1]))
    return skip, {key: value for key, value in batched.items() if key in wanted}, by_session


def look_pure_grad(
    policy: Any, store: ImageStore, ref: str, messages: list[dict], options: ViCropConfig, target: int
) -> Look:
    """pure-grad: pixel-gradient ratio × high-pass mask, pooled to the token grid (blocks tiled if high-res)."""
    image = store.get(ref)
    blocks, layout = split_blocks(image.size, options.high_res_block)
    whole = layout == (1, 1)
    block_images = [image] if whole else [image.crop(tuple(int(v) for v in b.to_list())) for b in blocks]
    question_text = _last_user_text(messages)
    questions = [messages] if whole else [user_turn(block, question_text) for block in block_images]
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
    cell = int(getattr(policy, "patch_size", 14)) * int(getattr(policy, "merge_size", 2))
    heats, generic_grids = [], []
    for block, q, g in zip(block_images, question_pixels, generic_pixels, strict=True):
        height, width = q.shape
        mask = high_pass_mask(block, (width, height))
        grid = (max(1, round(height / cell)), max(1, round(width / cell)))
        heats.append(pool_to_grid(_relative(q, g, options.rel_eps) * mask, grid))
        generic_grids.append(pool_to_grid(g, grid))
    heat = heats[0] if whole else tile_maps(heats, layout)
    generic = generic_grids[0] if whole else tile_maps(generic_grids, layout)
    return Look(heat=heat, generic=generic, rows=len(maps), generic_cached=generic_cached)


def _last_user_text(messages: list[dict]) -> str:
    parts = messages[-1]["content"]
    return " ".join(p["text"] for p in parts if p.get("type") == "text").strip()


def _target_index(refs: list[str], ref: str) -> int:
    """Which image of the conversation the question is about: the last occurrence of ``ref`` (else the last)."""
    if ref in refs:
        return len(refs) - 1 - refs[::-1].index(ref)
    return max(len(refs) - 1, 0)
