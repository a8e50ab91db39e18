"""Look-first models: where such a model's answer is decided, behind `WhiteBoxPolicy.answer_starts`.

A model trained with look-first answers (`rl.sft_data.DataMix.look_first`, the demo model) replies
``<think>the red circle</think>circle``: the answer is first predicted AT the referent's last word, inside the
thought, and that is where its attention looks the object up. At the last prompt token, where a method such as
ViCrop reads the paper's map, such a model predicts ``<think>``: the map there is not the lookup, and p(first
token) is the probability of ``<think>``, near 1 on every question.

So the backend reports, per question, what its model writes before it commits to the answer (`AnswerStart`): ""
for a model that answers straight away (no model call), the thought up to the answer (``<think>the red``) for a
look-first one, from one batched greedy reply. On the transformers backend the reply is decoded once with its
attention recorded (`policies.reply_probe`), so the probe at the answer position comes with it (the prompt's cache
kept on request); a thought that ends inside a token, or a backend that does not record replies, leaves the probe
to the caller (the thought as a suffix). A strategy then reads its map at the answer position, lets a gate return
the finished reply, and continues the thought when it answers again: as it would for Qwen2.5-VL, whose start is "".

Whether a model answers look-first is read from the recipe saved beside its weights (``foveate_recipe.json``,
`looks_first`); ``look_first="on"``/``"off"`` overrides that.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from foveate.errors import PolicyError
from foveate.policies.base import AnswerStart, Conversation, SamplingParams
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


def saved_data_mix(directory: str | Path) -> dict[str, Any]:
    """The data mix (`DataMix` fields) of the last stage of the recipe saved with a model (`foveate_recipe.json`);
    {} for a model saved without one."""
    recipe_file = Path(directory) / "foveate_recipe.json"
    if not recipe_file.exists():
        return {}
    recipe = json.loads(recipe_file.read_text())
    return {**recipe.get("data", {}), **((recipe.get("stages") or [{}])[-1].get("data") or {})}


def trained_formats(directory: str | Path | None) -> set[str]:
    """The example formats (`rl.sft_data.BUILDERS` names: "qa", "program", …) the last stage of the recipe saved
    with a model trained with a weight above 0; empty for a model saved without one (any real checkpoint)."""
    if not directory:
        return set()
    formats = saved_data_mix(directory).get("formats") or {}
    return {name for name, weight in formats.items() if weight > 0}


def answer_format(directory: str | Path) -> dict[str, Any]:
    """The `DataMix` fields that decide how the model in `directory` writes a short answer (``look_first``,
    ``existence_thought``, ``look_trim_object``)."""
    mix = saved_data_mix(directory)
    return {
        "look_first": bool(mix.get("look_first", False)),
        "existence_thought": mix.get("existence_thought", "referent"),
        "look_trim_object": bool(mix.get("look_trim_object", False)),
    }


def looks_first(directory: str | Path | None) -> bool:
    """Whether the model in `directory` was trained to answer look-first (`DataMix.look_first` in the last stage
    of its saved recipe); False without a recipe (any real checkpoint). Parsed once per file version."""
    recipe = Path(str(directory)) / "foveate_recipe.json" if directory else None
    if recipe is None or not recipe.is_file():
        return False
    return _recipe_looks_first(str(recipe.parent), recipe.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _recipe_looks_first(directory: str, stamp: int) -> bool:
    return answer_format(directory)["look_first"]


def check_look_first(setting: str) -> str:
    if setting not in LOOK_FIRST:
        raise PolicyError(f"look_first must be one of {', '.join(LOOK_FIRST)}, not {setting!r}")
    return setting


class AnswerStartsMixin:
    """`answer_starts` for `TransformersVLM` (needs `chat`, `reply_probe`, `probe_result`, `decode_ids`,
    `release_sessions`, `supports_prefix_reuse` and `model_dir`)."""

    records_replies = True  # reply_probe works here (a test double turns it off to exercise the suffix path)

    @property
    def looks_first(self) -> bool:
        """Whether this model answers look-first, per the recipe saved beside its weights."""
        return looks_first(self.model_dir)

    def answer_starts(
        self,
        conversations: Sequence[Conversation],
        *,
        layer: int | Sequence[int] | None = None,
        keep: Sequence[bool] | None = None,
        look_first: str = "auto",
        max_tokens: int = 24,
    ) -> list[AnswerStart]:
        """See `WhiteBoxPolicy.answer_starts`."""
        setting = check_look_first(look_first)
        if not conversations or setting == "off" or (setting == "auto" and not self.looks_first):
            return [AnswerStart() for _ in conversations]
        keep = [False] * len(conversations) if keep is None else list(keep)
        if layer is None or not self.supports_prefix_reuse or not self.records_replies:
            results = self.chat(conversations, SamplingParams(max_new_tokens=max_tokens))
            return [AnswerStart(thought_prefix(result.text) or "", result) for result in results]
        starts = []
        for reply in self.reply_probe(conversations, layer, max_tokens, keep=keep):
            thought = thought_prefix(reply.reply.text)
            position = reply.position_after(thought, self.decode_ids) if thought else 0
            if position is None:  # the thought ends inside a token: the caller probes it as a suffix
                self.release_sessions([reply.session])
                starts.append(AnswerStart(thought or "", reply.reply))
                continue
            starts.append(AnswerStart(thought if position else "", reply.reply, self.probe_result(reply, position)))
        return starts
