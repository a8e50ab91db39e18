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

import hashlib
import inspect
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

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
    """One probed row: its tokens, mrope positions, per-layer keys/values and next-token logits (detached)."""

    ids: torch.Tensor  # [L] token ids without padding
    positions: torch.Tensor  # [3, L] mrope position ids
    keys: list[torch.Tensor]  # per decoder layer [kv_heads, L, head_dim]
    values: list[torch.Tensor]
    logits: torch.Tensor  # [vocab] next-token logits after the last prompt token
    images: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, pixel digest) per image


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
    ) -> list[ProbeResult]:
        """One batched forward: each conversation's image maps at ``layer`` and its next-token argmax/probability.

        Maps are the last prompt token's attention to each image's tokens, averaged over heads (and over layers
        when several are given) — or, with ``gradient=True``, grad-att maps ``A ⊙ ReLU(∂v/∂A)`` where
        ``v = log p(argmax next token)``. Rows with ``keep[i]`` true keep their KV cache as a session (when
        `supports_prefix_reuse`); release them with `release_sessions` once done (an LRU bounds them anyway).
        """
        layers = self._check_layers(layer)
        keep = [False] * len(conversations) if keep is None else list(keep)
        if len(keep) != len(conversations):
            raise PolicyError("keep needs one flag per conversation")
        started = time.perf_counter()
        batch, images_per_row = self.prepare(conversations)
        use_cache = any(keep) and self.supports_prefix_reuse
        if gradient:
            rows, logits, cache = self._grad_attention_rows(batch, layers, use_cache)
        else:
            with capture_attention(layers) as captured, torch.no_grad():
                output = self.model(**batch, use_cache=use_cache, logits_to_keep=1)
            rows = torch.stack([captured.rows[index] for index in layers]).mean(dim=(0, 2))
            logits, cache = output.logits[:, -1].float(), _output_cache(output)
        probs = torch.softmax(logits, dim=-1)
        top_prob, top_id = probs.max(dim=-1)
        latency = time.perf_counter() - started
        spans = self.image_spans(batch["input_ids"], batch["image_grid_thw"], [len(i) for i in images_per_row])
        per_token = rows.detach().float().cpu().numpy()
        layer_label = layers[0] if len(layers) == 1 else layers
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        sessions = self._keep_sessions(batch, images_per_row, logits, cache, keep) if use_cache else {}
        results = []
        for row in range(len(conversations)):
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
                    session=sessions.get(row),
                )
            )
        return results

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

    def _image_digests(self, batch) -> list[tuple[torch.Tensor, str]]:
        """Per image of the batch (in order): its rows of ``pixel_values`` and a digest of them."""
        if "pixel_values" not in batch:
            return []
        out, start = [], 0
        for t, h, w in batch["image_grid_thw"].tolist():
            rows = batch["pixel_values"][start : start + t * h * w]
            start += t * h * w
            digest = hashlib.blake2b(rows.detach().float().cpu().numpy().tobytes(), digest_size=16).hexdigest()
            out.append((rows, digest))
        return out

    def _row_images(self, batch, images_per_row) -> list[list[tuple[int, int, int]]]:
        """Per row: (start, end, batch image index) of each image's tokens, positions counted without padding."""
        spans = self.image_spans(batch["input_ids"], batch["image_grid_thw"], [len(i) for i in images_per_row])
        pads = (batch["attention_mask"] == 0).sum(dim=1).tolist()
        out, index = [], 0
        for row, row_spans in enumerate(spans):
            row_out = []
            for start, end, _grid in row_spans:
                row_out.append((start - pads[row], end - pads[row], index))
                index += 1
            out.append(row_out)
        return out

    def _keep_sessions(self, batch, images_per_row, logits, cache, keep) -> dict[int, str]:
        if cache is None:
            return {}
        positions = self._rope_positions(batch)
        digests = self._image_digests(batch)
        row_images = self._row_images(batch, images_per_row)
        mask = batch["attention_mask"].bool()
        layers = _cache_layers(cache)
        store, lock = self._session_store()
        kept = {}
        for row, wanted in enumerate(keep):
            if not wanted:
                continue
            where = mask[row]
            session = _Session(
                ids=batch["input_ids"][row][where].clone(),
                positions=positions[:, row][:, where].clone(),
                keys=[k[row][:, where].detach().clone() for k, _ in layers],
                values=[v[row][:, where].detach().clone() for _, v in layers],
                logits=logits[row].detach().clone(),
                images=[(start, end, digests[index][1]) for start, end, index in row_images[row]],
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
        next_positions = torch.stack([s.positions.max() + 1 for s in found]).to(self.device)
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
            logits, state, prompt_tokens = self._prefill_with_prefix(conversations, sessions)
            generated = self._greedy(*state, logits, params.max_new_tokens)
        latency = time.perf_counter() - started
        return [
            ChatResult([self._completion(tokens, params)], count, latency, self.name)
            for tokens, count in zip(generated, prompt_tokens, strict=True)
        ]

    def _prefill_with_prefix(self, conversations, sessions):
        """Prefill only what each row does not share with its session: next-token logits and decode state."""
        batch, images_per_row = self.prepare(conversations)
        positions = self._rope_positions(batch)
        digests = self._image_digests(batch)
        row_images = self._row_images(batch, images_per_row)
        mask = batch["attention_mask"].bool()
        rows = []
        for row, session_id in enumerate(sessions):
            ids = batch["input_ids"][row][mask[row]]
            session = self._get_session(session_id)
            shared = _shared_prefix(session, ids, [(s, e, digests[i][1]) for s, e, i in row_images[row]])
            shared = min(shared, len(ids) - 1)  # at least one new token, whose logits start the answer
            suffix_images = [index for start, _end, index in row_images[row] if start >= shared]
            rows.append((session, shared, ids[shared:], positions[:, row][:, mask[row]][:, shared:], suffix_images))
        prefix_len = max(shared for _, shared, *_ in rows)
        suffix_len = max(len(ids) for _, _, ids, *_ in rows)
        count = len(rows)
        input_ids = torch.full((count, suffix_len), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        suffix_positions = torch.zeros((3, count, suffix_len), dtype=torch.long, device=self.device)
        attention = torch.zeros((count, prefix_len + suffix_len), dtype=torch.long, device=self.device)
        for row, (_session, shared, ids, pos, _images) in enumerate(rows):
            input_ids[row, suffix_len - len(ids) :] = ids
            suffix_positions[:, row, suffix_len - len(ids) :] = pos
            attention[row, prefix_len - shared : prefix_len] = 1
            attention[row, prefix_len + suffix_len - len(ids) :] = 1
        cache = self._padded_cache([(session, shared) for session, shared, *_ in rows], prefix_len)
        inputs = {"input_ids": input_ids, "attention_mask": attention, "position_ids": suffix_positions}
        images = [index for *_, row_suffix_images in rows for index in row_suffix_images]
        if images:
            inputs["pixel_values"] = torch.cat([digests[index][0] for index in images])
            inputs["image_grid_thw"] = batch["image_grid_thw"][images]
        output = self.model(**inputs, **{self._cache_argument: cache}, use_cache=True, logits_to_keep=1)
        next_positions = torch.stack([pos.max() + 1 for *_, pos, _ in rows])
        prompt_tokens = [shared + len(ids) for _, shared, ids, *_ in rows]
        return output.logits[:, -1].float(), (_output_cache(output), attention, next_positions), prompt_tokens

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

    def _greedy(self, cache, attention_mask, next_positions, logits, max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding from a filled cache; each row's tokens up to and including its first end token."""
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


def _shared_prefix(session: _Session | None, ids: torch.Tensor, images: list[tuple[int, int, str]]) -> int:
    """How many leading tokens of ``ids`` can reuse ``session``'s cache (see `chat_with_prefix`)."""
    if session is None:
        return 0
    length = min(len(session.ids), len(ids))
    differs = (session.ids[:length] != ids[:length]).nonzero()
    shared = int(differs[0]) if len(differs) else length
    known = {(start, end): digest for start, end, digest in session.images}
    for start, end, digest in images:
        if start < shared and known.get((start, end)) != digest:
            shared = start  # the image differs (or is cut): re-encode it and everything after it
    return shared
