"""Sessions: a probed prompt's KV cache kept so later calls reuse it (Qwen2-VL family, `supports_prefix_reuse`).

Split from `policies.whitebox`, which mixes this in. `continue_probe` decodes greedily from a probe's cache (the
answer to the probed conversation costs only its decode steps), and `chat_with_prefix` answers a new conversation
that starts with the probed one's tokens up to some point (e.g. the same image followed by a crop) by reusing the
cached keys/values of that shared prefix: only the new suffix is prefilled and only the suffix's images are
encoded. mrope positions come from the model's own ``get_rope_index`` over the whole new sequence, so the result
equals a fresh forward (tests compare the logits). Greedy, ``n = 1`` only; other sampling falls back to `chat`.
Sessions live in a small per-policy LRU (`MAX_SESSIONS`), never in graph state: a strategy resumed in another
process just gets a cache miss and a full prefill.

Hand-written rather than ``generate(past_key_values=…)``: the shared prefix ends at an image's end token, so each
row needs its own cut of the cache, left-padded into one batch, with mrope positions computed for the whole row.
"""

from __future__ import annotations

import inspect
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from foveate.errors import PolicyError
from foveate.policies.base import ChatResult, Conversation, SamplingParams

MAX_SESSIONS = 32  # probe caches kept per policy (least recently used dropped first)
PREFIX_REUSE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")  # mrope models whose get_rope_index we call
VISION_END = "<|vision_end|>"  # the Qwen2-VL chat template closes every image with it (a special token)
_SESSIONS_INIT_LOCK = threading.Lock()


@dataclass
class _Session:
    """One probed row: its text, tokens, positions, per-layer keys/values and next-token logits (detached)."""

    text: str  # the rendered chat text the row was built from
    ids: torch.Tensor  # [L] token ids without padding
    types: torch.Tensor  # [L] mm_token_type_ids (0 text, 1 image)
    keys: list[torch.Tensor]  # per decoder layer [kv_heads, L, head_dim]
    values: list[torch.Tensor]
    logits: torch.Tensor  # [vocab] next-token logits after the last prompt token
    next_position: int  # mrope text position of the first answer token
    # per image, in order: (first token, end token, the PIL image as given, its image_grid_thw row)
    images: list[tuple[int, int, Any, torch.Tensor]] = field(default_factory=list)


