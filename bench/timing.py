"""The timer the benchmark scripts share (imported from the script's own folder: ``from timing import timed``)."""

from __future__ import annotations

import time


def timed(function) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def step_seconds(model, optimizer, batch: dict, aux_weight: float = 1.0, attn_layers=(), attn_weight: float = 1.0):
    """Wall seconds of one forward + backward + optimiser step with the losses `rl.sft` trains with: the language
    loss, plus ``aux_weight`` × the vision aux loss when the batch carries its targets (the model has `rl.vision_aux`
    attached), plus ``attn_weight`` × attention supervision at ``attn_layers`` when it carries attention targets
    (the model runs `policies.attention_capture`'s attention). The targets are popped from ``batch`` first."""
    from foveate.policies.attention_capture import capture_attention
    from foveate.rl import attention_supervision, vision_aux

    aux_targets = {key: batch.pop(key) for key in vision_aux.TARGET_KEYS if key in batch}
    attn_targets = {key: batch.pop(key) for key in attention_supervision.TARGET_KEYS if key in batch}
    started = time.perf_counter()
    if attn_targets:
        with capture_attention(attn_layers, query_offset=attn_targets["attn_query"].clamp_min(0)) as captured:
            loss = model(**batch).loss
        loss = loss + attn_weight * attention_supervision.loss(captured.rows, **attn_targets)
    else:
        loss = model(**batch).loss
    if aux_targets:
        loss = loss + aux_weight * model.foveate_aux.loss(**aux_targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - started


def aux_step_seconds(model, optimizer, batches: list[dict]) -> list[float]:
    """`step_seconds` of each batch, language loss plus the vision aux loss (the batches carry its targets). The
    first batch warms up and is not returned."""
    return [step_seconds(model, optimizer, batch) for batch in batches][1:]


def mix_step_medians(model, processor, mixes: dict, batches: int, max_length: int = 512) -> dict[str, float]:
    """Median `aux_step_seconds` over ``batches`` prepared batches of 16 examples of each `DataMix` in ``mixes``
    (stream seed 0), on ``model`` with `rl.vision_aux` heads attached here; collated before timing."""
    import itertools
    import statistics

    import torch

    from foveate.rl import vision_aux
    from foveate.rl.sft import ChatCollator
    from foveate.rl.sft_data import example_stream

    vision_aux.attach(model)
    collator = ChatCollator(processor, max_length=max_length, aux_targets=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    medians = {}
    for name, mix in mixes.items():
        stream = example_stream(0, mix)
        prepared = [collator(list(itertools.islice(stream, 16))) for _ in range(batches + 1)]
        medians[name] = statistics.median(aux_step_seconds(model, optimizer, prepared))
    return medians
