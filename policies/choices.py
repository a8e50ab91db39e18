"""Several answers to one prompt, scored with the prompt shared (`WhiteBoxPolicy.choice_logprobs`).

Mixed into `policies.whitebox.WhiteBoxMixin`. Teacher-forced scoring of ``k`` answers to one prompt as ``k`` rows
re-runs the vision tower and the whole prompt ``k`` times; here:

- every distinct image of a batch goes through the vision tower once (`_forward_shared_images`): rows showing the
  same crop (pixel-identical processor output) share its features, passed to the model as transformers'
  ``mm_encoder_outputs`` (``Qwen2VLModel.forward`` takes precomputed encoder outputs); `answer_logprobs` uses it
  too;
- each conversation is one row: its prompt followed by the tokens all its choices begin with (their common
  prefix); every choice's first own token is read from that row's logits. Choices with more tokens (e.g. a
  look-first model's ``<think>… yes</think>yes`` against ``… no</think>no``) continue from the row's KV cache in a
  second forward of just their remaining tokens (mrope positions continue the row's, as in `policies.sessions`),
  so the prompt and the image are computed once per conversation, not once per choice;
- when several conversations show the same images (equal pixels) after the same template text — Patch Matters
  asks one crop about many sentences — that shared prefix (the image's tokens, most of a row) is prefilled once
  (`_image_prefix_sessions`) and each conversation's question continues from its KV cache
  (`SessionsMixin._prefill_with_prefix`), every choice then continued from the question's cache. A crop of ``T``
  image tokens asked ``k`` questions of ``q`` tokens costs ``T + k·q`` prefill tokens instead of ``k·(T + q)``.

The numbers equal `answer_logprobs` row by row within float tolerance (tests/test_choice_logprobs.py compares
them on the tiny model). Models without prefix reuse (`supports_prefix_reuse`) score multi-token choices as one
row each, still sharing images.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from typing import NamedTuple

import torch

from foveate.errors import PolicyError
from foveate.policies.base import Conversation, image_source, is_image_part, iter_parts
from foveate.policies.sessions import VISION_END, cache_layers, output_cache


def common_prefix(token_lists: Sequence[list[int]]) -> int:
    """How many leading tokens all lists share, leaving every list at least one token of its own.

    >>> common_prefix([[1, 2, 3], [1, 2, 4, 5]])
    2
    >>> common_prefix([[7], [7, 8]])
    0
    """
    shortest = min(len(tokens) for tokens in token_lists)
    count = 0
    while count < shortest - 1 and all(tokens[count] == token_lists[0][count] for tokens in token_lists):
        count += 1
    return count


def _fingerprint(image) -> tuple:
    """Equal for images of equal pixels (a loaded copy of a crop is the same crop)."""
    return image.size, image.mode, hashlib.blake2b(image.tobytes(), digest_size=16).digest()


class ImagePrefix(NamedTuple):
    """`ChoicesMixin._image_prefix_sessions`: per conversation its session (None: no image) and its rendering."""

    sessions: list  # [_Session | None]
    rendered: list  # [(chat text, images)], the images of a row with a session being that session's objects


class ChoicesMixin:
    """Needs `WhiteBoxMixin`'s ``_append_answers`` / ``_answer_scores``, `SessionsMixin`'s ``_next_positions`` /
    ``_cache_argument`` / ``supports_prefix_reuse``, and `TransformersVLM`'s ``model``, ``tokenizer``, ``prepare``."""

    def choice_logprobs(
        self, conversations: Sequence[Conversation], choices: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Per conversation, the summed log p of each of its choices (see the module docstring for how)."""
        if len(conversations) != len(choices):
            raise PolicyError("choice_logprobs needs one list of choices per conversation")
        if any(not options or not all(options) for options in choices):
            raise PolicyError("choice_logprobs needs non-empty choices")
        tokens = [[self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in options] for options in choices]
        if not self.supports_prefix_reuse:  # one teacher-forced row per choice (images still encoded once)
            rows = [(c, option) for c, options in zip(conversations, choices, strict=True) for option in options]
            flat = iter(self.answer_logprobs([c for c, _ in rows], [a for _, a in rows]))
            return [[next(flat) for _ in options] for options in choices]
        prefix = self._image_prefix_sessions(conversations)
        if prefix is not None:
            return self._choices_after_image_prefix(conversations, prefix, tokens)
        shared = [common_prefix(ids) for ids in tokens]
        batch, _ = self.prepare(conversations)
        batch, positions = self._append_answers(batch, [ids[0][:n] for ids, n in zip(tokens, shared, strict=True)])
        with torch.inference_mode():
            output = self._forward_shared_images(batch, use_cache=True)
        logits = output.logits
        prefix = [
            float(s) if p else 0.0
            for s, p in zip(self._answer_scores(logits, batch["input_ids"], positions).tolist(), positions, strict=True)
        ]
        first = torch.log_softmax(logits[:, -1].float(), dim=-1)
        scores = [
            [prefix[i] + float(first[i, ids[n]]) for ids in options]
            for i, (options, n) in enumerate(zip(tokens, shared, strict=True))
        ]
        tails = [
            (i, j, ids[n:])
            for i, (options, n) in enumerate(zip(tokens, shared, strict=True))
            for j, ids in enumerate(options)
            if len(ids) - n > 1
        ]
        if tails:
            rest = self._tail_logprobs(
                batch["attention_mask"], self._next_positions(batch), output_cache(output), tails
            )
            for (i, j, _), value in zip(tails, rest, strict=True):
                scores[i][j] += value
        return scores

    def _image_prefix_sessions(self, conversations: Sequence[Conversation]) -> ImagePrefix | None:
        """Per conversation, a `_Session` of its prompt through its last image, computed once for all rows that
        show the same images (equal pixels) after the same template text, and each conversation rendered (rows
        of one prefix given its session's image objects, so the prefill that follows neither renders nor compares
        pixels again); None when no such prefix repeats (nothing to share) or the model has no prefix reuse."""
        if not self.supports_prefix_reuse:
            return None
        rendered = [self.render(messages) for messages in conversations]
        known: dict = {}  # fingerprint per image source object: an image shown in many rows is hashed once
        keys = []
        for messages, (text, images) in zip(conversations, rendered, strict=True):
            end = text.rfind(VISION_END)  # the last image's end: typed control tokens are defused by render
            sources = [image_source(p) for message in messages for p in iter_parts(message) if is_image_part(p)]
            pixels = []
            for source, image in zip(sources, images, strict=True):
                handle = source if isinstance(source, str) else id(source)  # all alive for the whole call
                if handle not in known:
                    known[handle] = _fingerprint(image)
                pixels.append(known[handle])
            keys.append((tuple(pixels), text[: end + len(VISION_END)]) if images and end >= 0 else None)
        with_images = [key for key in keys if key is not None]
        distinct = list(dict.fromkeys(with_images))
        if len(distinct) == len(with_images):
            return None
        texts = [text for _, text in distinct]
        images_per_row = [rendered[keys.index(key)][1] for key in distinct]
        batch = self.encode(texts, [image for images in images_per_row for image in images])
        with torch.inference_mode():
            output = self.model(**batch, use_cache=True, logits_to_keep=1)
        made = self._make_sessions(
            batch, texts, images_per_row, output.logits[:, -1].float(), output_cache(output), [True] * len(distinct)
        )
        by_key = {key: made[index] for index, key in enumerate(distinct)}
        sessions = [by_key[key] if key is not None else None for key in keys]
        shown = []  # a row's images are its session's own objects: `_shared_images` then matches them by identity
        for (text, images), session in zip(rendered, sessions, strict=True):
            shown.append((text, [image for _, _, image, _ in session.images] if session is not None else images))
        return ImagePrefix(sessions, shown)

    def _choices_after_image_prefix(self, conversations, prefix: ImagePrefix, tokens) -> list[list[float]]:
        """Each conversation continued from its image-prefix session (`SessionsMixin._prefill_with_prefix`: only
        the question after the image is prefilled); every choice's first token read from the last logits, the
        rest of it continued from the cache (one row per choice of more than one token)."""
        with torch.inference_mode():
            logits, (cache, attention, next_positions), _, _ = self._prefill_with_prefix(
                conversations, prefix.sessions, rendered=prefix.rendered
            )
        first = torch.log_softmax(logits.float(), dim=-1)
        scores = [[float(first[i, ids[0]]) for ids in options] for i, options in enumerate(tokens)]
        tails = [(i, j, ids) for i, options in enumerate(tokens) for j, ids in enumerate(options) if len(ids) > 1]
        if tails:
            for (i, j, _), value in zip(
                tails, self._tail_logprobs(attention, next_positions, cache, tails), strict=True
            ):
                scores[i][j] += value
        return scores

    def _tail_logprobs(
        self, attention_mask, next_positions, cache, tails: list[tuple[int, int, list[int]]]
    ) -> list[float]:
        """Summed log p of each tail's tokens after its first, continuing row ``i`` of ``cache`` (its
        ``attention_mask`` and the mrope position after its last token, ``next_positions``)."""
        from transformers import DynamicCache

        rows = torch.tensor([i for i, _, _ in tails])
        expanded = DynamicCache(config=self.model.config.get_text_config())
        for layer, (keys, values) in enumerate(cache_layers(cache)):
            expanded.update(keys.index_select(0, rows), values.index_select(0, rows), layer)
        length = max(len(tail) for _, _, tail in tails)
        device = attention_mask.device
        ids = torch.full((len(tails), length), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(tails), length), dtype=attention_mask.dtype, device=device)
        for row, (_, _, tail) in enumerate(tails):
            ids[row, : len(tail)] = torch.tensor(tail)
            mask[row, : len(tail)] = 1  # right-padded: a pad position is never read
        starts = next_positions.index_select(0, rows.to(next_positions.device))
        positions = (starts[:, None] + torch.arange(length, device=device)[None]).unsqueeze(0).expand(3, -1, -1)
        attention = torch.cat([attention_mask.index_select(0, rows.to(device)), mask], dim=1)
        with torch.inference_mode():
            output = self.model(
                input_ids=ids,
                attention_mask=attention,
                position_ids=positions,
                use_cache=True,
                **{self._cache_argument: expanded},
            )
        log_probs = torch.log_softmax(output.logits.float(), dim=-1)
        return [
            float(log_probs[row, torch.arange(len(tail) - 1), ids[row, 1 : len(tail)]].sum())
            for row, (_, _, tail) in enumerate(tails)
        ]

    def _forward_shared_images(self, batch: dict[str, torch.Tensor], use_cache: bool = False):
        """``self.model(**batch)`` with each distinct image of the batch through the vision tower once: rows that
        show the same crop (pixel-identical processor output) share its features, passed as transformers'
        ``mm_encoder_outputs``. Models without that argument run as they are."""
        pixels, grids = batch.get("pixel_values"), batch.get("image_grid_thw")
        if pixels is None or grids is None or "mm_encoder_outputs" not in self._forward_parameters():
            return self.model(**batch, use_cache=use_cache)
        chunks = torch.split(pixels, grids.prod(-1).tolist())
        unique: list[int] = []  # per distinct image, the index of its first occurrence
        source: list[int] = []  # per image, its position in `unique`
        for index, chunk in enumerate(chunks):
            same = (
                position
                for position, first in enumerate(unique)
                if torch.equal(grids[first], grids[index]) and torch.equal(chunks[first], chunk)
            )
            position = next(same, None)
            if position is None:
                unique.append(index)
                position = len(unique) - 1
            source.append(position)
        if len(unique) == len(chunks):
            return self.model(**batch, use_cache=use_cache)
        encoded = self.model.get_image_features(torch.cat([chunks[u] for u in unique]), grids[unique], return_dict=True)
        encoded.pooler_output = tuple(encoded.pooler_output[position] for position in source)
        rest = {k: v for k, v in batch.items() if k != "pixel_values"}
        return self.model(**rest, mm_encoder_outputs={"image": encoded}, use_cache=use_cache)

    def _forward_parameters(self) -> set[str]:
        if not hasattr(self, "_forward_parameter_names"):
            self._forward_parameter_names = set(inspect.signature(self.model.forward).parameters)
        return self._forward_parameter_names