class SessionsMixin:
    """Needs `TransformersVLM`'s `model`, `tokenizer`, `render`, `encode`, `image_spans`, `end_token_ids`."""

    @property
    def supports_prefix_reuse(self) -> bool:
        """Whether sessions work here: a Qwen2-VL-family model whose mrope positions we can recompute."""
        inner = getattr(self.model, "model", None)
        model_type = getattr(self.model.config, "model_type", "")
        return model_type in PREFIX_REUSE_MODEL_TYPES and hasattr(inner, "get_rope_index")

    # sessions ------------------------------------------------------------------------------------------------
    def _session_store(self) -> tuple[OrderedDict, threading.Lock]:
        with _SESSIONS_INIT_LOCK:  # created lazily so the mixin needs no __init__
            if not hasattr(self, "_sessions"):
                self._sessions: OrderedDict[str, _Session] = OrderedDict()
                self._sessions_lock = threading.Lock()
        return self._sessions, self._sessions_lock

    def release_sessions(self, sessions: Sequence[str | None]) -> None:
        """Drop kept probe caches (unknown or None ids are ignored)."""
        store, lock = self._session_store()
        with lock:
            for session in sessions:
                if session is not None:
                    store.pop(session, None)

    def _get_session(self, session: str | None) -> _Session | None:
        if session is None:
            return None
        store, lock = self._session_store()
        with lock:
            found = store.get(session)
            if found is not None:
                store.move_to_end(session)
            return found

    def _rope_positions(self, batch) -> torch.Tensor:
        """mrope position ids [3, batch, length] of a processed batch (padding at 0)."""
        positions, _ = self.model.model.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch.get("image_grid_thw"),
            attention_mask=batch["attention_mask"],
        )
        return positions

    def _next_positions(self, batch) -> torch.Tensor:
        """[batch]: each row's mrope text position of the first token after its prompt."""
        mask = batch["attention_mask"].bool()
        return self._rope_positions(batch).masked_fill(~mask[None], -1).amax(dim=(0, 2)) + 1

    def _keep_sessions(
        self, batch, texts, images_per_row, logits, cache, keep, next_positions: torch.Tensor | None = None
    ) -> dict[int, str]:
        """Keep the rows flagged in ``keep`` as sessions; ``next_positions`` (`_next_positions`) when the caller
        has them already."""
        made = self._make_sessions(batch, texts, images_per_row, logits, cache, keep, next_positions)
        store, lock = self._session_store()
        kept = {}
        for row, session in made.items():
            name = uuid.uuid4().hex
            with lock:
                store[name] = session
                while len(store) > MAX_SESSIONS:
                    store.popitem(last=False)
            kept[row] = name
        return kept

    def _make_sessions(
        self, batch, texts, images_per_row, logits, cache, keep, next_positions: torch.Tensor | None = None
    ) -> dict[int, _Session]:
        """The rows flagged in ``keep`` as `_Session` objects (not stored: `_keep_sessions` stores them)."""
        if cache is None:
            return {}
        next_positions = self._next_positions(batch) if next_positions is None else next_positions
        spans = self.image_spans(batch["input_ids"], batch["image_grid_thw"], [len(i) for i in images_per_row])
        grids = batch.get("image_grid_thw")
        mask = batch["attention_mask"].bool()
        pads = (~mask).sum(dim=1).tolist()
        layers = cache_layers(cache)
        made, image_index = {}, 0
        for row, wanted in enumerate(keep):
            first_image, image_index = image_index, image_index + len(images_per_row[row])
            if not wanted:
                continue
            where = mask[row]
            images = [
                (start - pads[row], end - pads[row], image, grids[first_image + i])
                for i, ((start, end, _grid), image) in enumerate(zip(spans[row], images_per_row[row], strict=True))
            ]
            made[row] = _Session(
                text=texts[row],
                ids=batch["input_ids"][row][where].clone(),
                types=batch["mm_token_type_ids"][row][where].clone(),
                keys=[k[row][:, where].detach().clone() for k, _ in layers],
                values=[v[row][:, where].detach().clone() for _, v in layers],
                logits=logits[row].detach().clone(),
                next_position=int(next_positions[row]),
                images=images,
            )
        return made

    def continue_probe(self, sessions: Sequence[str], params: SamplingParams | None = None) -> list[ChatResult]:
        """Greedy answers to the probed conversations, decoded from their kept caches (no new prefill).

        Equivalent to `chat` on the same conversations with greedy decoding. A session that is gone (evicted, or
        never kept) raises `PolicyError`: call `chat` instead.
        """
        params = params or SamplingParams()
        if not params.greedy or params.n != 1:
            raise PolicyError("continue_probe decodes greedily with n = 1")
        found = [self._get_session(s) for s in sessions]
        if any(s is None for s in found):
            raise PolicyError("continue_probe: unknown or evicted session")
        started = time.perf_counter()
        length = max(len(s.ids) for s in found)
        cache = self._padded_cache([(s, len(s.ids)) for s in found], length)
        mask = torch.zeros((len(found), length), dtype=torch.long, device=self.device)
        for row, session in enumerate(found):
            mask[row, length - len(session.ids) :] = 1
        next_positions = torch.tensor([s.next_position for s in found], device=self.device)
        logits = torch.stack([s.logits for s in found])
        with torch.no_grad():
            generated = self._greedy(cache, mask, next_positions, logits, params.max_new_tokens)
        latency = time.perf_counter() - started
        return [
            ChatResult([self._completion(tokens, params)], len(s.ids), latency, self.name)
            for tokens, s in zip(generated, found, strict=True)
        ]

    def chat_with_prefix(
        self,
        conversations: Sequence[Conversation],
        sessions: Sequence[str | None],
        params: SamplingParams | None = None,
        starts: Sequence[str] | None = None,
    ) -> list[ChatResult]:
        """`chat`, reusing each session's cached keys/values for the tokens its conversation shares with it.

        The shared prefix is the longest common token prefix, cut back so it never ends inside an image and
        never includes an image whose pixels differ from the session's. Only the suffix is prefilled (and only
        its images encoded). Falls back to `chat` for sampling, ``n > 1`` or models without prefix reuse.
        ``starts``: text each reply begins with, taken as already written by the model (prefilled after the
        generation prompt, part of the returned text, not of its token count or budget; greedy only).
        """
        params = params or SamplingParams()
        starts = [""] * len(conversations) if starts is None else list(starts)
        if len(sessions) != len(conversations) or len(starts) != len(conversations):
            raise PolicyError("chat_with_prefix needs one session (or None) and one start per conversation")
        if any(starts) and params.stop:  # stop strings would have to see the start too
            raise PolicyError("a reply's start cannot be combined with stop strings")
        if not params.greedy or params.n != 1 or not self.supports_prefix_reuse:
            if any(starts):
                raise PolicyError("a reply's start is prefilled only under greedy decoding with prefix reuse")
            return self.chat(conversations, params)
        results: list[ChatResult] = []
        for first in range(0, len(conversations), self.max_batch_size):
            rows = slice(first, first + self.max_batch_size)
            results += self._chat_with_prefix_batch(conversations[rows], sessions[rows], params, starts[rows])
        return results

    def _chat_with_prefix_batch(self, conversations, sessions, params: SamplingParams, starts) -> list[ChatResult]:
        started = time.perf_counter()
        with torch.no_grad():
            logits, state, prompt_tokens, _layout = self._prefill_with_prefix(conversations, sessions, starts)
            generated = self._greedy(*state, logits, params.max_new_tokens)
        latency = time.perf_counter() - started
        results = []
        for tokens, count, start in zip(generated, prompt_tokens, starts, strict=True):
            completion = self._completion(tokens, params)
            completion.text = start + completion.text
            results.append(ChatResult([completion], count, latency, self.name))
        return results

    def _prefill_with_prefix(self, conversations, sessions, starts: Sequence[str] | None = None, rendered=None):
        """Prefill only what each row does not share with its session (a kept session's id, or a `_Session`).
        ``rendered``: each conversation's `render` output when the caller has it already.

        Each conversation is rendered; the leading images it shares with its session (the same image object, or
        equal pixels) and the template text up to the last shared image's end token are taken from the session's
        cache; only the rest of the text (and its images) goes through the processor and the model. mrope
        positions come from ``get_rope_index`` over the whole row (session tokens + new tokens), sliced.
        Returns the next-token logits, the decode state, prompt token counts and, per row, its images with their
        token spans in key coordinates (cache positions, then suffix positions).
        """
        rows, suffix_texts, suffix_images = [], [], []
        starts = [""] * len(conversations) if starts is None else starts
        rendered = [self.render(messages) for messages in conversations] if rendered is None else rendered
        for (text, images), session_id, start in zip(rendered, sessions, starts, strict=True):
            text += start
            session = session_id if isinstance(session_id, _Session) else self._get_session(session_id)
            shared, cut = _shared_images(session, text, images)
            prefix = session.images[shared - 1][1] + 1 if shared else 0  # through the shared image's end token
            rows.append({"session": session, "shared": shared, "prefix": prefix, "images": images})
            suffix_texts.append(text[cut:])
            suffix_images += images[shared:]
        batch = self.encode(suffix_texts, suffix_images)
        mask = batch["attention_mask"].bool()
        grids = batch.get("image_grid_thw")
        image_index = 0
        for row, info in enumerate(rows):
            count = len(info["images"]) - info["shared"]
            suffix_ids, suffix_types = batch["input_ids"][row][mask[row]], batch["mm_token_type_ids"][row][mask[row]]
            row_grids = [grids[image_index + i] for i in range(count)]
            image_index += count
            session, prefix = info["session"], info["prefix"]
            if prefix:
                suffix_ids = suffix_ids.to(session.ids.device)
                ids = torch.cat([session.ids[:prefix], suffix_ids])
                types = torch.cat([session.types[:prefix], suffix_types.to(session.types.device)])
                row_grids = [grid for *_, grid in session.images[: info["shared"]]] + row_grids
            else:
                ids, types = suffix_ids, suffix_types
            stacked = torch.stack(row_grids) if row_grids else None
            positions, _ = self.model.model.get_rope_index(
                ids[None], mm_token_type_ids=types[None], image_grid_thw=stacked
            )
            info.update(ids=ids, suffix=ids[prefix:], positions=positions[:, 0, prefix:], grids=row_grids)
        prefix_len = max(info["prefix"] for info in rows)
        suffix_len = max(len(info["suffix"]) for info in rows)
        count = len(rows)
        input_ids = torch.full((count, suffix_len), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        suffix_positions = torch.zeros((3, count, suffix_len), dtype=torch.long, device=self.device)
        attention = torch.zeros((count, prefix_len + suffix_len), dtype=torch.long, device=self.device)
        layout = []
        for row, info in enumerate(rows):
            prefix, suffix = info["prefix"], info["suffix"]
            input_ids[row, suffix_len - len(suffix) :] = suffix
            suffix_positions[:, row, suffix_len - len(suffix) :] = info["positions"]
            attention[row, prefix_len - prefix : prefix_len] = 1
            attention[row, prefix_len + suffix_len - len(suffix) :] = 1
            layout.append({"images": info["images"], "spans": self._key_spans(info, prefix_len, suffix_len)})
        cache = self._padded_cache([(info["session"], info["prefix"]) for info in rows], prefix_len)
        inputs = {"input_ids": input_ids, "attention_mask": attention, "position_ids": suffix_positions}
        if suffix_images:
            inputs["pixel_values"], inputs["image_grid_thw"] = batch["pixel_values"], grids
        output = self.model(**inputs, **{self._cache_argument: cache}, use_cache=True, logits_to_keep=1)
        next_positions = torch.stack([info["positions"].max() + 1 for info in rows])
        prompt_tokens = [len(info["ids"]) for info in rows]
        state = (output_cache(output), attention, next_positions)
        return output.logits[:, -1].float(), state, prompt_tokens, layout

    def _key_spans(self, info, prefix_len: int, suffix_len: int) -> list[tuple[int, int, tuple[int, int]]]:
        """A row's image spans (start, end, merged grid) in key coordinates of the padded cache + suffix layout."""
        positions = (info["ids"] == self.image_token_id).nonzero().flatten().tolist()
        length, prefix = len(info["ids"]), info["prefix"]
        spans, cursor = [], 0
        for t, h, w in (tuple(int(v) for v in grid) for grid in info["grids"]):
            rows, cols = h // self.merge_size, w // self.merge_size
            start, end = positions[cursor], positions[cursor + t * rows * cols - 1] + 1
            cursor += t * rows * cols
            # prefix tokens sit right-aligned in the cache; suffix tokens right-aligned after it
            shift = prefix_len - prefix if start < prefix else prefix_len + suffix_len - length
            spans.append((start + shift, end + shift, (rows, cols)))
        return spans

    @property
    def _cache_argument(self) -> str:
        """The forward's name for the KV cache (``cache`` in transformers ≥ 5.2x, ``past_key_values`` before)."""
        parameters = inspect.signature(self.model.forward).parameters
        return "cache" if "cache" in parameters else "past_key_values"

    def _padded_cache(self, rows: list[tuple[_Session | None, int]], length: int):
        """A DynamicCache of ``length`` positions: each row's first ``n`` session positions, left-padded."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config.get_text_config())
        if length == 0:
            return cache
        reference = next(s for s, n in rows if s is not None and n > 0)
        for layer, (key_ref, value_ref) in enumerate(zip(reference.keys, reference.values, strict=True)):
            keys = key_ref.new_zeros((len(rows), key_ref.shape[0], length, key_ref.shape[2]))
            values = value_ref.new_zeros((len(rows), value_ref.shape[0], length, value_ref.shape[2]))
            for row, (session, n) in enumerate(rows):
                if session is not None and n > 0:
                    keys[row, :, length - n :] = session.keys[layer][:, :n]
                    values[row, :, length - n :] = session.values[layer][:, :n]
            cache.update(keys, values, layer)
        return cache

    def _greedy(
        self, cache, attention_mask, next_positions, logits, max_new_tokens: int, on_step=None
    ) -> list[list[int]]:
        """Greedy decoding from a filled cache; each row's tokens up to and including its first end token.
        ``on_step(logits)`` is called after every decoding forward (`policies.reply_probe` reads its capture)."""
        count = logits.shape[0]
        end_ids = torch.tensor(self.end_token_ids, device=logits.device)
        tokens: list[list[int]] = [[] for _ in range(count)]
        done = torch.zeros(count, dtype=torch.bool, device=logits.device)
        token = logits.argmax(dim=-1)
        positions = next_positions.clone()
        for step in range(max_new_tokens):
            for row in (~done).nonzero().flatten().tolist():
                tokens[row].append(int(token[row]))
            done |= torch.isin(token, end_ids)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((count, 1))], dim=1)
            output = self.model(
                input_ids=token[:, None],
                attention_mask=attention_mask,
                position_ids=positions.view(1, count, 1).expand(3, count, 1),
                use_cache=True,
                **{self._cache_argument: cache},
            )
            cache = output_cache(output)
            token = output.logits[:, -1].argmax(dim=-1)
            if on_step is not None:
                on_step(output.logits[:, -1])
            positions += 1
        return tokens


def output_cache(output):
    """The KV cache a forward returned (``cache`` in transformers ≥ 5.2x, ``past_key_values`` before)."""
    fields = getattr(output, "__dataclass_fields__", {})  # even asking for the old name logs a deprecation
    return getattr(output, "cache" if "cache" in fields else "past_key_values", None)


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a DynamicCache, each [batch, kv_heads, length, head_dim]."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]


def _shared_images(session: _Session | None, text: str, images: list) -> tuple[int, int]:
    """How many leading images a rendered conversation shares with ``session`` (same object or equal pixels,
    and the same template text up to the last of them), and where its text continues after that image."""
    if session is None:
        return 0, 0
    shared = 0
    for image, (_start, _end, known, _grid) in zip(images, session.images, strict=False):
        same = image is known or (
            image.size == known.size and image.mode == known.mode and image.tobytes() == known.tobytes()
        )
        if not same:
            break
        shared += 1
    while shared:
        cut = _after_nth(text, VISION_END, shared)
        if cut is not None and session.text[:cut] == text[:cut]:
            return shared, cut
        shared -= 1
    return 0, 0


def _after_nth(text: str, marker: str, n: int) -> int | None:
    """The index just after the ``n``-th occurrence of ``marker`` in ``text`` (None if there are fewer)."""
    index = -len(marker)
    for _ in range(n):
        index = text.find(marker, index + len(marker))
        if index < 0:
            return None
    return index + len(marker)
