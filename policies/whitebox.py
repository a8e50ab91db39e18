"""White-box calls of the transformers backend: answer log-likelihoods, attention maps, pixel gradients.

Kept apart from generation so each file reads on its own; `TransformersVLM` mixes this in and provides
`prepare`, `image_spans`, `to_image_maps`, `model`, `tokenizer`, `patch_size` and `merge_size`.

- Attention maps (ViCrop rel-att / grad-att input): one forward over the prompt with the capturing SDPA
  attention, reading the row of the last prompt token (the position that predicts the first answer token) at the
  requested layers, averaged over heads (and layers when several are given), then cut into one grid per image.
  Only the next-token logits are computed (`logits_to_keep=1`).
- Pixel gradients (ViCrop pure-grad input): the gradient of v with respect to the processor's flattened patches,
  un-patchified back to the resized input image, L2 norm over channels. v is the summed log-likelihood of the
  given answer, or, with no answer, log p of the argmax first answer token (as in the paper).
- Attention probes (`attention_probe`, ViCrop's question/generic pass): one batched forward that returns, per
  conversation, the image maps AND the next-token distribution's argmax and probability, and (on request) keeps
  the row's KV cache as a *session*. ``gradient=True`` gives grad-att maps instead: ``A ⊙ ReLU(∂v/∂A)``
  averaged over heads, ``v = log p(argmax first answer token)`` (see `_grad_attention_forward` for how the
  gradient reaches the attention probabilities under SDPA).
- Sessions (Qwen2-VL family only, `supports_prefix_reuse`): `continue_probe` decodes greedily from a probe's
  cache (the answer to the probed conversation costs only its decode steps), and `chat_with_prefix` answers a
  new conversation that starts with the probed one's tokens up to some point (e.g. the same image followed by
  a crop) by reusing the cached keys/values of that shared prefix: only the new suffix is prefilled and only
  the suffix's images are encoded. mrope positions come from the model's own ``get_rope_index`` over the whole
  new sequence, so the result equals a fresh forward (tests compare the logits). Greedy, ``n = 1`` only; other
  sampling falls back to `chat`. Sessions live in a small per-policy LRU (`MAX_SESSIONS`), never in graph
  state: a strategy resumed in another process just gets a cache miss and a full prefill.
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

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from foveate.errors import PolicyError
from foveate.policies.attention_capture import _attention_row, capture_attention, capturing_sdpa_forward
from foveate.policies.base import ChatResult, Conversation, ImageMap, SamplingParams

MAX_SESSIONS = 32  # probe caches kept per policy (least recently used dropped first)
GRAD_ATTENTION_NAME = "foveate_sdpa_grad"  # the text decoder's attention while a grad-att probe runs
PREFIX_REUSE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")  # mrope models whose get_rope_index we call
VISION_END = "<|vision_end|>"  # the Qwen2-VL chat template closes every image with it (a special token)
_grad_local = threading.local()
_SESSIONS_INIT_LOCK = threading.Lock()


@dataclass
class ProbeResult:
    """One conversation's answer to `attention_probe`."""

    maps: list[ImageMap]  # one per image of the conversation, in order
    token: str  # the argmax next token (the first answer token under greedy decoding)
    token_id: int
    prob: float  # its probability: the confidence a gate can use
    prompt_tokens: int
    latency_s: float  # wall time of the batched forward this row was part of
    session: str | None = None  # handle for `continue_probe` / `chat_with_prefix` (None when not kept)


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


class _GradProbe:
    """Thread-local state of one grad-att forward: the layers to differentiate and their attention leaves."""

    def __init__(self, layers: Sequence[int]) -> None:
        self.layers = set(layers)
        self.rows: dict[int, torch.Tensor] = {}


