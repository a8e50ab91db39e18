"""Greedy replies that record their own attention as they are decoded (one call: the reply and ViCrop's map).

ViCrop on a look-first model (`policies.look_first`) reads its question map inside the model's own thought:
at the token that predicts the answer (``<think>the red`` → ``circle``). Written as two calls, a greedy reply and
then a probe of the conversation with the thought appended, every question pays two prefills of the image. Here
the reply is decoded once under the capturing attention (`policies.attention_capture`), and each decoded
position's attention row at the wanted layers is kept, with the probability of the token it predicted: the row
at any prefix of the reply is then the map a probe with that prefix as suffix would read, and the reply itself is
the answer a confident gate returns. A row keeps the prompt's columns only (image and text keys of the padded
prompt: [prompt length] floats per decoded token), which is all a map reads.

Hand-written rather than ``generate(output_attentions=True)`` because that returns every layer's attention over
every head in eager mode, which is what the capture exists to avoid; the decoding loop is the sessions' own
(`WhiteBoxMixin._greedy`), so the reply equals `chat`'s greedy reply (a test compares them).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from foveate.errors import PolicyError
from foveate.policies.attention_capture import capture_attention
from foveate.policies.base import ChatResult, Conversation, ImageMap, SamplingParams
from foveate.policies.sessions import output_cache
from foveate.policies.whitebox import ProbeResult


@dataclass
class ReplyProbe:
    """One conversation's greedy reply with the attention of every position that predicted one of its tokens."""

    reply: ChatResult
    token_ids: list[int]  # the reply's tokens as decoded (an end token included when it stopped)
    # [positions, prompt keys]: row 0 = the last prompt token (predicting token 0); row k ≥ 1 = the forward that fed
    # token k - 1 (predicting token k)
    rows: np.ndarray
    probs: list[float]  # probs[k]: probability of the token predicted at row k (the reply's token k)
    session: str | None = None  # the prompt's cache, kept as in `attention_probe(keep=…)`
    maps_at: Any = field(default=None, repr=False)  # k → [ImageMap per image] at row k (bound by reply_probe)

    def position_after(self, text: str, decode) -> int | None:
        """The row that predicts what follows ``text``, a prefix of the reply (None when the tokens do not spell it
        out exactly, e.g. when ``text`` ends inside a token)."""
        wanted = text.strip()
        for count in range(len(self.token_ids) + 1):
            spelled = decode(self.token_ids[:count]).strip()
            if spelled == wanted:
                return count if count < len(self.rows) else None
            if len(spelled) > len(wanted):
                return None
        return None


class ReplyProbeMixin:
    """`reply_probe` for `TransformersVLM` (needs the `WhiteBoxMixin` helpers)."""

    def reply_probe(
        self,
        conversations: Sequence[Conversation],
        layer: int | Sequence[int],
        max_new_tokens: int,
        *,
        keep: Sequence[bool] | None = None,
    ) -> list[ReplyProbe]:
        """Each conversation's greedy reply (at most ``max_new_tokens``), decoded in one batch while the attention
        at ``layer`` (mean over heads, and over layers when several) of every position is recorded. ``keep[i]``
        keeps row i's prompt cache as a session (`continue_probe`, `chat_with_prefix`)."""
        layers = self._check_layers(layer)
        keep = [False] * len(conversations) if keep is None else list(keep)
        if len(keep) != len(conversations):
            raise PolicyError("keep needs one flag per conversation")
        if not self.supports_prefix_reuse:
            raise PolicyError("reply_probe decodes from the prompt's cache: a Qwen2-VL-family model is needed")
        results: list[ReplyProbe] = []
        for first in range(0, len(conversations), self.max_batch_size):  # batches no larger than `chat`'s
            rows = slice(first, first + self.max_batch_size)
            results += self._reply_probe_batch(conversations[rows], layers, max_new_tokens, keep[rows])
        return results

    def _reply_probe_batch(self, conversations, layers: list[int], max_new_tokens: int, keep: list[bool]):
        started = time.perf_counter()
        texts, images_per_row = self.render_all(conversations)
        batch = self.encode(texts, [image for images in images_per_row for image in images])
        prompt_length = batch["input_ids"].shape[1]
        steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # per position: ([batch, prompt keys], [batch] prob)

        def record(captured, logits: torch.Tensor) -> None:
            rows = torch.stack([captured.rows[index] for index in layers]).mean(dim=(0, 2))[:, :prompt_length]
            steps.append((rows.float(), torch.softmax(logits.float(), dim=-1).max(dim=-1).values))

        with capture_attention(layers) as captured, torch.no_grad():
            output = self.model(**batch, use_cache=True, logits_to_keep=1)
            logits, cache = output.logits[:, -1].float(), output_cache(output)
            record(captured, logits)
            next_positions, mask = self._next_positions(batch), batch["attention_mask"]
            kept = self._keep_sessions(batch, texts, images_per_row, logits, cache, keep, next_positions)
            generated = self._greedy(
                cache, mask, next_positions, logits, max_new_tokens, on_step=lambda step: record(captured, step)
            )
        latency = time.perf_counter() - started
        spans = self.image_spans(batch["input_ids"], batch["image_grid_thw"], [len(i) for i in images_per_row])
        all_rows = torch.stack([rows for rows, _ in steps], dim=1).cpu().numpy()  # [batch, positions, keys]
        all_probs = torch.stack([probs for _, probs in steps], dim=1).tolist()
        prompt_tokens = mask.sum(dim=1).tolist()
        params = SamplingParams(max_new_tokens=max_new_tokens)
        label = layers[0] if len(layers) == 1 else layers
        results = []
        for row, tokens in enumerate(generated):
            # positions past this row's end token were decoded for other rows of the batch only
            count = min(len(tokens), len(steps))
            result = ReplyProbe(
                reply=ChatResult([self._completion(tokens, params)], int(prompt_tokens[row]), latency, self.name),
                token_ids=tokens,
                rows=all_rows[row, :count],
                probs=all_probs[row][:count],
                session=kept.get(row),
            )
            result.maps_at = self._maps_reader(result, spans[row], images_per_row[row], label)
            results.append(result)
        return results

    def _maps_reader(self, result: ReplyProbe, spans, images, label):
        def maps_at(position: int) -> list[ImageMap]:
            return self.to_image_maps(result.rows[position], spans, images, label)

        return maps_at

    def probe_result(self, result: ReplyProbe, position: int) -> ProbeResult:
        """`attention_probe`'s result for the reply's prompt followed by the reply's first ``position`` tokens."""
        token_id = int(result.token_ids[position])
        return ProbeResult(
            maps=result.maps_at(position),
            token=self.tokenizer.decode([token_id]),
            token_id=token_id,
            prob=float(result.probs[position]),
            prompt_tokens=result.reply.prompt_tokens,
            latency_s=result.reply.latency_s,
            session=result.session,
        )

    def decode_ids(self, token_ids: Sequence[int]) -> str:
        """Token ids as the text `chat` would return for them (special tokens kept)."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)
