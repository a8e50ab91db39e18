"""ViCrop on several questions at once, every model call batched (`answer_many`): for bulk use and
`bench/vicrop.py`. The graph in `agents.vicrop` does the same for one question with a trace; the algorithm and its
deviations from the paper are described there."""

from __future__ import annotations

import contextlib
from typing import Any

from foveate.agents.oracle_crop import model_input_side
from foveate.agents.state import FoveateContext
from foveate.agents.vicrop import (
    ViCropConfig,
    _images,
    _locked,
    _require_white_box,
    load_vicrop_config,
    look_attention_many,
    resolve_layer,
    user_turn,
)
from foveate.agents.vicrop_thought import answers_as_asked, continues_thought
from foveate.errors import FoveateError, PolicyError
from foveate.protocol import strip_thought
from foveate.tools.crop import crop as crop_image
from foveate.tools.saliency import carve_image, select_box
from foveate.tools.store import ImageStore


def answer_many(
    policy: Any,
    store: ImageStore,
    items: list[tuple[Any, str]],
    options: ViCropConfig | None = None,
    max_new_tokens: int = 128,
) -> list[dict[str, Any]]:
    """ViCrop (rel-att or grad-att) on several single-turn ``(image, question)`` items, every model call batched: one
    probe forward for all questions (+ generic rows), one continuation batch for gated items and one answer
    batch (reusing each question's cache) for the rest. Returns ``answer`` (a leading thought stripped, as the
    graph's answer), ``box`` and ``confidence`` per item. The graph does the same for one question with a trace;
    this is for bulk use and the benchmark."""
    from foveate.tools.images import load_image

    options = options or load_vicrop_config()
    if options.method == "pure-grad":
        raise FoveateError("answer_many batches the attention methods; run pure-grad through the graph")
    _require_white_box(policy)
    store = _images(store)
    params = FoveateContext(max_new_tokens=max_new_tokens).sampling()
    refs = [image if str(image).startswith("sha256:") else store.put(load_image(image)) for image, _ in items]
    requests = [(ref, user_turn(store.get(ref), question), 0) for ref, (_, question) in zip(refs, items, strict=True)]
    side = options.input_side or model_input_side(policy)
    with _locked(policy):
        looks = look_attention_many(policy, store, requests, options, resolve_layer(options.layer, policy.num_layers))
        gated, answered, out = [], [], []
        for index, ((ref, messages, _), look) in enumerate(zip(requests, looks, strict=True)):
            out.append({"confidence": look.confidence, "box": None, "answer": ""})
            if options.gate is not None and look.confidence is not None and look.confidence >= options.gate:
                gated.append((index, look.session))
                continue
            image = store.get(ref)
            box = select_box(look.heat, image.size, side, options.ratios).box
            if box is not None and options.feed == "crop":
                region, used = crop_image(image, box)
                messages = user_turn(image, region, items[index][1])
                out[index]["box"] = used.to_list()
            elif options.feed == "mask":
                messages = user_turn(
                    carve_image(image, look.heat, options.carve_keep, options.carve_floor), items[index][1]
                )
            zoomed = out[index]["box"] is not None or options.feed == "mask"  # as the graph: only beside a new view
            answered.append((index, messages, look.session, (look.thought or "") if zoomed else ""))
        # A finished look-first reply already answered the question as asked.
        replied = {index for index, _ in gated if answers_as_asked(looks[index].thought_call, params)}
        for index in replied:
            out[index]["answer"] = strip_thought(looks[index].thought_call.text)
        gated = [(index, session) for index, session in gated if index not in replied]
        sessions = [s for _, s in gated if s is not None]
        # A thought probed as a suffix is in its session's cache: decode anew (a reply's session is its prompt's).
        suffixed = any(looks[index].thought and not looks[index].probed_in_reply for index, _ in gated)
        continued = None
        if len(sessions) == len(gated) and gated and not suffixed:
            with contextlib.suppress(PolicyError):  # a session evicted meanwhile: ask again below
                continued = policy.continue_probe(sessions, params)
        if continued is not None:
            for (index, _), result in zip(gated, continued, strict=True):
                out[index]["answer"] = strip_thought(result.text)
        else:  # no caches kept (reuse off, or a model without sessions), a suffix thought, or evicted: ask again
            answered += [(index, requests[index][1], session, "") for index, session in gated]
        if answered:
            conversations = [messages for _, messages, _, _ in answered]
            sessions = [session if options.reuse_prefix else None for _, _, session, _ in answered]
            plain = continues_thought(policy, params)
            starts = [start if plain else "" for *_, start in answered]
            for (index, *_), result in zip(
                answered, policy.chat_with_prefix(conversations, sessions, params, starts=starts), strict=True
            ):
                out[index]["answer"] = strip_thought(result.text)
        if hasattr(policy, "release_sessions"):
            policy.release_sessions([look.session for look in looks])
    return out
