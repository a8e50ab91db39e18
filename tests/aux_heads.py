"""Shared checks for the vision aux heads (rl.vision_aux): a head learns from a fixed batch, and the
heads' loss refuses a batch that lacks the head's targets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch


def fit_on_batch(model: Any, heads: Any, head: torch.nn.Module, batch: dict, head_loss: Callable) -> list[float]:
    """Eight optimizer steps of ``head`` alone on one batch; ``head_loss(merged tokens)`` is its loss. The losses."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        model(**batch)
        loss = head_loss(heads.merged)
        heads.merged = None
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def check_needs_target(model: Any, heads: Any, batch: dict, targets: dict, key: str) -> None:
    """The full aux loss is finite with every target and a clear error naming ``key`` without it."""
    model(**batch)
    assert torch.isfinite(heads.loss(**targets))
    model(**batch)
    with pytest.raises(RuntimeError, match=key):
        heads.loss(**{name: value for name, value in targets.items() if name != key})
