"""ViCrop for look-first models: read the question map inside the model's own thought.

A model trained with look-first answers (`rl.sft_data.DataMix.look_first`, the demo recipes from
configs/probes/demo-v9.yaml on) replies ``<think>the red circle</think>circle``: the answer is first predicted AT
the referent's last word, inside the thought, and that is where its attention looks the object up (layer 0 there
puts 0.66 of its image attention on the asked object when the answer is right, `python bench/lookup_attention.py
DIR`). At the last prompt token, where ViCrop reads the paper's map, such a model predicts ``<think>``: the map
there is not the lookup, and the gate's p(first token) is the probability of ``<think>``, near 1 on every question.

With `ViCropConfig.look_first` on (``auto``: when the model's saved recipe says it answers look-first), the
question pass first lets the model write its reply (greedy, `thought_tokens` at most), keeps the thought up to the
answer inside it (`thought_prefix`: ``<think>the red``), and probes the conversation with that text appended as
the start of the assistant turn: the map and the gate's probability are then read at the position that predicts
the answer. Replies not in the look-first form fall back to the paper's position.

On a policy with `reply_probe` (the transformers backend) the reply is decoded once with its attention recorded
(`policies.reply_probe`), so the probe costs nothing beyond the reply, which is what ``direct`` decodes anyway; the
prompt's cache is kept for the generic and answer passes, and when the gate fires the finished reply is the answer.
Elsewhere the thought is probed as a suffix (a second prefill).

Deviations:
- the answer pass after the crop continues the reply's thought (prefilled, `chat_with_prefix(starts=…)`) rather
  than writing it anew with the crop in view (the thought restates the question's words);
- the generic map of rel-att stays at the generic prompt's last token (it normalises where the model attends to
  any image, and a generic prompt has no referent to stop at);
- a high-resolution image split into blocks gets one reply, on the whole image, and every block is probed after
  that thought (it restates the question's referent, which does not depend on the block; the paper's blocks are
  probed at their own last prompt token).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from foveate.policies.base import SamplingParams
from foveate.protocol import THOUGHT_OPEN, look_parts

LOOK_FIRST = ("auto", "on", "off")


def thought_prefix(reply: str) -> str | None:
    """A look-first reply's thought up to the answer inside it: ``<think>the red`` from ``<think>the red
    circle</think>circle``; None when the reply is not in that form (`protocol.look_parts`) or its thought does
    not end with the answer."""
    parts = look_parts(reply)
    if parts is None or not parts[0].endswith(" " + parts[1]):
        return None
    referent = parts[0][: -len(parts[1]) - 1]
    return THOUGHT_OPEN + referent if referent.strip() else None


def model_looks_first(policy: Any) -> bool:
    """Whether the policy's model was trained to answer look-first, from the recipe saved beside its weights
    (`rl.answer_probe.looks_first`); False for a model without one (any real checkpoint). ViCrop asks on every
    question, so the recipe is parsed once per file version."""
    inner = getattr(policy, "policy", policy)  # a MicroBatcher wraps the real policy
    path = getattr(inner, "model_path", None)
    recipe = Path(str(path)) / "foveate_recipe.json" if path else None
    if recipe is None or not recipe.is_file():
        return False
    return _recipe_looks_first(str(recipe.parent), recipe.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _recipe_looks_first(directory: str, stamp: int) -> bool:
    """`rl.answer_probe.looks_first` of a model directory whose recipe has modification time ``stamp``."""
    from foveate.rl.answer_probe import looks_first

    return looks_first(directory)


def wants_thoughts(policy: Any, setting: str) -> bool:
    if setting not in LOOK_FIRST:
        raise ValueError(f"look_first must be one of {LOOK_FIRST}, not {setting!r}")
    return setting == "on" or (setting == "auto" and model_looks_first(policy))


def write_thoughts(
    policy: Any, conversations: list[list[dict]], options: Any, layer: Any = None, keep: list[bool] | None = None
) -> list[tuple[str | None, Any, Any]]:
    """Each conversation's (`thought_prefix`, the `ChatResult` it came from, the `ProbeResult` at the thought's
    answer position or None), from one batched greedy reply per conversation (at most ``options.thought_tokens``
    tokens). Called under the model lock ViCrop holds for white-box calls, so it asks the wrapped policy directly:
    a `MicroBatcher`'s queue would wait for that lock.

    With ``layer`` and a policy that has `reply_probe` (`policies.reply_probe`), the reply is decoded while its
    attention is recorded, so the probe comes with it: the map and probability at the thought's last token, or at
    the last prompt token (the paper's position) when the reply is not look-first; ``keep[i]`` keeps row i's prompt
    cache as the probe's session. Otherwise the probe is None and the caller probes with the thought as a suffix."""
    if not conversations:
        return []
    inner = getattr(policy, "policy", policy)
    if layer is None or not getattr(inner, "supports_prefix_reuse", False) or not hasattr(inner, "reply_probe"):
        results = inner.chat(conversations, SamplingParams(max_new_tokens=options.thought_tokens))
        return [(thought_prefix(result.text), result, None) for result in results]
    replies = inner.reply_probe(conversations, layer, options.thought_tokens, keep=keep)
    written = []
    for reply in replies:
        thought = thought_prefix(reply.reply.text)
        position = reply.position_after(thought, inner.decode_ids) if thought else 0
        if position is None:  # the thought ends inside a token: probe it as a suffix instead (a session of its own)
            inner.release_sessions([reply.session])
            written.append((thought, reply.reply, None))
            continue
        probe = inner.probe_result(reply, position)
        written.append((thought if position else None, reply.reply, probe))
    return written


def continues_thought(policy: Any, params: SamplingParams) -> bool:
    """Whether an answer can continue a reply's thought (`chat_with_prefix(starts=…)`): greedy, once, no stop
    strings (they would have to see the prefilled start), on a model with sessions."""
    plain = params.greedy and params.n == 1 and not params.stop
    return plain and getattr(policy, "supports_prefix_reuse", False)


def answers_as_asked(reply: Any, params: SamplingParams) -> bool:
    """Whether a look-first reply can stand as the answer to a caller decoding with ``params``: it ended on its own
    (not cut at ``thought_tokens``), and the caller decodes greedily, once, with no stop strings and a token budget
    the reply fits in (the answer it would get is then exactly this reply)."""
    if reply is None or reply.completions[0].finish_reason != "stop":
        return False
    plain = params.greedy and params.n == 1 and not params.stop
    return plain and reply.completion_tokens <= params.max_new_tokens
