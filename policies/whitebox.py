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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from foveate.errors import PolicyError
from foveate.policies.attention_capture import capture_attention
from foveate.policies.base import Conversation, ImageMap


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
