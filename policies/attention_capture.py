"""Capture one query row of attention at chosen decoder layers, under SDPA, without `output_attentions`.

The reference ViCrop code loads the model with eager attention and `output_attentions=True`, which materialises
every layer's [heads, L, L] matrix only to read one row. Here an attention function registered with
`transformers.AttentionInterface` wraps the stock SDPA kernel: for the text decoder layers that a capture
context asks for, it also computes softmax(q_last · Kᵀ · scale + mask) for the last query position — a
[heads, 1, L] row — and then delegates the real attention to SDPA, so logits are unchanged (RESEARCH.md §7).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "foveate_sdpa"
_state = threading.local()


class CaptureBuffer:
    """Holds the captured rows of one forward pass: layer index → tensor [batch, heads, key_len].

    ``query_offset``: one position for every row (-1 = the last), a [batch] tensor of a position per row (the
    rows of a right-padded training batch end at different positions; `rl.attention_supervision`), or a [batch, n]
    tensor of several per row (rows are then [batch, heads, n, key_len])."""

    def __init__(self, layers: Sequence[int], query_offset: int | torch.Tensor = -1) -> None:
        self.layers = set(layers)
        self.query_offset = query_offset
        self.rows: dict[int, torch.Tensor] = {}


@contextlib.contextmanager
def capture_attention(layers: Sequence[int], query_offset: int | torch.Tensor = -1) -> Iterator[CaptureBuffer]:
    """Within the block, forwards of a model loaded with ``attn_implementation=ATTENTION_NAME`` record rows."""
    buffer = CaptureBuffer(layers, query_offset)
    previous = getattr(_state, "buffer", None)
    _state.buffer = buffer
    try:
        yield buffer
    finally:
        _state.buffer = previous


def attention_row(module, query, key, attention_mask, scaling, query_offset):
    """softmax over keys for the chosen query positions, all heads, in float32: [batch, heads, key_len] for an int
    (the same position in every row) or a [batch] tensor of positions; [batch, heads, n, key_len] for a [batch, n]
    tensor (several positions per row, such as every answer of a multi-turn chat). With a tensor, keys after each
    position are masked here too (SDPA may run causal attention with no mask tensor at all)."""
    if not isinstance(query_offset, torch.Tensor):
        query_row = query[:, :, query_offset, :].unsqueeze(2).float()
        mask_row = None if attention_mask is None else attention_mask[:, :, query_offset, :].unsqueeze(2)
        return _softmax_row(module, query_row, key, mask_row, scaling, None).squeeze(2)
    offsets = query_offset if query_offset.dim() == 2 else query_offset[:, None]  # [batch, n]
    rows = torch.arange(query.shape[0], device=query.device)[:, None]
    query_row = query[rows, :, offsets, :].transpose(1, 2).float()  # [batch, heads, n, dim]
    mask_row = None if attention_mask is None else attention_mask[rows, :, offsets, :].transpose(1, 2)
    result = _softmax_row(module, query_row, key, mask_row, scaling, offsets)
    return result if query_offset.dim() == 2 else result.squeeze(2)


def _softmax_row(module, query_row, key, mask_row, scaling, offsets):
    """softmax(query_row · Kᵀ · scale + mask) over keys; ``offsets`` [batch, n] also masks keys after each query."""
    keys = repeat_kv(key, module.num_key_value_groups).float() if hasattr(module, "num_key_value_groups") else key
    scale = scaling if scaling is not None else query_row.shape[-1] ** -0.5
    scores = torch.matmul(query_row, keys.float().transpose(2, 3)) * scale  # [batch, heads, n, keys]
    if mask_row is not None:
        mask_row = mask_row[..., : keys.shape[-2]]
        if mask_row.dtype == torch.bool:
            scores = scores.masked_fill(~mask_row, float("-inf"))
        else:
            scores = scores + mask_row.float()
    if offsets is not None:
        future = torch.arange(keys.shape[-2], device=scores.device)[None, None, :] > offsets[:, :, None]
        scores = scores.masked_fill(future[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1)


def capturing_sdpa_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA attention that additionally records the wanted row when a capture is active."""
    buffer: CaptureBuffer | None = getattr(_state, "buffer", None)
    layer_idx = getattr(module, "layer_idx", None)
    # Only causal text-decoder layers are captured; the vision tower shares this function but has no layer_idx.
    if buffer is not None and layer_idx in buffer.layers and getattr(module, "is_causal", False):
        with torch.no_grad() if not torch.is_grad_enabled() else contextlib.nullcontext():
            buffer.rows[layer_idx] = attention_row(module, query, key, attention_mask, scaling, buffer.query_offset)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def register() -> str:
    """Register the capturing attention (idempotent) and return its name for `attn_implementation`.

    The mask function must be registered under the same name: transformers skips building padding masks
    for attention implementations it has no mask function for, which would silently break left padding.
    """
    AttentionInterface.register(ATTENTION_NAME, capturing_sdpa_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