def _grad_attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA attention whose last query row, at the grad-att layers, is recomputed from a differentiable copy.

    SDPA's output carries no gradient to attention probabilities it never materialises, so at a wanted layer the
    last query's probabilities are computed explicitly (`_attention_row`, float32) and made a leaf tensor
    ``A`` with ``requires_grad``; that row's attention output is recomputed as ``A · V`` and substituted for
    SDPA's last output row (equal up to float rounding, so logits do not change). Autograd is switched on from
    here to the end of the forward (the caller runs the forward under ``no_grad`` and restores the mode), so
    layers before the wanted one record no graph at all and ``∂v/∂A`` costs one partial backward.
    """
    output, weights = capturing_sdpa_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    probe: _GradProbe | None = getattr(_grad_local, "probe", None)
    layer = getattr(module, "layer_idx", None)
    if probe is None or layer not in probe.layers or not getattr(module, "is_causal", False):
        return output, weights
    torch.set_grad_enabled(True)
    row = _attention_row(module, query.detach(), key.detach(), attention_mask, scaling, -1)
    row = row.detach().requires_grad_(True)
    probe.rows[layer] = row
    groups = getattr(module, "num_key_value_groups", 1)
    values = (repeat_kv(value.detach(), groups) if groups > 1 else value.detach()).float()
    last = torch.einsum("bhl,bhld->bhd", row, values[:, :, : row.shape[-1]]).to(output.dtype)
    return torch.cat([output[:, :-1], last.unsqueeze(1)], dim=1), weights


def _register_grad_attention() -> str:
    AttentionInterface.register(GRAD_ATTENTION_NAME, _grad_attention_forward)
    AttentionMaskInterface.register(GRAD_ATTENTION_NAME, sdpa_mask)  # padding masks need a mask function too
    return GRAD_ATTENTION_NAME


class WhiteBoxMixin:
    """Needs the attributes listed in the module docstring."""

    def _check_layers(self, layer: int | Sequence[int]) -> list[int]:
        layers = [layer] if isinstance(layer, int) else list(layer)
        for index in layers:
            if not 0 <= index < self.num_layers:
                raise PolicyError(f"layer {index} out of range: the model has {self.num_layers} decoder layers")
        if not layers:
            raise PolicyError("no layer given")
        return layers

    # ---- teacher forcing ------------------------------------------------------------------------------
    def _append_answers(self, batch: dict[str, torch.Tensor], answers: Sequence[str | None]):
        """Append answer tokens to each left-padded prompt row; return the new batch and answer positions."""
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        type_ids = batch.get("mm_token_type_ids")
        answer_ids = [self.tokenizer(a, add_special_tokens=False)["input_ids"] if a else [] for a in answers]
        rows = [ids[i][mask[i]].tolist() + answer_ids[i] for i in range(len(answers))]
        length = max(len(row) for row in rows)
        new_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=ids.dtype)
        new_mask = torch.zeros((len(rows), length), dtype=batch["attention_mask"].dtype)
        new_types = torch.zeros((len(rows), length), dtype=type_ids.dtype) if type_ids is not None else None
        positions = []
        for i, row in enumerate(rows):
            offset = length - len(row)
            new_ids[i, offset:] = torch.tensor(row, dtype=ids.dtype)
            new_mask[i, offset:] = 1
            if new_types is not None:
                # transformers 5 needs mm_token_type_ids for every token; answer tokens are text (0).
                prompt_types = type_ids[i][mask[i]]
                new_types[i, offset : offset + len(prompt_types)] = prompt_types
            positions.append(list(range(length - len(answer_ids[i]), length)))
        extended = {**batch, "input_ids": new_ids.to(ids.device), "attention_mask": new_mask.to(ids.device)}
        if new_types is not None:
            extended["mm_token_type_ids"] = new_types.to(ids.device)
        return extended, positions

    def _answer_scores(self, logits: torch.Tensor, input_ids: torch.Tensor, positions: list[list[int]]):
        """Per row: summed log p of the tokens at `positions` (or of the argmax next token when empty)."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        scores = []
        for row, answer_positions in enumerate(positions):
            if answer_positions:
                index = torch.tensor(answer_positions, device=logits.device)
                targets = input_ids[row, index]
                scores.append(log_probs[row, index - 1].gather(-1, targets[:, None]).sum())
            else:
                scores.append(log_probs[row, -1].max())
        return torch.stack(scores)

    # ---- public white-box calls -------------------------------------------------------------------------
    def answer_logprobs(self, conversations: Sequence[Conversation], answers: Sequence[str]) -> list[float]:
        if len(conversations) != len(answers):
            raise PolicyError("answer_logprobs needs one answer per conversation")
        if any(not answer for answer in answers):
            raise PolicyError("answer_logprobs needs non-empty answers")
        batch, _ = self.prepare(conversations)
        batch, positions = self._append_answers(batch, answers)
        with torch.inference_mode():
            logits = self.model(**batch, use_cache=False).logits
        return self._answer_scores(logits, batch["input_ids"], positions).tolist()

    def image_attention(
        self, conversations: Sequence[Conversation], layer: int | Sequence[int], position: int = -1
    ) -> list[list[ImageMap]]:
        if position >= 0:
            raise PolicyError("position counts from the end of the prompt (-1 = last prompt token)")
        layers = self._check_layers(layer)
        batch, images_per_row = self.prepare(conversations)
        with capture_attention(layers, query_offset=position) as captured, torch.inference_mode():
            self.model(**batch, use_cache=False, logits_to_keep=1)
        rows = torch.stack([captured.rows[index] for index in layers]).mean(dim=(0, 2)).cpu().numpy()
        spans = self.image_spans(batch["input_ids"], batch["image_grid_thw"], [len(i) for i in images_per_row])
        layer_label = layers[0] if len(layers) == 1 else layers
        return [
            self.to_image_maps(rows[row], spans[row], images_per_row[row], layer_label)
            for row in range(len(conversations))
        ]

    def pixel_gradient(
        self, conversations: Sequence[Conversation], answers: Sequence[str | None]
    ) -> list[list[ImageMap]]:
        if len(conversations) != len(answers):
            raise PolicyError("pixel_gradient needs one answer (or None) per conversation")
        batch, images_per_row = self.prepare(conversations)
        if "pixel_values" not in batch:
            raise PolicyError("pixel_gradient needs at least one image")
        batch, positions = self._append_answers(batch, answers)
        pixels = batch["pixel_values"].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(**{**batch, "pixel_values": pixels}, use_cache=False).logits
            # Rows are independent, so one backward of the sum gives every image its own gradient.
            self._answer_scores(logits, batch["input_ids"], positions).sum().backward()
        grids = batch["image_grid_thw"].tolist()
        pixel_maps = self._unpatchify_norms(pixels.grad.detach().float(), grids)
        maps, index = [], 0
        for images in images_per_row:
            row_maps = []
            for image in images:
                row_maps.append(ImageMap(values=pixel_maps[index], image_size=image.size, kind="pixel_gradient"))
                index += 1
            maps.append(row_maps)
        return maps

    # ---- attention probes and sessions (ViCrop) ----------------------------------------------------------
    @property
    def supports_prefix_reuse(self) -> bool:
        """Whether sessions work here: a Qwen2-VL-family model whose mrope positions we can recompute."""
        inner = getattr(self.model, "model", None)
        model_type = getattr(self.model.config, "model_type", "")
        return model_type in PREFIX_REUSE_MODEL_TYPES and hasattr(inner, "get_rope_index")

    def attention_probe(
        self,
        conversations: Sequence[Conversation],
        layer: int | Sequence[int],
        *,
        gradient: bool = False,
        keep: Sequence[bool] | None = None,
        sessions: Sequence[str | None] | None = None,
        suffixes: Sequence[str] | None = None,
    ) -> list[ProbeResult]:
        """One batched forward: each conversation's image maps at ``layer`` and its next-token argmax/probability.

        Maps are the last prompt token's attention to each image's tokens, averaged over heads (and over layers
        when several are given) — or, with ``gradient=True``, grad-att maps ``A ⊙ ReLU(∂v/∂A)`` where
        ``v = log p(argmax next token)``. Rows with ``keep[i]`` true keep their KV cache as a session (when
        `supports_prefix_reuse`); release them with `release_sessions` once done (an LRU bounds them anyway).
        With ``sessions`` (attention maps only), each row reuses its session's cache for the prefix it shares
        with it, as `chat_with_prefix` does: e.g. the generic prompt on an image probed with a question costs
        only the generic prompt's tokens. ``suffixes``: text appended to each row after its generation prompt, the
        start of an assistant turn the model is taken to have written (`agents.vicrop_thought`); maps and the
        next-token probability are then read at its last token ("" = none).
        """
        layers = self._check_layers(layer)
        keep = [False] * len(conversations) if keep is None else list(keep)
        if len(keep) != len(conversations):
            raise PolicyError("keep needs one flag per conversation")
        suffixes = [""] * len(conversations) if suffixes is None else list(suffixes)
        if len(suffixes) != len(conversations):
            raise PolicyError('suffixes needs one text (or "") per conversation')
        if sessions is not None and len(sessions) != len(conversations):
            raise PolicyError("sessions needs one session (or None) per conversation")
        reuse = sessions is not None and any(s is not None for s in sessions) and self.supports_prefix_reuse
        if reuse and (gradient or any(keep)):
            raise PolicyError("a probe that reuses sessions computes attention maps and keeps no session")
        if reuse and any(suffixes):
            raise PolicyError("a probe that reuses sessions takes no suffixes")
        started = time.perf_counter()
        if reuse:
            return self._probe_with_prefix(conversations, sessions, layers, started)
        texts, images_per_row = [], []
        for messages, suffix in zip(conversations, suffixes, strict=True):
            text, images = self.render(messages)
            texts.append(text + suffix)
            images_per_row.append(images)
        batch = self.encode(texts, [image for images in images_per_row for image in images])
        use_cache = any(keep) and self.supports_prefix_reuse
        if gradient:
            rows, logits, cache = self._grad_attention_rows(batch, layers, use_cache)
        else:
            with capture_attention(layers) as captured, torch.no_grad():
                output = self.model(**batch, use_cache=use_cache, logits_to_keep=1)
            rows = torch.stack([captured.rows[index] for index in layers]).mean(dim=(0, 2))
            logits, cache = output.logits[:, -1].float(), _output_cache(output)
        latency = time.perf_counter() - started
        spans = self.image_spans(batch["input_ids"], batch["image_grid_thw"], [len(i) for i in images_per_row])
        kept = self._keep_sessions(batch, texts, images_per_row, logits, cache, keep) if use_cache else {}
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        return self._probe_results(rows, logits, spans, images_per_row, layers, gradient, prompt_tokens, latency, kept)

    def _probe_results(self, rows, logits, spans, images_per_row, layers, gradient, prompt_tokens, latency, kept):
        probs = torch.softmax(logits.float(), dim=-1)
        top_prob, top_id = probs.max(dim=-1)
        per_token = rows.detach().float().cpu().numpy()
        layer_label = layers[0] if len(layers) == 1 else layers
        results = []
        for row in range(len(images_per_row)):
            maps = self.to_image_maps(per_token[row], spans[row], images_per_row[row], layer_label)
            for image_map in maps:
                image_map.kind = "grad_attention" if gradient else "attention"
            token_id = int(top_id[row])
            results.append(
                ProbeResult(
                    maps=maps,
                    token=self.tokenizer.decode([token_id]),
                    token_id=token_id,
                    prob=float(top_prob[row]),
                    prompt_tokens=int(prompt_tokens[row]),
                    latency_s=latency,
                    session=kept.get(row),
                )
            )
        return results

    def _probe_with_prefix(self, conversations, sessions, layers: list[int], started: float) -> list[ProbeResult]:
        """Attention probe whose rows reuse their sessions' caches (see `attention_probe`)."""
        with capture_attention(layers) as captured, torch.no_grad():
            logits, _state, prompt_tokens, layout = self._prefill_with_prefix(conversations, sessions)
        rows = torch.stack([captured.rows[index] for index in layers]).mean(dim=(0, 2))
        latency = time.perf_counter() - started
        spans = [row_layout["spans"] for row_layout in layout]  # already in key (cache + suffix) coordinates
        images_per_row = [row_layout["images"] for row_layout in layout]
        return self._probe_results(rows, logits, spans, images_per_row, layers, False, prompt_tokens, latency, {})

    def _text_attention_config(self):
        """The config object the text decoder's attention layers read their implementation from."""
        for module in self.model.modules():
            if getattr(module, "is_causal", False) and getattr(module, "layer_idx", None) is not None:
                return module.config
        raise PolicyError("grad-att: cannot find the text decoder's attention layers")

    def _grad_attention_rows(self, batch, layers: list[int], use_cache: bool):
        """grad-att rows [batch, key_len] (mean over layers and heads), next-token logits, and the cache."""
        config = self._text_attention_config()
        previous = config._attn_implementation_internal
        probe = _GradProbe(layers)
        _grad_local.probe = probe
        config._attn_implementation_internal = _register_grad_attention()
        try:
            with torch.no_grad():  # grad mode switches on inside the first wanted layer (and is restored here)
                output = self.model(**batch, use_cache=use_cache, logits_to_keep=1)
                with torch.enable_grad():
                    logits = output.logits[:, -1].float()
                    # Rows are independent, so the gradient of the sum gives every row its own ∂v/∂A.
                    score = torch.log_softmax(logits, dim=-1).max(dim=-1).values.sum()
                    leaves = [probe.rows[index] for index in layers]
                    grads = torch.autograd.grad(score, leaves)
        finally:
            config._attn_implementation_internal = previous
            _grad_local.probe = None
        maps = torch.stack([(a * g.clamp(min=0)) for a, g in zip(leaves, grads, strict=True)]).mean(dim=(0, 2))
        return maps.detach(), logits.detach(), _output_cache(output)

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

    def _keep_sessions(self, batch, texts, images_per_row, logits, cache, keep) -> dict[int, str]:
        if cache is None:
            return {}
        positions = self._rope_positions(batch)
        spans = self.image_spans(batch["input_ids"], batch["image_grid_thw"], [len(i) for i in images_per_row])
        grids = batch.get("image_grid_thw")
        mask = batch["attention_mask"].bool()
        pads = (~mask).sum(dim=1).tolist()
        layers = _cache_layers(cache)
        store, lock = self._session_store()
        kept, image_index = {}, 0
        for row, wanted in enumerate(keep):
            first_image, image_index = image_index, image_index + len(images_per_row[row])
            if not wanted:
                continue
            where = mask[row]
            images = [
                (start - pads[row], end - pads[row], image, grids[first_image + i])
                for i, ((start, end, _grid), image) in enumerate(zip(spans[row], images_per_row[row], strict=True))
            ]
            session = _Session(
                text=texts[row],
                ids=batch["input_ids"][row][where].clone(),
                types=batch["mm_token_type_ids"][row][where].clone(),
                keys=[k[row][:, where].detach().clone() for k, _ in layers],
                values=[v[row][:, where].detach().clone() for _, v in layers],
                logits=logits[row].detach().clone(),
                next_position=int(positions[:, row][:, where].max()) + 1,
                images=images,
            )
            name = uuid.uuid4().hex
            with lock:
                store[name] = session
                while len(store) > MAX_SESSIONS:
                    store.popitem(last=False)
            kept[row] = name
        return kept

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
    ) -> list[ChatResult]:
        """`chat`, reusing each session's cached keys/values for the tokens its conversation shares with it.

        The shared prefix is the longest common token prefix, cut back so it never ends inside an image and
        never includes an image whose pixels differ from the session's. Only the suffix is prefilled (and only
        its images encoded). Falls back to `chat` for sampling, ``n > 1`` or models without prefix reuse.
        """
        params = params or SamplingParams()
        if len(sessions) != len(conversations):
            raise PolicyError("chat_with_prefix needs one session (or None) per conversation")
        if not params.greedy or params.n != 1 or not self.supports_prefix_reuse:
            return self.chat(conversations, params)
        results: list[ChatResult] = []
        for start in range(0, len(conversations), self.max_batch_size):
            stop = start + self.max_batch_size
            results += self._chat_with_prefix_batch(conversations[start:stop], sessions[start:stop], params)
        return results

    def _chat_with_prefix_batch(self, conversations, sessions, params: SamplingParams) -> list[ChatResult]:
        started = time.perf_counter()
        with torch.no_grad():
            logits, state, prompt_tokens, _layout = self._prefill_with_prefix(conversations, sessions)
            generated = self._greedy(*state, logits, params.max_new_tokens)
        latency = time.perf_counter() - started
        return [
            ChatResult([self._completion(tokens, params)], count, latency, self.name)
            for tokens, count in zip(generated, prompt_tokens, strict=True)
        ]

    def _prefill_with_prefix(self, conversations, sessions):
        """Prefill only what each row does not share with its session.

        Each conversation is rendered; the leading images it shares with its session (the same image object, or
        equal pixels) and the template text up to the last shared image's end token are taken from the session's
        cache; only the rest of the text (and its images) goes through the processor and the model. mrope
        positions come from ``get_rope_index`` over the whole row (session tokens + new tokens), sliced.
        Returns the next-token logits, the decode state, prompt token counts and, per row, its images with their
        token spans in key coordinates (cache positions, then suffix positions).
        """
        rows, suffix_texts, suffix_images = [], [], []
        for messages, session_id in zip(conversations, sessions, strict=True):
            text, images = self.render(messages)
            session = self._get_session(session_id)
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
        state = (_output_cache(output), attention, next_positions)
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
            cache = _output_cache(output)
            token = output.logits[:, -1].argmax(dim=-1)
            if on_step is not None:
                on_step(output.logits[:, -1])
            positions += 1
        return tokens

    def _unpatchify_norms(self, gradient: torch.Tensor, grids: list[list[int]]) -> list[np.ndarray]:
        """Undo the processor's patch layout; return ‖∂v/∂pixel‖₂ over channels per resized-image pixel."""
        images = unpatchify(gradient, grids, self.patch_size, self.merge_size)
        return [image.norm(dim=1).mean(dim=0).cpu().numpy().astype(np.float32) for image in images]


def unpatchify(patches: torch.Tensor, grids: list[list[int]], patch_size: int, merge_size: int) -> list[torch.Tensor]:
    """Undo the Qwen2-VL processor's patch layout: one [time, channel, height, width] tensor per image.

    ``patches`` is [sum of t·h·w, channel·time·patch·patch] (the processor's ``pixel_values`` or a gradient of
    them); ``grids`` the ``image_grid_thw`` rows. Rows are ordered (block_row, block_col, merge_row, merge_col);
    columns (channel, time, y, x).
    """
    images, start = [], 0
    patch, merge = patch_size, merge_size
    for t, h, w in grids:
        count = t * h * w
        block = patches[start : start + count].reshape(t, h // merge, w // merge, merge, merge, 3, -1, patch, patch)
        start += count
        # → (t, time, channel, block_row, merge_row, y, block_col, merge_col, x)
        images.append(block.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(-1, 3, h * patch, w * patch))
    return images


def _output_cache(output):
    """The KV cache a forward returned (``cache`` in transformers ≥ 5.2x, ``past_key_values`` before)."""
    fields = getattr(output, "__dataclass_fields__", {})  # even asking for the old name logs a deprecation
    return getattr(output, "cache" if "cache" in fields else "past_key_values", None)


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
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
