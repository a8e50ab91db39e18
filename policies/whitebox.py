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
- Sessions (`policies.sessions`, mixed in here): a probe's kept KV cache, reused by later calls.
- Choices (`policies.choices`, mixed in here): several answers to one prompt scored with the prompt shared, and
  every distinct image of a teacher-forced batch encoded once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from foveate.errors import PolicyError
from foveate.policies.attention_capture import attention_row, capture_attention, capturing_sdpa_forward
from foveate.policies.base import Conversation, ImageMap, ProbeResult  # noqa: F401 (ProbeResult: declared in base)
from foveate.policies.choices import ChoicesMixin
from foveate.policies.sessions import SessionsMixin, output_cache

GRAD_ATTENTION_NAME = "foveate_sdpa_grad"  # the text decoder's attention while a grad-att probe runs
_grad_local = threading.local()


class _GradProbe:
    """Thread-local state of one grad-att forward: the layers to differentiate and their attention leaves."""

    def __init__(self, layers: Sequence[int]) -> None:
        self.layers = set(layers)
        self.rows: dict[int, torch.Tensor] = {}


def _grad_attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA attention whose last query row, at the grad-att layers, is recomputed from a differentiable copy.

    SDPA's output carries no gradient to attention probabilities it never materialises, so at a wanted layer the
    last query's probabilities are computed explicitly (`attention_row`, float32) and made a leaf tensor
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
    row = attention_row(module, query.detach(), key.detach(), attention_mask, scaling, -1)
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


class WhiteBoxMixin(ChoicesMixin, SessionsMixin):
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
    def _append_answers(self, batch: dict[str, torch.Tensor], answers: Sequence[str | list[int] | None]):
        """Append answer tokens (a text, or token ids as they are) to each left-padded prompt row; return the new
        batch and answer positions."""
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        type_ids = batch.get("mm_token_type_ids")
        answer_ids = [
            list(a) if isinstance(a, list) else self.tokenizer(a, add_special_tokens=False)["input_ids"] if a else []
            for a in answers
        ]
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
            logits = self._forward_shared_images(batch).logits
        return self._answer_scores(logits, batch["input_ids"], positions).tolist()

    def image_attention(
        self, conversations: Sequence[Conversation], layer: int | Sequence[int], position: int = -1
    ) -> list[list[ImageMap]]:
        if position >= 0:
            raise PolicyError("position counts from the end of the prompt (-1 = last prompt token)")
        layers = self._check_layers(layer)
        # Rows that show the same image after the same text (a grounder asking one image about many phrases)
        # prefill it once and read each question's attention over its cached keys (policies.choices).
        prefix = self._image_prefix_sessions(conversations) if position == -1 else None
        if prefix is not None:
            started = time.perf_counter()
            probed = self._probe_with_prefix(conversations, prefix.sessions, layers, started, prefix.rendered)
            return [result.maps for result in probed]
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
        start of an assistant turn the model is taken to have written (`policies.look_first`); maps and the
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
            logits, cache = output.logits[:, -1].float(), output_cache(output)
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

    def _probe_with_prefix(
        self, conversations, sessions, layers: list[int], started: float, rendered=None
    ) -> list[ProbeResult]:
        """Attention probe whose rows reuse their sessions' caches (see `attention_probe`); ``rendered`` as in
        `_prefill_with_prefix`."""
        with capture_attention(layers) as captured, torch.no_grad():
            logits, _state, prompt_tokens, layout = self._prefill_with_prefix(
                conversations, sessions, rendered=rendered
            )
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
        return maps.detach(), logits.detach(), output_cache(output)

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
